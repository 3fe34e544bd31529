"""Logit calibration of the ablated model: fit only an output bias before comparing losses.

Zeroing Θ_F also shifts the model's unigram statistics, which inflates every loss a little; the
paper fits a per-vocabulary output bias on retain data after ablation so that the forget/retain
comparison measures knowledge, not calibration. The bias b minimises the label-smoothed
cross-entropy on those tokens (smoothing keeps tokens absent from the calibration data finite):
its gradient is Σ_t softmax(z_t + b) − targets, with targets = (1 − ε)·counts + ε·N/V, and the
iterative-scaling update b += log(targets / Σ_t p_t) zeroes it. Each iteration is one forward pass
with a hook on the output layer, so it runs at any TP/PP/DP layout, on both engines, without
storing logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_sgtm.training.engine import Engine

SMOOTHING = 0.1  # ε of the label-smoothed objective
MAX_STEP = 4.0  # nats per iteration, so a badly calibrated start cannot overshoot


class OutputBias:
    """A bias added to this rank's (vocab-parallel) slice of the logits by a forward hook.

    Engines call `observe(loss_mask)` before each forward so that the hook can accumulate the
    expected token counts over the loss-bearing positions while `collecting`.
    """

    def __init__(self, model: torch.nn.Module):
        self.layer = model.output_layer if getattr(model, "post_process", False) else None
        self.value: torch.Tensor | None = None  # [vocab / TP], created at the first forward
        self.expected: torch.Tensor | None = None
        self.collecting = False
        self.residuals: list[float] = []
        self._mask: torch.Tensor | None = None
        self._handle = self.layer.register_forward_hook(self._hook) if self.layer is not None else None

    def observe(self, loss_mask: torch.Tensor) -> None:
        self._mask = loss_mask

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _hook(self, _module, _inputs, output):
        logits, extra = output  # [s, b, vocab / TP]; full sequence also under sequence parallelism
        if self.value is None:
            self.value = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
            self.expected = torch.zeros_like(self.value, dtype=torch.float64)
        logits = logits + self.value.to(logits.dtype)
        if self.collecting:
            self._accumulate(logits.detach().float())
        return logits, extra

    def _accumulate(self, logits: torch.Tensor) -> None:
        """Σ_t softmax over the whole (TP-sharded) vocabulary, at loss-bearing positions."""
        group = ps.get_tensor_model_parallel_group()
        peak = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - peak).exp()
        total = exp.sum(dim=-1, keepdim=True)
        dist.all_reduce(total, group=group)
        mask = self._mask.t().unsqueeze(-1).to(exp.dtype)  # [b, s] -> [s, b, 1]
        self.expected += (exp / total * mask).sum(dim=(0, 1)).double()


def target_counts(batches: list[dict], vocab_size: int) -> torch.Tensor:
    """Counts of each target token at loss-bearing positions of this DP rank's batches."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for mb in batches:
        keep = mb["loss_mask"].cpu() > 0
        counts += torch.bincount(mb["targets"].cpu()[keep].long(), minlength=vocab_size)[:vocab_size].double()
    return counts


@contextlib.contextmanager
def calibrated(engine: Engine, batches: list[dict], iterations: int) -> Iterator[OutputBias]:
    """Within the block, the engine's ablated evaluations include an output bias fitted on `batches`.

    Collective over the world: every rank runs the same forward passes. `OutputBias.residuals`
    records, per iteration, |Σ_t p_t − targets|₁ / N before the update (the fit's optimality gap).
    """
    bias = OutputBias(engine.model)
    engine.output_bias = bias
    try:
        counts = target_counts(batches, engine.cfg.model.vocab_size)
        dist.all_reduce(counts, group=engine.dp_group)
        tokens = float(counts.sum())
        targets = (1 - SMOOTHING) * counts + SMOOTHING * tokens / counts.numel()
        for _ in range(iterations):
            bias.collecting = True
            engine.evaluate(batches, ablate=True)
            bias.collecting = False
            if bias.layer is None:  # not the last pipeline stage: no logits here
                continue
            expected = bias.expected.cpu()
            dist.all_reduce(expected, group=engine.dp_group)
            local = _local_slice(targets, expected.numel())
            gap = (expected - local).abs().sum()
            dist.all_reduce(gap, group=ps.get_tensor_model_parallel_group())
            bias.residuals.append(float(gap) / max(tokens, 1.0))
            step = torch.log(local / expected.clamp_min(1e-30)).clamp(-MAX_STEP, MAX_STEP)
            bias.value += step.float().to(bias.value.device)
            bias.expected.zero_()
        yield bias
    finally:
        bias.remove()
        engine.output_bias = None


def _local_slice(values: torch.Tensor, local_vocab: int) -> torch.Tensor:
    rank = ps.get_tensor_model_parallel_rank()
    return values[rank * local_vocab:(rank + 1) * local_vocab]
