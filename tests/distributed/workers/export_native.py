"""Native side of the HF export tests: real megatron-core GPTModels (a world of one, gloo, CPU shims).

Run as ``python tests/distributed/workers/export_native.py OUT``. It lives in its own process because the CPU shims and
the process group are process-wide. For each case it saves to ``OUT/results.pt``: the random global state,
the region code of every element (0 = Θ_J, 1 = Θ_R, 2 = Θ_F, from `regions.param_regions`), the logits of
the live and of the zero-ablated model on fixed tokens, the ablated global state and `ablate`'s count.
Importing this module (for CASES) does nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_sgtm.core.partition import SGTMConfig
from megatron_sgtm.model import ModelConfig

SEQ, BATCH, TOKENIZER_VOCAB = 24, 2, 280

CASES: dict[str, tuple[ModelConfig, SGTMConfig]] = {
    # GQA (6 heads in 3 groups), odd vocab and ffn, non-default RoPE base; a non-contiguous forget set
    # (the middle query group) and masked embeddings.
    "llama_gqa": (
        ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=38,
                    vocab_size=301, seq_length=SEQ, arch="llama", rotary_base=5000),
        SGTMConfig(forget_heads=[2, 3], forget_mlp_units=[0, 17, 37], mask_embeddings=True),
    ),
    # joint down-projections: o_proj / down_proj stay unablated, pruning still removes the forget heads' and units'
    # lines of them (they multiply zeros after ablation).
    "llama_joint_down": (
        ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=38,
                    vocab_size=301, seq_length=SEQ, arch="llama"),
        SGTMConfig(forget_heads=[0, 1], forget_mlp_units=[5, 37], joint_down_projections=True),
    ),
    # 5 heads of 8, odd ffn and vocab; explicit non-contiguous heads and units.
    "gpt2": (
        ModelConfig(num_layers=2, hidden_size=40, num_attention_heads=5, ffn_hidden_size=70, vocab_size=299,
                    seq_length=SEQ, arch="gpt2"),
        SGTMConfig(forget_heads=[1, 4], forget_mlp_units=[0, 33, 69]),
    ),
    # masked embeddings need untied ones: word and learned position embeddings are Θ_R.
    "gpt2_untied": (
        ModelConfig(num_layers=2, hidden_size=40, num_attention_heads=5, ffn_hidden_size=70, vocab_size=299,
                    seq_length=SEQ, arch="gpt2", tie_embeddings=False),
        SGTMConfig(forget_heads=[1, 4], forget_mlp_units=[0, 33, 69], mask_embeddings=True),
    ),
    # gradient routing ablates only the forget rows of qkv/fc1 (with their biases).
    "gpt2_routing": (
        ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=56, vocab_size=290,
                    seq_length=SEQ, arch="gpt2"),
        SGTMConfig(strategy="gradient_routing", forget_heads=1, forget_mlp_units=5),
    ),
    # 6 heads minus 1 does not divide hidden 48: transformers' LlamaConfig refuses 5 heads, so the pruned
    # export keeps the forget head zeroed and removes only the units.
    "llama_kept_heads": (
        ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, ffn_hidden_size=40, vocab_size=300,
                    seq_length=SEQ, arch="llama"),
        SGTMConfig(forget_heads=[4], forget_mlp_units=[1, 2, 30]),
    ),
    # only layer 1 masked: ablation works, pruning must be refused.
    "llama_layer1": (
        ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=44, vocab_size=97,
                    seq_length=SEQ, arch="llama"),
        SGTMConfig(forget_heads=[0], forget_mlp_units=[3, 4], masked_layers=[1]),
    ),
}


def tokens_for(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (BATCH, cfg.seq_length), generator=torch.Generator().manual_seed(7))


def random_state(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, 1/fan_in), embeddings N(0, 1); norms 1 + N(0, 0.2) and biases N(0, 0.2), so that a
    swapped norm, bias, row or column changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if "layernorm" in name:
            out[name] = (1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise
        elif name.endswith("bias"):
            out[name] = 0.2 * noise
        elif "embedding" in name:
            out[name] = noise
        else:
            out[name] = noise / shape[1] ** 0.5
    return out


def main(out_dir: Path) -> None:
    from megatron.core import parallel_state

    from megatron_sgtm.core.regions import ablate, ablated, param_regions
    from megatron_sgtm.layout import gather_global, load_global
    from megatron_sgtm.model import build_gpt_model
    from megatron_sgtm.training.distributed import init_distributed

    init_distributed()
    parallel_state.initialize_model_parallel()
    results = {}
    for seed, (name, (cfg, sgtm)) in enumerate(CASES.items()):
        partition = sgtm.resolve(cfg.dims())
        model = build_gpt_model(cfg, cfg.transformer_config(on_gpu=False), partition).eval()
        load_global(model, random_state({k: v.shape for k, v in gather_global(model).items()}, seed))
        tokens = tokens_for(cfg)
        position_ids = torch.arange(cfg.seq_length).expand(BATCH, -1)

        def logits(model=model, tokens=tokens, position_ids=position_ids) -> torch.Tensor:
            """Plain causal attention (no document mask), as HF computes it."""
            with torch.no_grad():
                return model(tokens, position_ids, None).float()

        codes = {}
        regions = param_regions(model)
        for pname, param in model.named_parameters():
            region = regions[pname]
            codes[pname] = torch.where(region.forget_mask(param), 2, torch.where(region.retain_mask(param), 1, 0))
        result = {
            "partition": partition.to_dict(),
            "state": gather_global(model),
            "codes": {k: v.to(torch.int8) for k, v in gather_global(model, codes).items()},
            "logits": logits(),
        }
        with ablated(model):
            result["logits_ablated"] = logits()
            result["ablated_state"] = gather_global(model)
        result["zeroed"] = ablate(model)
        results[name] = result
    torch.save(results, out_dir / "results.pt")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
