"""Model variants, strategies and layouts of the distributed SGTM layer tests (shared by worker and tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_sgtm.core.partition import SGTMConfig
from megatron_sgtm.model import ModelConfig
from tests.support import reference_gpt

SEQ, MBS = 16, 2
ALL_LAYOUTS = ((1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False), (2, 2, True))


@dataclass
class Case:
    name: str
    model: ModelConfig
    sgtm: SGTMConfig
    heads: tuple[int, ...]  # expected global forget heads
    units: tuple[int, ...]  # expected global forget units
    layouts: tuple = ALL_LAYOUTS
    layers: tuple[int, ...] = field(default=(0, 1))


def _model(**kw) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=SEQ, **kw)


CASES = [
    # gpt2: LayerNorm, GELU, learned positions, tied, biases; MHA; paper-default counts (last head/units).
    Case("gpt2_mha_gelu", _model(arch="gpt2", ffn_hidden_size=64), SGTMConfig(), heads=(3,), units=(62, 63)),
    # llama: RMSNorm, SwiGLU, RoPE, untied, no bias; GQA (2 groups of 2); masked embeddings.
    Case(
        "llama_gqa_swiglu",
        _model(arch="llama", num_query_groups=2, ffn_hidden_size=64),
        SGTMConfig(forget_heads=2, forget_mlp_units=4, mask_embeddings=True),
        heads=(2, 3),
        units=(60, 61, 62, 63),
    ),
    # GQA + SwiGLU with biases; explicit non-contiguous sets, forget group on TP rank 0.
    Case(
        "gpt2_gqa_swiglu_explicit",
        _model(arch="gpt2", num_query_groups=2, activation="swiglu", ffn_hidden_size=64),
        SGTMConfig(forget_heads=[0, 1], forget_mlp_units=[1, 5, 40, 63]),
        heads=(0, 1),
        units=(1, 5, 40, 63),
    ),
    # MHA + GELU without biases, untied, RoPE; only layer 1 masked, with masked embeddings (so at PP=2 the
    # first stage masks its embeddings without holding a masked layer).
    Case(
        "llama_mha_gelu_layer1",
        _model(arch="llama", activation="gelu", ffn_hidden_size=64),
        SGTMConfig(forget_heads=[1], forget_mlp_units=[0, 33], masked_layers=[1], mask_embeddings=True),
        heads=(1,),
        units=(0, 33),
        layers=(1,),
    ),
    # The joint down-projections variant: proj and fc2 (weights, biases) Θ_J; GELU and SwiGLU layers, biases.
    Case(
        "gpt2_joint_down",
        _model(arch="gpt2", num_query_groups=2, activation="swiglu", ffn_hidden_size=64),
        SGTMConfig(forget_heads=[2, 3], forget_mlp_units=[1, 5, 63], joint_down_projections=True),
        heads=(2, 3),
        units=(1, 5, 63),
        layouts=((1, 1, False), (2, 2, True)),
    ),
    Case(
        "gradient_routing",
        _model(arch="gpt2", ffn_hidden_size=64),
        SGTMConfig(strategy="gradient_routing"),
        heads=(3,),
        units=(62, 63),
        layouts=((1, 1, False), (2, 2, True)),
    ),
    Case(
        "activation_masking",
        _model(arch="gpt2", ffn_hidden_size=64),
        SGTMConfig(strategy="activation_masking"),
        heads=(3,),
        units=(62, 63),
        layouts=((1, 1, False), (2, 2, True)),
    ),
]


def layout_key(case: Case, layout) -> str:
    tp, pp, sp = layout
    return f"{case.name}/tp{tp}pp{pp}{'sp' if sp else ''}"


def random_global_state(shapes: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Large random weights (so every head/unit matters), norm gains near 1."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        noise = torch.randn(shapes[name].shape, generator=gen)
        norm = "layernorm" in name and name.endswith("weight")
        state[name] = 1.0 + 0.1 * noise if norm else 0.3 * noise
    return state


def _doc_mask(lengths: list[int]) -> torch.Tensor:
    """[1, s, s] True = masked: causal inside each document, nothing across documents."""
    s = sum(lengths)
    allowed = torch.zeros(s, s, dtype=torch.bool)
    start = 0
    for n in lengths:
        allowed[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    return ~allowed[None]


def make_batch(model: ModelConfig, seq: int, mbs: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Three micro-batches mixing whole-sequence labels and packed documents of different labels."""
    U, R, F = reference_gpt.U, reference_gpt.R, reference_gpt.FG
    rows = [
        [(R, [seq])], [(F, [seq])],
        [(U, [seq])], [((R, F, U), [5, 6, 5])],
        [((F, U, R), [4, 6, 6])], [(R, [seq])],
    ]
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(0, len(rows), mbs):
        labels, masks = [], []
        for row in rows[i:i + mbs]:
            (kinds, lengths), = row
            kinds = kinds if isinstance(kinds, tuple) else (kinds,)
            labels.append(torch.cat([torch.full((n,), k) for k, n in zip(kinds, lengths)]))
            masks.append(_doc_mask(lengths))
        batch.append({
            "tokens": torch.randint(0, model.vocab_size, (mbs, seq), generator=gen),
            "targets": torch.randint(0, model.vocab_size, (mbs, seq), generator=gen),
            "labels": torch.stack(labels),
            "attn_mask": torch.stack(masks),
            "position_ids": torch.arange(seq).expand(mbs, seq).contiguous(),
        })
    return batch


def masks_for(case: Case, state):
    return reference_gpt.forget_masks(
        state, case.model, case.heads, case.units, case.layers, case.sgtm.strategy, case.sgtm.mask_embeddings,
        case.sgtm.joint_down_projections,
    )


def perturb(state, mask, seed: int, split_only=None):
    """Add noise where `mask` holds (only in tensors that have forget elements, if `split_only`)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(state):
        noise = torch.randn(state[name].shape, generator=gen)
        where = mask[name] if split_only is None or split_only[name].any() else torch.zeros_like(mask[name])
        out[name] = torch.where(where, state[name] + noise, state[name])
    return out
