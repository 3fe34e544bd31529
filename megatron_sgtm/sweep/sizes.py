"""Model sizes for scaling sweeps: exact parameter counts, a recommended parallel layout, a token budget.

A size fixes the transformer's shape (layers, width, heads); the architecture, vocabulary and context
come from the sweep's base config, so the same table serves gpt2- and llama-style sweeps. Counts are
exact (`layout.native_shapes`, checked against built models in tests/unit/test_sweep.py), since the
token budget and the scaling plots are functions of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_sgtm.errors import UserError
from megatron_sgtm.layout import native_shapes
from megatron_sgtm.model import ARCHITECTURES, ModelConfig


@dataclass(frozen=True)
class Size:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # used where the architecture is llama-style (GQA); gpt2 is multi-head


# Nominal names are the gpt2-style totals at vocabulary 32768 and context 1024 (`megatron-sgtm sizes`
# prints the exact counts for any architecture, vocabulary and context). The tiny ones are for tests.
SIZES: dict[str, Size] = {
    "tiny-h32": Size(2, 32, 4, 2),
    "tiny-h64": Size(2, 64, 4, 2),
    "64M": Size(8, 640, 8, 4),
    "125M": Size(14, 768, 12, 6),
    "254M": Size(16, 1024, 16, 8),
    "500M": Size(24, 1280, 16, 8),
    "1B": Size(20, 2048, 16, 8),
    "2B": Size(24, 2560, 32, 16),
}

GATED_FFN_MULTIPLE = 128  # SwiGLU width: 8/3 of the hidden size (LLaMA's rule), rounded up to this


class SizeError(UserError, ValueError):
    """A size that is not in the table, or a layout that does not fit; the message says which."""


def model_config(size: str, base: dict) -> ModelConfig:
    """The `ModelConfig` of `size` with the base config's `model` section (arch, vocab, context, ...).

    The FFN width follows the activation: 4x hidden for GELU, 8/3x (rounded up to a multiple of
    128) for SwiGLU, so gated and ungated models of one size have about the same parameter count."""
    if size not in SIZES:
        raise SizeError(f"size {size!r} is not in the size table; known: {list(SIZES)}")
    s = SIZES[size]
    arch = base.get("arch", "gpt2")
    preset = ARCHITECTURES.get(arch, {})
    gated = (base.get("activation") or preset.get("activation")) == "swiglu"
    ffn = GATED_FFN_MULTIPLE * math.ceil(8 * s.hidden_size / 3 / GATED_FFN_MULTIPLE) if gated else 4 * s.hidden_size
    shape = dict(num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_attention_heads,
                 ffn_hidden_size=ffn,
                 num_query_groups=s.num_query_groups if arch == "llama" else s.num_attention_heads)
    return ModelConfig(**{**base, **shape})


@dataclass(frozen=True)
class ParamCount:
    total: int
    embedding: int  # word (and learned position) embeddings, and an untied output layer

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_parameters(m: ModelConfig) -> ParamCount:
    """Exact parameter count of the GPTModel built from `m` (TP=PP=1; tied weights counted once)."""
    numel = {name: math.prod(shape) for name, shape in native_shapes(m).items()}
    embedding = sum(n for name, n in numel.items() if name.startswith(("embedding.", "output_layer.")))
    return ParamCount(total=sum(numel.values()), embedding=embedding)


@dataclass(frozen=True)
class Layout:
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    memory_gib: float  # estimated peak per GPU

    def parallel(self) -> dict:
        """The `parallel` config section keys this layout sets."""
        return {"tensor_model_parallel_size": self.tensor_model_parallel_size,
                "pipeline_model_parallel_size": self.pipeline_model_parallel_size}


def estimate_memory_gib(m: ModelConfig, tp: int, pp: int, dp: int, micro_batch_size: int, bf16: bool = True) -> float:
    """Per-GPU training memory of the megatron engine: weights, fp32 gradient buffer, the distributed
    optimizer's fp32 master weights and Adam moments sharded over DP, and 1F1B activations
    (Korthikanti et al. 2022 without the attention-score term, which SDPA/flash attention do not keep:
    34·s·b·h bytes per layer in 16 bit; the first stage holds PP micro-batches of L/PP layers)."""
    params = count_parameters(m).total / (tp * pp)
    weight_bytes = 2 if bf16 else 4
    optimizer_bytes = (12 if bf16 else 8) / dp  # (master +) exp_avg + exp_avg_sq
    state = params * (weight_bytes + 4 + optimizer_bytes)
    act_scale = 1 if bf16 else 2
    tokens = m.seq_length * micro_batch_size
    activations = 34 * tokens * m.hidden_size * m.num_layers / tp * act_scale
    logits = 4 * tokens * m.vocab_size / tp * 2  # fp32 logits and their gradient on the last stage
    return (state + activations + logits) / 2**30


def _divides_model(m: ModelConfig, tp: int) -> bool:
    return m.num_query_groups % tp == 0 and m.ffn_hidden_size % tp == 0


def recommend_layout(m: ModelConfig, gpus: int, gpus_per_node: int, gpu_memory_gib: float,
                     micro_batch_size: int, bf16: bool = True, headroom: float = 0.85) -> Layout:
    """The smallest model-parallel degree (TP inside a node first, then PP) whose estimated memory
    fits `headroom` of a GPU: the rest of the GPUs go to data parallelism, which scales best."""
    candidates = []
    for tp in (1, 2, 4, 8):
        if tp > min(gpus, gpus_per_node) or gpus % tp or not _divides_model(m, tp):
            continue
        for pp in range(1, gpus // tp + 1):
            if (gpus // tp) % pp or m.num_layers % pp:
                continue
            dp = gpus // (tp * pp)
            memory = estimate_memory_gib(m, tp, pp, dp, micro_batch_size, bf16)
            candidates.append((tp * pp, pp, Layout(tp, pp, dp, memory)))
    fitting = [c for c in sorted(candidates, key=lambda c: c[:2]) if c[2].memory_gib <= headroom * gpu_memory_gib]
    if not fitting:
        smallest = min((c[2].memory_gib for c in candidates), default=float("nan"))
        raise SizeError(
            f"no TP x PP layout of {gpus} GPUs ({gpus_per_node} per node, {gpu_memory_gib:g} GiB each) fits a "
            f"{m.num_layers}-layer, hidden-{m.hidden_size} model at micro-batch {micro_batch_size} "
            f"(best estimate {smallest:.1f} GiB per GPU); use more GPUs or a smaller micro-batch"
        )
    return fitting[0][2]


@dataclass(frozen=True)
class Budget:
    """Compute-optimal token budget: tokens = coefficient x N^exponent, N the `params` count.

    Defaults are Chinchilla's rule of ~20 tokens per parameter (Hoffmann et al. 2022). `train_steps`
    fixes the step count instead (smoke tests, or budgets set by hand)."""

    coefficient: float = 20.0
    exponent: float = 1.0
    params: str = "total"  # total | non_embedding
    train_steps: int | None = None

    def __post_init__(self) -> None:
        if self.params not in ("total", "non_embedding"):
            raise SizeError(f"budget.params={self.params!r}: expected 'total' or 'non_embedding'")
        if self.coefficient <= 0 or self.exponent <= 0:
            raise SizeError(f"budget: coefficient and exponent must be positive (got {self.coefficient}, "
                            f"{self.exponent})")
        if self.train_steps is not None and self.train_steps < 1:
            raise SizeError(f"budget.train_steps={self.train_steps}: expected at least 1")

    def tokens(self, count: ParamCount) -> float:
        n = count.total if self.params == "total" else count.non_embedding
        return self.coefficient * n**self.exponent

    def steps(self, count: ParamCount, tokens_per_step: int) -> int:
        if self.train_steps is not None:
            return self.train_steps
        return max(1, math.ceil(self.tokens(count) / tokens_per_step))
