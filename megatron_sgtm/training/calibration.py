"""The paper's logit calibration: a bias-only output layer fitted before losses are compared.

Zeroing Θ_F (or filtering data) also shifts the model's unigram statistics; the paper (authors'
`logit_calibration`) freezes the model, adds a per-vocabulary output bias b and fits it with AdamW (lr 1e-2
decaying linearly to 1e-3) on training batches of forget, adjacent and retain data, minimising
L_f + β·L_adj + α·L_ret (α = β = 100), one batch of each group per step. Only b changes, so one forward pass
per calibration micro-batch suffices: a hook caches the last stage's final hidden states (the output layer's
input) at loss-bearing positions, and every step recomputes this rank's vocabulary slice of the logits as
hidden @ W_localᵀ + b_local with megatron's vocab-parallel cross-entropy. The fit is deterministic (b starts
at 0, steps visit the micro-batches in their global order) and the same at every TP/PP/DP layout and on
both engines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, vocab_parallel_cross_entropy

from megatron_sgtm.training.engine import Engine

GROUPS = ("forget", "adjacent", "retain")


@dataclass
class Settings:
    """The fit's hyperparameters (train.calibration_*)."""

    steps: int = 200
    alpha: float = 100.0  # weight of L_ret
    beta: float = 100.0  # weight of L_adj
    lr: float = 1e-2

    @classmethod
    def of(cls, cfg) -> Settings:
        t = cfg.train
        return cls(t.calibration_steps, t.calibration_alpha, t.calibration_beta, t.calibration_lr)

    def weight(self, group: str) -> float:
        return {"forget": 1.0, "adjacent": self.beta, "retain": self.alpha}[group]


@dataclass
class Cache:
    """Per calibration micro-batch (in global order), the final hidden states [n, h] at loss-bearing positions
    and their targets [n]; the output layer's weight slice [vocab / TP, h]."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    weight: torch.Tensor | None = None


class OutputBias:
    """A forward hook on this rank's output layer (last pipeline stage): adds `value` (this rank's
    vocabulary slice of b) to the logits, and while `cache` is set records the layer's input there.
    Engines call `observe(inputs)` with each micro-batch's model inputs before its forward."""

    def __init__(self, model: torch.nn.Module):
        self.layer = model.output_layer if getattr(model, "post_process", False) else None
        self.value: torch.Tensor | None = None
        self.cache: Cache | None = None
        self._inputs: dict | None = None
        self._handles = [] if self.layer is None else [
            self.layer.register_forward_pre_hook(self._record, with_kwargs=True),
            self.layer.register_forward_hook(self._add),
        ]

    def observe(self, inputs: dict) -> None:
        self._inputs = inputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _record(self, module, args, kwargs):
        if self.cache is None:
            return
        hidden = (args[0] if args else kwargs["input_"]).detach()  # [s, b, h] ([s/TP, b, h] under SP)
        if getattr(module, "sequence_parallel", False):
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        weight = kwargs.get("weight")
        weight = module.weight if weight is None else weight
        if self.cache.weight is None:
            self.cache.weight = weight.detach().float().clone()
        keep = self._inputs["loss_mask"].t() > 0  # [b, s] -> [s, b], as the activations
        self.cache.hidden.append(hidden[keep].float().clone())
        self.cache.targets.append(self._inputs["targets"].t()[keep].long().clone())

    def _add(self, _module, _inputs, output):
        if self.value is None:
            return output
        logits, extra = output  # [s, b, vocab / TP]
        return logits + self.value.to(logits.dtype), extra


def _cache(engine: Engine, bias: OutputBias, batches: list[dict], ablate: bool) -> Cache:
    """One forward pass over this DP rank's `batches`; on the last stage, the cache of every DP rank's
    micro-batches in global order (micro-batch i of DP rank r is global i·DP + r)."""
    bias.cache = Cache()
    engine.evaluate(batches, ablate=ablate)
    local, bias.cache = bias.cache, None
    if bias.layer is None:
        return local
    shares: list = [None] * engine.dp_size
    dist.all_gather_object(shares, [(h.cpu(), t.cpu()) for h, t in zip(local.hidden, local.targets)],
                           group=engine.dp_group)
    device = local.weight.device
    out = Cache(weight=local.weight)
    for i in range(max(len(s) for s in shares)):
        for share in shares:
            if i < len(share) and len(share[i][1]):  # a micro-batch without loss-bearing tokens adds nothing
                out.hidden.append(share[i][0].to(device))
                out.targets.append(share[i][1].to(device))
    return out


def _group_loss(cache: Cache, index: int, bias: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of micro-batch `index` with the output bias (vocab-parallel over TP)."""
    logits = cache.hidden[index] @ cache.weight.t() + bias
    return vocab_parallel_cross_entropy(logits.unsqueeze(1), cache.targets[index].unsqueeze(1)).mean()


def fit(caches: dict[str, Cache], settings: Settings) -> tuple[torch.Tensor, list[float]]:
    """(this rank's slice of b, the objective at every step) by AdamW on the cached hidden states; step k
    uses micro-batch k mod n_g of every group g. Collective over the tensor-parallel group."""
    caches = {g: c for g, c in caches.items() if c.hidden}
    weight = next(iter(caches.values())).weight
    bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device, requires_grad=True)
    opt = torch.optim.AdamW([bias], lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1,
                                                 total_iters=max(settings.steps - 1, 1))
    history = []
    for step in range(settings.steps):
        opt.zero_grad()
        loss = sum(settings.weight(g) * _group_loss(c, step % len(c.hidden), bias) for g, c in caches.items())
        loss.backward()
        opt.step()
        schedule.step()
        history.append(float(loss.detach()))
    return bias.detach(), history


def objective(caches: dict[str, Cache], settings: Settings, bias: torch.Tensor) -> float:
    """L_f + β·L_adj + α·L_ret over every cached micro-batch (each group's mean of micro-batch means)."""
    with torch.no_grad():
        total = 0.0
        for group, cache in caches.items():
            if cache.hidden:
                losses = [float(_group_loss(cache, i, bias)) for i in range(len(cache.hidden))]
                total += settings.weight(group) * sum(losses) / len(losses)
    return total


@dataclass
class Calibration:
    """The fitted bias on this rank (None off the last stage) and the fit's objective per step."""

    bias: OutputBias
    history: list[float]
    caches: dict[str, Cache]


@contextlib.contextmanager
def calibrated(engine: Engine, batches: dict[str, list[dict]], settings: Settings, ablate: bool = True
               ) -> Iterator[Calibration]:
    """Within the block, the engine's evaluations (ablated when `ablate`, as fitted) include the output bias
    fitted on `batches` (this DP rank's training micro-batches per group of `GROUPS`; missing or empty groups
    are left out of the objective). Collective over the world."""
    bias = OutputBias(engine.model)
    engine.output_bias = bias
    try:
        caches = {g: _cache(engine, bias, batches[g], ablate) for g in GROUPS if batches.get(g)}
        history: list[float] = []
        if bias.layer is not None and any(c.hidden for c in caches.values()):
            bias.value, history = fit(caches, settings)
        yield Calibration(bias, history, caches)
    finally:
        bias.remove()
        engine.output_bias = None

