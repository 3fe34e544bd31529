"""HF export: logit parity with real megatron-core models (live, zero-ablated, pruned), exact Θ_F diffs,
offline loading and generation, exact round trips, and the refusals.

The native models run once, in their own process (`tests/distributed/workers/export_native.py`: the CPU shims and the
process group are process-wide); everything HF runs here, offline.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config  # noqa: E402

from megatron_sgtm.core.partition import Partition, SGTMConfig  # noqa: E402
from megatron_sgtm.core.strategy import Region  # noqa: E402
from megatron_sgtm.data.tokenizer import EOD_TOKEN, train_bpe  # noqa: E402
from megatron_sgtm.export.hf import from_hf, hf_config, native_shapes, read_hf_dir, to_hf, write_hf_dir  # noqa: E402
from megatron_sgtm.export.prune import ablate_state, ablation_masks, global_regions, prune, summarize  # noqa: E402
from megatron_sgtm.model import ModelConfig  # noqa: E402
from tests.distributed.workers.export_native import CASES, TOKENIZER_VOCAB, tokens_for  # noqa: E402
from tests.support import ROOT  # noqa: E402

PARITY = ("llama_gqa", "llama_kept_heads", "gpt2", "gpt2_routing", "llama_joint_down")  # the exportable, prunable cases
TOL = 1e-4


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("native")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "tests/distributed/workers/export_native.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(out / "results.pt", weights_only=True)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    texts = ["the cat sat on the mat.", "el gato se sentó en la alfombra.", "once upon a time a dog ran."] * 30
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok = train_bpe(texts, TOKENIZER_VOCAB)
    assert tok.get_vocab_size() <= min(CASES[c][0].vocab_size for c in PARITY)
    tok.save(str(path))
    return path


def _partition(name: str) -> Partition:
    cfg, sgtm = CASES[name]
    return sgtm.resolve(cfg.dims())


@pytest.fixture(scope="module")
def exports(native, tokenizer_file, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per parity case: the unablated, ablated and pruned HF directories (fp32, with the tokenizer)."""
    root = tmp_path_factory.mktemp("hf")
    dirs: dict[str, dict[str, Path]] = {}
    for name in PARITY:
        cfg = CASES[name][0]
        config, state = to_hf(native[name]["state"], cfg)
        ablated_config, ablated_state = to_hf(native[name]["ablated_state"], cfg)
        pruned_config, pruned_state = prune(config, state, _partition(name))
        dirs[name] = {
            kind: write_hf_dir(root / f"{name}-{kind}", c, s, "fp32", tokenizer_file)
            for kind, c, s in (("plain", config, state), ("ablated", ablated_config, ablated_state),
                               ("pruned", pruned_config, pruned_state))
        }
    return dirs


def _hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@pytest.mark.parametrize("name", PARITY)
def test_logit_parity_live_ablated_pruned(native, exports, name):
    """HF logits equal megatron's: live export vs live model, ablated and pruned exports vs ablated model."""
    cfg, result = CASES[name][0], native[name]
    tokens = tokens_for(cfg)
    ablation_effect = (result["logits"] - result["logits_ablated"]).abs().max()
    assert ablation_effect > 0.1  # the forget region matters, so the ablated comparisons mean something
    for kind, reference in (("plain", "logits"), ("ablated", "logits_ablated"), ("pruned", "logits_ablated")):
        diff = (_hf_logits(exports[name][kind], tokens) - result[reference]).abs().max()
        assert diff <= TOL, (name, kind, float(diff))

    # The pruned export is smaller by exactly what summarize() reports.
    summary = summarize(cfg, _partition(name), pruned=True)
    _, plain = read_hf_dir(exports[name]["plain"])
    pruned_config, pruned = read_hf_dir(exports[name]["pruned"])
    numel = lambda s: sum(t.numel() for t in s.values())
    assert numel(plain) - numel(pruned) == summary["pruned"]["params_removed"] > 0
    assert pruned_config.to_dict()["architectures"] == [summary["pruned"]["hf_class"]]
    # Θ_F is either removed or (heads that transformers cannot drop) kept zeroed; with joint down-projections so
    # are the forget heads' and units' lines of the (Θ_J) proj and fc2.
    partition = _partition(name)
    hd = cfg.hidden_size // cfg.num_attention_heads
    down = len(partition.forget_heads) * hd + len(partition.forget_units)
    removed = summary["params"]["forget"] + partition.joint_down_projections * cfg.num_layers * cfg.hidden_size * down
    assert summary["pruned"]["params_removed"] + summary["pruned"]["params_zeroed"] == removed
    units = pruned_config.intermediate_size if cfg.arch == "llama" else pruned_config.n_inner
    assert units == cfg.ffn_hidden_size - len(_partition(name).forget_units)
    if name in ("llama_gqa", "llama_joint_down"):  # 6 -> 4 heads divide hidden 48: the forget heads and group go
        assert summary["pruned"]["params_removed"] == removed
        assert pruned_config.num_attention_heads == cfg.num_attention_heads - len(_partition(name).forget_heads)
        assert pruned_config.num_key_value_heads == cfg.num_query_groups - len(_partition(name).forget_groups)
    else:  # GPT2Attention, or a head count transformers refuses: the heads stay, zero
        assert pruned_config.num_attention_heads == cfg.num_attention_heads
        assert summary["pruned"]["heads_zeroed"] == list(_partition(name).forget_heads)


@pytest.mark.parametrize("name", PARITY)
def test_ablated_export_differs_exactly_in_forget_region(native, exports, name):
    """Every ablated element is zero in the ablated export and every other element is bit-identical."""
    cfg, result = CASES[name][0], native[name]
    partition = _partition(name)
    masks = ablation_masks(cfg, partition)
    # The ablation rule agrees with the live model's regions: all of Θ_F, or its qkv/fc1 rows (routing).
    for key, mask in masks.items():
        forget = result["codes"][key] == 2
        if partition.strategy == "gradient_routing":
            assert not (mask & ~forget).any() and ("linear_qkv" in key or "linear_fc1" in key), key
        else:
            assert torch.equal(mask, forget), key
    assert partition.strategy == "gradient_routing" or sum(int(m.sum()) for m in masks.values()) == sum(
        int((c == 2).sum()) for c in result["codes"].values())

    bool_state = {k: masks.get(k, torch.zeros(shape, dtype=torch.bool)) for k, shape in native_shapes(cfg).items()}
    _, hf_masks = to_hf(bool_state, cfg)  # the same re-arrangement as the weights
    _, plain = read_hf_dir(exports[name]["plain"])
    _, ablated = read_hf_dir(exports[name]["ablated"])
    assert plain.keys() == ablated.keys() == hf_masks.keys()
    forget_elements = 0
    for key, mask in hf_masks.items():
        assert torch.equal(ablated[key][~mask], plain[key][~mask]), key
        assert (ablated[key][mask] == 0).all(), key
        assert (plain[key][mask] != 0).all(), key  # random weights: the diff is the whole region
        forget_elements += int(mask.sum())
    assert forget_elements == result["zeroed"] == summarize(cfg, partition)["ablated_params"]


@pytest.mark.parametrize("name", list(CASES))
def test_global_regions_and_ablate_state_match_the_live_model(native, name):
    """`global_regions`/`ablate_state`/`summarize` (no model) agree with `regions` on the real GPTModel."""
    cfg, result = CASES[name][0], native[name]
    partition = _partition(name)
    assert Partition.from_dict(result["partition"]) == partition
    assert {k: tuple(v.shape) for k, v in result["state"].items()} == native_shapes(cfg)
    code_of = {Region.JOINT: 0, Region.RETAIN: 1}
    for key, region in global_regions(cfg, partition).items():
        param = result["state"][key]
        expected = torch.full(param.shape, code_of.get(region.region, 1), dtype=torch.int8)
        expected[region.forget_mask(param)] = 2
        assert torch.equal(expected, result["codes"][key]), key
    ablated, zeroed = ablate_state(result["state"], cfg, partition)
    assert zeroed == result["zeroed"] > 0
    assert all(torch.equal(ablated[k], result["ablated_state"][k]) for k in result["state"]), name
    counts = summarize(cfg, partition)["params"]
    for label, code in (("joint", 0), ("retain", 1), ("forget", 2)):
        assert counts[label] == sum(int((c == code).sum()) for c in result["codes"].values()), label
    assert counts["total"] == sum(t.numel() for t in result["state"].values())


@pytest.mark.parametrize("name", PARITY)
def test_round_trip_is_exact(native, exports, name):
    """native -> HF dir -> native and HF -> native -> HF reproduce every tensor bit for bit."""
    cfg = CASES[name][0]
    config, hf_state = read_hf_dir(exports[name]["plain"])
    cfg_back, state_back = from_hf(hf_state, config)
    assert cfg_back == cfg
    assert state_back.keys() == native[name]["state"].keys()
    assert all(torch.equal(state_back[k], native[name]["state"][k]) for k in state_back)
    config_again, hf_again = to_hf(state_back, cfg_back)
    assert hf_again.keys() == hf_state.keys()
    assert all(torch.equal(hf_again[k], hf_state[k]) for k in hf_state)
    written = ("eos_token_id", "bos_token_id", "dtype", "transformers_version", "_name_or_path")  # set on disk
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in written}
    assert strip(config_again) == strip(config)


def test_generate_offline_with_tokenizer(exports, tokenizer_file):
    """from_pretrained + AutoTokenizer + generate, offline, on unpruned and pruned exports of both families."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tokenizer_file))
    eod = reference.token_to_id(EOD_TOKEN)
    for name, kind in (("llama_gqa", "plain"), ("llama_gqa", "pruned"), ("gpt2", "plain"), ("gpt2", "pruned")):
        directory = exports[name][kind]
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
        assert tok.eos_token == EOD_TOKEN and tok.eos_token_id == eod == model.generation_config.eos_token_id
        assert model.config.eos_token_id == eod
        text = "the cat sat"
        ids = tok(text, return_tensors="pt").input_ids
        assert ids[0].tolist() == reference.encode(text).ids
        out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert out.shape == (1, ids.shape[1] + 6) and torch.equal(out[0, : ids.shape[1]], ids[0])
        assert isinstance(tok.decode(out[0]), str)
        assert json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"] == (
            "PreTrainedTokenizerFast")


def test_bf16_and_sharded_exports(native, exports, tmp_path):
    """bf16 stores bf16 tensors (the fp32 values rounded) and loads as bf16; a sharded export reads back the same."""
    cfg = CASES["llama_gqa"][0]
    config, state = to_hf(native["llama_gqa"]["state"], cfg)
    directory = write_hf_dir(tmp_path / "bf16", config, state, "bf16")
    config_back, state_back = read_hf_dir(directory)
    assert config_back.dtype == torch.bfloat16 or config_back.dtype == "bfloat16"
    assert all(state_back[k].dtype == torch.bfloat16 and torch.equal(state_back[k], state[k].bfloat16())
               for k in state)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not (directory / "tokenizer.json").exists()

    sharded = write_hf_dir(tmp_path / "sharded", config, state, "fp32", max_shard_bytes=20_000)
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    _, state_sharded = read_hf_dir(sharded)
    assert all(torch.equal(state_sharded[k], state[k]) for k in state)
    diff = (_hf_logits(sharded, tokens_for(cfg)) - native["llama_gqa"]["logits"]).abs().max()
    assert diff <= TOL


def _model(**kw) -> ModelConfig:
    return ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=32, seq_length=8, **kw)


@pytest.mark.parametrize(
    "cfg, fields",
    [
        (_model(arch="gpt2", activation="swiglu"), ["model.activation='swiglu'"]),
        (_model(arch="llama", bias=True), ["model.bias=True"]),
        (_model(arch="gpt2", tie_embeddings=False), ["model.tie_embeddings=False"]),
        (_model(arch="gpt2", num_query_groups=1), ["model.num_query_groups=1"]),
        (_model(arch="llama", normalization="LayerNorm", position_embedding="learned_absolute"),
         ["model.normalization='LayerNorm'", "model.position_embedding='learned_absolute'"]),
    ],
)
def test_unsupported_architectures_are_refused(cfg, fields):
    with pytest.raises(ValueError, match="cannot convert to Hugging Face") as err:
        to_hf({}, cfg)
    assert all(field in str(err.value) for field in fields), str(err.value)


def test_refusals(native, exports, tokenizer_file, tmp_path):
    """Pruning a partly masked or unmasked model or an already pruned export; importing what the native model
    cannot represent; directories without safetensors; overwriting; a failed export leaves nothing behind."""
    cfg = CASES["llama_layer1"][0]
    config, state = to_hf(native["llama_layer1"]["state"], cfg)
    with pytest.raises(ValueError, match=r"layers \[0\] are not masked"):
        prune(config, state, _partition("llama_layer1"))
    with pytest.raises(ValueError, match="strategy='none'"):
        prune(config, state, SGTMConfig(strategy="none").resolve(cfg.dims()))
    pruned_config, pruned_state = read_hf_dir(exports["llama_gqa"]["pruned"])
    with pytest.raises(ValueError, match="already pruned"):
        prune(pruned_config, pruned_state, _partition("llama_gqa"))
    with pytest.raises(ValueError, match="head_dim"):
        from_hf(pruned_state, pruned_config)
    with pytest.raises(ValueError, match="activation_function='gelu_new'"):
        from_hf({}, GPT2Config(n_embd=16, n_head=2, n_layer=1))
    with pytest.raises(ValueError, match="missing"):
        to_hf({k: v for k, v in native["llama_layer1"]["state"].items() if "fc2" not in k}, cfg)
    with pytest.raises(ValueError, match="wrong shape"):  # a pruned state under the unpruned config
        write_hf_dir(tmp_path / "mismatch", read_hf_dir(exports["llama_gqa"]["plain"])[0], pruned_state)

    # Only safetensors are read: a pickle checkpoint is named and refused, not loaded.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    hf_config(cfg).save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"pickle weights \['pytorch_model.bin'\]"):
        read_hf_dir(pickled)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_hf_dir(tmp_path)

    with pytest.raises(FileExistsError):
        write_hf_dir(exports["llama_gqa"]["plain"], config, state)
    target = tmp_path / "failed"
    with pytest.raises(FileNotFoundError):  # no tokenizer there
        write_hf_dir(target, config, state, tokenizer_path=tmp_path / "no-tokenizer.json")
    with pytest.raises(ValueError, match="index past the embedding"):  # 280 tokens, vocab_size 97
        write_hf_dir(target, config, state, tokenizer_path=tokenizer_file)
    with pytest.raises(OSError):  # fails after the config and weights were written
        write_hf_dir(target, config, state, extra_files={"model.safetensors/x": "x"})
    replaced = write_hf_dir(tmp_path / "replace", config, state)
    with pytest.raises(OSError):  # a failed overwrite keeps the old export
        write_hf_dir(replaced, config, state, overwrite=True, extra_files={"model.safetensors/x": "x"})
    write_hf_dir(replaced, config, {k: v * 2 for k, v in state.items()}, overwrite=True)
    assert torch.equal(read_hf_dir(replaced)[1]["lm_head.weight"], 2 * state["lm_head.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pickled", "replace"]  # no partial directories
