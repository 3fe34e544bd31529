"""Hugging Face conversion of a global megatron GPT state, and HF model directories on disk.

A *global state* maps megatron-core GPTModel parameter names at TP=1/PP=1 (layers numbered across
pipeline stages, as from `layout.gather_global`) to tensors. Two HF families are supported, chosen by
the model's fields (not its `arch` name), because only these map weight-for-weight onto an HF class:

- llama-style (RMSNorm, SwiGLU, RoPE, GQA allowed, untied, no biases) <-> `LlamaForCausalLM`;
- gpt2-style (LayerNorm, exact GELU, learned positions, MHA, tied, biases) <-> `GPT2LMHeadModel`.

Layouts: megatron's fused `linear_qkv` rows are interleaved per query group
``[q heads of g0, k_g0, v_g0, q heads of g1, ...]`` (`SelfAttention.get_query_key_value_tensors`); a
gated `linear_fc1` is ``[gate; up]``. GPT2's Conv1D stores ``weight.T`` and `c_attn` is ``[q; k; v]``.
Every conversion is a pure re-arrangement (no arithmetic), so native -> HF -> native is bit-exact and
any dtype, including bool masks, maps through.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import GenerationConfig, GPT2Config, LlamaConfig, PretrainedConfig

from megatron_sgtm.atomic import building
from megatron_sgtm.layout import native_shapes
from megatron_sgtm.model import ARCHITECTURES, ModelConfig

State = dict[str, torch.Tensor]

# The native model has no epsilon setting: megatron's TransformerConfig default applies to every norm.
NORM_EPS: float = TransformerConfig.__dataclass_fields__["layernorm_epsilon"].default
HF_CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

# Why each field must have its family's value (ARCHITECTURES holds the values).
_REASONS = {
    "llama": {
        "normalization": "LlamaForCausalLM uses RMSNorm",
        "activation": "LlamaForCausalLM's MLP is SwiGLU (silu-gated)",
        "position_embedding": "LlamaForCausalLM uses rotary position embeddings",
        "tie_embeddings": "the llama-style export writes an untied lm_head",
        "bias": "the llama-style export maps bias-free linears only",
    },
    "gpt2": {
        "normalization": "GPT2LMHeadModel uses LayerNorm",
        "activation": "GPT2LMHeadModel's MLP is ungated GELU",
        "position_embedding": "GPT2LMHeadModel has learned absolute position embeddings",
        "tie_embeddings": "GPT2LMHeadModel always ties lm_head to the word embeddings",
        "bias": "GPT2LMHeadModel's linears and LayerNorms always have biases",
    },
}


def _mismatches(cfg: ModelConfig, family: str) -> list[str]:
    wrong = [
        f"model.{key}={getattr(cfg, key)!r} (needs {value!r}: {_REASONS[family][key]})"
        for key, value in ARCHITECTURES[family].items()
        if getattr(cfg, key) != value
    ]
    if family == "gpt2" and cfg.num_query_groups != cfg.num_attention_heads:
        wrong.append(
            f"model.num_query_groups={cfg.num_query_groups} (needs num_attention_heads="
            f"{cfg.num_attention_heads}: GPT2LMHeadModel has no grouped-query attention)"
        )
    return wrong


def hf_family(cfg: ModelConfig) -> str:
    """'llama' or 'gpt2': the HF family whose layer structure `cfg` has exactly; ValueError otherwise."""
    for family in ("llama", "gpt2"):
        if not _mismatches(cfg, family):
            return family
    # Explain against the family the user named (arch), the one they most likely meant.
    raise ValueError(
        f"cannot convert to Hugging Face: as a {cfg.arch}-style model ({HF_CLASSES[cfg.arch]}), "
        + "; ".join(_mismatches(cfg, cfg.arch))
    )


def hf_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters an HF checkpoint of `config` holds (tied lm_head excluded).

    Works for pruned configs too (llama: head_dim * heads != hidden; gpt2: any n_inner)."""
    family = _config_family(config)
    h, vocab = config.hidden_size, config.vocab_size
    if family == "llama":
        hd = config.head_dim or h // config.num_attention_heads
        q, kv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
        shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (vocab, h)
        layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
                 "mlp.down_proj.weight": (h, inter)}
    else:
        inner = config.n_inner or 4 * h
        shapes = {"transformer.wte.weight": (vocab, h), "transformer.wpe.weight": (config.n_positions, h),
                  "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}
        layer = {f"{norm}.{kind}": (h,) for norm in ("ln_1", "ln_2") for kind in ("weight", "bias")}
        for name, (fan_in, fan_out) in {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.c_fc": (h, inner),
                                        "mlp.c_proj": (inner, h)}.items():
            layer.update({f"{name}.weight": (fan_in, fan_out), f"{name}.bias": (fan_out,)})
    for i in range(config.num_hidden_layers):
        shapes.update({_HF_LAYER[family].format(i) + name: shape for name, shape in layer.items()})
    return shapes


def check_state(what: str, state: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                error: type[Exception] = ValueError) -> None:
    """Refuse a state whose names or shapes differ from `expected`, listing (the first of) each problem."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} != {v}" for k, v in expected.items() if k in state
             and tuple(state[k].shape) != v]
    problems = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    if problems:
        raise error(f"{what} does not match its config: " + "; ".join(problems))


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy owning its storage (safetensors refuses tensors that share memory)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _split_qkv(t: torch.Tensor, groups: int, per_group: int, hd: int) -> tuple[torch.Tensor, ...]:
    """megatron's interleaved [q_g0.., k_g0, v_g0, q_g1..] rows -> (q, k, v) rows, heads in order."""
    rest = t.shape[1:]
    t = t.reshape(groups, per_group + 2, hd, *rest)
    q = t[:, :per_group].reshape(groups * per_group * hd, *rest)
    return q, t[:, per_group].reshape(groups * hd, *rest), t[:, per_group + 1].reshape(groups * hd, *rest)


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, per_group: int, hd: int) -> torch.Tensor:
    rest = q.shape[1:]
    parts = [q.reshape(groups, per_group, hd, *rest), k.reshape(groups, 1, hd, *rest), v.reshape(groups, 1, hd, *rest)]
    return torch.cat(parts, dim=1).reshape(groups * (per_group + 2) * hd, *rest)


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The HF config of a native model (no eos/bos: `write_hf_dir` sets them from the tokenizer)."""
    family = hf_family(cfg)
    heads = cfg.num_attention_heads
    if family == "llama":
        return LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=heads, num_key_value_heads=cfg.num_query_groups,
            head_dim=cfg.hidden_size // heads, hidden_act="silu", max_position_embeddings=cfg.seq_length,
            initializer_range=cfg.init_method_std, rms_norm_eps=NORM_EPS, tie_word_embeddings=False,
            attention_bias=False, mlp_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
            bos_token_id=None, eos_token_id=None, architectures=[HF_CLASSES[family]],
        )
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.seq_length, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=heads, n_inner=cfg.ffn_hidden_size, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=NORM_EPS, initializer_range=cfg.init_method_std,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, architectures=[HF_CLASSES[family]],
    )


# The tensors both directions map one to one: native name -> HF name, per family. Layer entries are
# suffixes under "decoder.layers.{i}." and _HF_LAYER; GPT2's Conv1D holds linear weights transposed.
# linear_qkv (and llama's gated fc1) are split/merged by `to_hf`/`from_hf` themselves.
_HF_LAYER = {"llama": "model.layers.{}.", "gpt2": "transformer.h.{}."}
_GLOBAL_NAMES = {
    "llama": {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
              "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"},
    "gpt2": {"embedding.word_embeddings.weight": "transformer.wte.weight",
             "embedding.position_embeddings.weight": "transformer.wpe.weight",
             "decoder.final_layernorm.weight": "transformer.ln_f.weight",
             "decoder.final_layernorm.bias": "transformer.ln_f.bias"},
}
_LAYER_NAMES = {
    "llama": {"input_layernorm.weight": "input_layernorm.weight",
              "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
              "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
              "mlp.linear_fc2.weight": "mlp.down_proj.weight"},
    "gpt2": {f"{native}.{kind}": f"{hf}.{kind}" for kind in ("weight", "bias") for native, hf in (
        ("input_layernorm", "ln_1"), ("self_attention.linear_proj", "attn.c_proj"), ("pre_mlp_layernorm", "ln_2"),
        ("mlp.linear_fc1", "mlp.c_fc"), ("mlp.linear_fc2", "mlp.c_proj"))},
}


def _one_to_one(cfg: ModelConfig, family: str) -> list[tuple[str, str, bool]]:
    """(native name, HF name, is a GPT2 Conv1D linear) of every tensor that maps one to one."""
    pairs = [(native, hf, False) for native, hf in _GLOBAL_NAMES[family].items()]
    for i in range(cfg.num_layers):
        n, p = f"decoder.layers.{i}.", _HF_LAYER[family].format(i)
        pairs += [(n + native, p + hf, family == "gpt2" and "linear" in native)
                  for native, hf in _LAYER_NAMES[family].items()]
    return pairs


def _qkv_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(query groups, heads per group, head dim): the layout of megatron's fused linear_qkv."""
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    return groups, heads // groups, cfg.hidden_size // heads


def to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig, *, consume: bool = False
          ) -> tuple[PretrainedConfig, State]:
    """(HF config, HF state dict) of a global megatron state; ValueError for unsupported architectures.

    With `consume`, `state` (a dict) is emptied and each native tensor is freed as soon as its HF copies
    exist (when the caller holds no other reference), so converting needs about one model of memory."""
    config = hf_config(cfg)
    check_state("the global state", state, native_shapes(cfg))
    out: State = {hf: _conv1d(state[native]) if linear else state[native]
                  for native, hf, linear in _one_to_one(cfg, config.model_type)}
    dims = _qkv_dims(cfg)
    for i in range(cfg.num_layers):
        n, p = f"decoder.layers.{i}.", _HF_LAYER[config.model_type].format(i)
        if config.model_type == "llama":
            q, k, v = _split_qkv(state[n + "self_attention.linear_qkv.weight"], *dims)
            gate, up = state[n + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                        p + "self_attn.v_proj.weight": v, p + "mlp.gate_proj.weight": gate,
                        p + "mlp.up_proj.weight": up})
            continue
        for kind in ("weight", "bias"):
            qkv = _split_qkv(state[f"{n}self_attention.linear_qkv.{kind}"], *dims)
            out[f"{p}attn.c_attn.{kind}"] = _conv1d(torch.cat(qkv))
    if consume:
        state.clear()  # the views in `out` keep each native storage alive until its last copy is made
    return config, {k: _fresh(out.pop(k)) for k in list(out)}


def _conv1d(t: torch.Tensor) -> torch.Tensor:
    """GPT2's Conv1D holds the transpose of a Linear weight (its own inverse); biases are unchanged."""
    return t.T if t.dim() == 2 else t


def _config_family(config: PretrainedConfig) -> str:
    family = getattr(config, "model_type", None)
    if family not in HF_CLASSES:
        raise ValueError(
            f"Hugging Face model_type={family!r} is not supported: expected 'llama' (LlamaForCausalLM) "
            "or 'gpt2' (GPT2LMHeadModel)"
        )
    return family


def _rope_theta(config: PretrainedConfig) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters={rope}: only unscaled ('default') RoPE maps onto the native model")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the llama config has no rope_theta")
    return float(theta)


def _native_config(config: PretrainedConfig) -> ModelConfig:
    """The ModelConfig of an HF config, refusing settings the native model cannot represent exactly."""
    family = _config_family(config)
    wrong: list[str] = []

    def need(field: str, value: object, expected: object, why: str) -> None:
        if value != expected:
            wrong.append(f"{field}={value!r} (needs {expected!r}: {why})")

    if family == "llama":
        heads, h = config.num_attention_heads, config.hidden_size
        theta = _rope_theta(config)
        need("hidden_act", config.hidden_act, "silu", "the native MLP is SwiGLU")
        need("attention_bias", config.attention_bias, False, "llama-style native models have no biases")
        need("mlp_bias", config.mlp_bias, False, "llama-style native models have no biases")
        need("tie_word_embeddings", config.tie_word_embeddings, False, "llama-style native models are untied")
        need("rms_norm_eps", config.rms_norm_eps, NORM_EPS, "the native norms use megatron's default epsilon")
        need("head_dim", config.head_dim or h // heads, h // heads,
             "the native model has head_dim = hidden_size / heads (a pruned export cannot be imported)")
        need("rope_theta", theta, float(round(theta)), "the native rotary_base is an integer")
        fields = dict(
            num_layers=config.num_hidden_layers, hidden_size=h, num_attention_heads=heads,
            num_query_groups=config.num_key_value_heads or heads, ffn_hidden_size=config.intermediate_size,
            vocab_size=config.vocab_size, seq_length=config.max_position_embeddings, rotary_base=round(theta),
        )
    else:
        need("activation_function", config.activation_function, "gelu", "the native GELU is exact (F.gelu)")
        need("layer_norm_epsilon", config.layer_norm_epsilon, NORM_EPS, "the native norms use megatron's default")
        need("tie_word_embeddings", config.tie_word_embeddings, True, "gpt2-style native models are tied")
        need("scale_attn_weights", config.scale_attn_weights, True, "native attention scales by 1/sqrt(head_dim)")
        need("scale_attn_by_inverse_layer_idx", config.scale_attn_by_inverse_layer_idx, False,
             "native attention has no per-layer scaling")
        need("add_cross_attention", config.add_cross_attention, False, "the native model is decoder-only")
        fields = dict(
            num_layers=config.n_layer, hidden_size=config.n_embd, num_attention_heads=config.n_head,
            num_query_groups=config.n_head, ffn_hidden_size=config.n_inner or 4 * config.n_embd,
            vocab_size=config.vocab_size, seq_length=config.n_positions,
        )
    if wrong:
        raise ValueError(f"cannot import this {HF_CLASSES[family]} config: " + "; ".join(wrong))
    cfg = ModelConfig(arch=family, init_method_std=config.initializer_range, **fields, **ARCHITECTURES[family])
    hf_family(cfg)  # the round trip must be exportable again
    return cfg


# HF buffers (not parameters) that some checkpoints carry; they hold no learned weights.
_HF_BUFFERS = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")


def from_hf(hf_state: Mapping[str, torch.Tensor], config: PretrainedConfig) -> tuple[ModelConfig, State]:
    """(ModelConfig, global megatron state) of an HF llama/gpt2 checkpoint: the inverse of `to_hf`."""
    cfg = _native_config(config)
    family = _config_family(config)
    hf_state = {k: v for k, v in hf_state.items() if not _HF_BUFFERS.search(k)}
    if family == "gpt2":
        hf_state.pop("lm_head.weight", None)  # tied: the same tensor as transformer.wte.weight
    check_state("the Hugging Face state", hf_state, hf_shapes(config))
    out: State = {native: _conv1d(hf_state[hf]) if linear else hf_state[hf]
                  for native, hf, linear in _one_to_one(cfg, family)}
    dims = _qkv_dims(cfg)
    for i in range(cfg.num_layers):
        n, p = f"decoder.layers.{i}.", _HF_LAYER[family].format(i)
        if family == "llama":
            out[n + "self_attention.linear_qkv.weight"] = _merge_qkv(
                *(hf_state[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"), *dims)
            out[n + "mlp.linear_fc1.weight"] = torch.cat([hf_state[p + "mlp.gate_proj.weight"],
                                                          hf_state[p + "mlp.up_proj.weight"]])
            continue
        for kind in ("weight", "bias"):
            qkv = _conv1d(hf_state[f"{p}attn.c_attn.{kind}"])
            out[f"{n}self_attention.linear_qkv.{kind}"] = _merge_qkv(*qkv.chunk(3, dim=0), *dims)
    return cfg, {k: _fresh(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------- on disk
def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_weights(directory: Path, state: Mapping[str, torch.Tensor], max_shard_bytes: int) -> None:
    """model.safetensors, or numbered shards plus the standard index when above `max_shard_bytes`."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_NAME, metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save_tokenizer(directory: Path, tokenizer_path: Path, config: PretrainedConfig, max_length: int) -> int:
    """tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast, EOD as eos/bos); returns the EOD id."""
    from transformers import PreTrainedTokenizerFast

    from megatron_sgtm.data.tokenizer import eod_id, load_tokenizer

    tok = load_tokenizer(Path(tokenizer_path))
    if tok.get_vocab_size() > config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {tok.get_vocab_size()} tokens but the model's vocab_size is "
            f"{config.vocab_size}: its ids would index past the embedding"
        )
    eod = eod_id(tok)
    token = tok.id_to_token(eod)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=token, bos_token=token, model_max_length=max_length
    )
    hf_tok.save_pretrained(str(directory))
    # transformers 5 records its own class name; the 4.x-compatible name loads in both.
    tok_config = directory / "tokenizer_config.json"
    settings = {**json.loads(tok_config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}
    tok_config.write_text(json.dumps(settings, indent=2) + "\n")
    return eod


def write_hf_dir(
    out: Path,
    config: PretrainedConfig,
    state: Mapping[str, torch.Tensor],
    dtype: str = "fp32",
    tokenizer_path: Path | None = None,
    *,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a standard HF model directory that `from_pretrained` loads offline; returns `out`.

    Atomic (`atomic.building`): a failure never leaves a half-written export at `out`. `dtype`: 'fp32' or
    'bf16'. `tokenizer_path`: a local `tokenizer.json` or tokenizer directory, saved as a
    `PreTrainedTokenizerFast` whose eos/bos is the end-of-document token; it also sets the config's and
    generation config's eos/bos/pad ids.
    `extra_files` (name -> text or bytes) are written inside the directory too, e.g. a release manifest.
    An existing `out` is refused unless `overwrite`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    check_state("the Hugging Face state", state, hf_shapes(config))
    config = copy.deepcopy(config)
    with building(out) as partial:
        max_length = getattr(config, "max_position_embeddings", None) or config.n_positions
        if tokenizer_path is not None:
            eod = _save_tokenizer(partial, Path(tokenizer_path), config, max_length)
            config.eos_token_id = config.bos_token_id = eod
        config.dtype = "bfloat16" if dtype == "bf16" else "float32"
        config.save_pretrained(str(partial))
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.eos_token_id).save_pretrained(str(partial))
        cast = {k: v.detach().to(device="cpu", dtype=DTYPES[dtype]).contiguous() for k, v in state.items()}
        _save_weights(partial, cast, max_shard_bytes)
        for name, content in (extra_files or {}).items():
            path = partial / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        _fsync_tree(partial)
    return out


def read_hf_dir(path: Path) -> tuple[PretrainedConfig, State]:
    """(config, state) of an HF model directory, reading safetensors only (pickle files can run code)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no config.json")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if (path / WEIGHTS_INDEX_NAME).is_file():
        files = sorted(set(json.loads((path / WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        hint = (f"; it holds only pickle weights {pickled}, which are never loaded (they can execute code): "
                "convert them to safetensors first") if pickled else ""
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}")
    state: State = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return config, state
