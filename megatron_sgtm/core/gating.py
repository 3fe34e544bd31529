"""Step gating inside the sharded optimizers: AdamW that freezes a region on steps that skip it.

At a step where the *global* batch routed nothing to Θ_R (no R or U token), Θ_R's parameters and
Adam moments must stay bit-identical; likewise Θ_F when there is no F or U token. Masking the
gradient is not enough: momentum and weight decay would still move them. The reference does this
with two optimizers; here one `SGTMAdamW` knows the region of every element of each (flat, sharded)
parameter it updates, and each region keeps its own step count for Adam's bias correction, exactly
as split optimizers would. The engines map the partition's region maps onto the shards they own
(`region_codes_for_shard`); the optimizer turns those per-element codes into `Block`s once, because
regions are whole rows or columns of a weight: a block is a contiguous range of the flat shard, or a
strided 2-D view of it (a column range repeated over the rows a shard covers). A step is then torch's
own AdamW (fused, foreach for strided views) over whole parameters while every region has the same step count;
once they differ, an ungated step updates weight decay and moments over whole tensors and only the
bias-corrected update per region's views, and a gated step runs AdamW over the ungated regions' views
at their own counts: a gated region is not touched and no full-size temporary is made.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

from megatron_sgtm.core.collectives import all_reduce_host
from megatron_sgtm.core.labels import TokenLabel
from megatron_sgtm.core.regions import ParamRegion
from megatron_sgtm.core.strategy import Region, strategy_of

# The devices of torch's fused AdamW kernel that this project runs on (CPU has one since torch 2.4).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class Gate:
    """Which regions this optimizer step leaves untouched."""

    retain: bool = False
    forget: bool = False

    @classmethod
    def from_label_counts(cls, counts: torch.Tensor) -> Gate:
        """`counts[label]` = number of loss-bearing tokens of that label in the *global* batch."""
        u, r, f = (int(counts[i]) for i in (TokenLabel.UNLABELED, TokenLabel.RETAIN, TokenLabel.FORGET))
        return cls(retain=r + u == 0, forget=f + u == 0)


@dataclass(frozen=True)
class StepCounts:
    """A step's global batch: loss-bearing tokens per label (`counts[label]`, U/R/F) and the loss-mask sum."""

    counts: torch.Tensor
    loss_weight: float

    def gate(self, strategy: str = "sgtm") -> Gate:
        """The regions the step leaves untouched under `strategy` (none for strategies that do not gate steps)."""
        return Gate.from_label_counts(self.counts) if strategy_of(strategy).gates_steps else Gate()


def step_counts(micro_batches: Iterable[dict], group: dist.ProcessGroup | None = None) -> StepCounts:
    """Count the `token_labels` of every micro-batch's loss-bearing tokens (`loss_mask` > 0) and all-reduce the
    counts over the data-parallel `group`: None means megatron's data-parallel group when its parallel state is
    initialised, else the default group; without torch.distributed, this process's batch is the global one.
    Every DP rank passes its own micro-batches of the step; tensor/pipeline-parallel peers pass the same ones."""
    stats = torch.zeros(4, dtype=torch.float64)
    for mb in micro_batches:
        labels, loss_mask = mb["token_labels"].cpu(), mb["loss_mask"].cpu()
        stats[:3] += torch.bincount(labels[loss_mask > 0].long(), minlength=3)[:3].double()
        stats[3] += loss_mask.double().sum()
    if dist.is_available() and dist.is_initialized():
        group = _data_parallel_group() if group is None else group
        stats = all_reduce_host(stats, group=group)
    return StepCounts(stats[:3], float(stats[3]))


def step_gate(micro_batches: Iterable[dict], group: dist.ProcessGroup | None = None,
              strategy: str = "sgtm") -> Gate:
    """The gate of one optimizer step from all its micro-batches (see `step_counts`), to set on the optimizers
    (`set_step_gate`) before their `step()`."""
    return step_counts(micro_batches, group).gate(strategy)


def _data_parallel_group() -> dist.ProcessGroup | None:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None


def region_codes(region: ParamRegion, param: torch.Tensor) -> torch.Tensor | None:
    """uint8 codes (joint/retain/forget) for every element of `param`; None if all joint."""
    if region.region == Region.JOINT:
        return None
    codes = torch.full(param.shape, Region.RETAIN, dtype=torch.uint8, device=param.device)
    codes[region.forget_mask(param)] = Region.FORGET
    return codes


def region_codes_for_shard(
    region: ParamRegion, param: torch.Tensor, start: int, end: int
) -> torch.Tensor | None:
    """Codes of elements [start, end) of the flattened `param`: what a ZeRO shard of it holds."""
    codes = region_codes(region, param)
    return None if codes is None else codes.reshape(-1)[start:end].clone()


@dataclass(frozen=True)
class Block:
    """`rows` runs of `cols` elements of a flat (contiguous) tensor, `stride` elements apart, from `offset`."""

    offset: int
    rows: int
    cols: int
    stride: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This block of a contiguous `tensor` (see `_contiguous`)."""
        base = tensor.storage_offset() + self.offset
        if self.rows == 1:
            return tensor.as_strided((self.cols,), (1,), base)
        return tensor.as_strided((self.rows, self.cols), (self.stride, 1), base)


def region_blocks(codes: torch.Tensor) -> dict[Region, list[Block]]:
    """The elements of each region in the flattened `codes`, as few blocks as the runs' regularity allows."""
    flat = codes.reshape(-1).cpu()
    bounds = [0, *((flat[1:] != flat[:-1]).nonzero().squeeze(1) + 1).tolist(), flat.numel()]
    blocks: dict[Region, list[Block]] = {}
    for start, end, code in zip(bounds[:-1], bounds[1:], flat[bounds[:-1]].tolist()):
        own = blocks.setdefault(Region(code), [])
        last = own[-1] if own else None
        if last is not None and end - start == last.cols:
            stride = start - last.offset if last.rows == 1 else last.stride
            if start == last.offset + last.rows * stride:
                own[-1] = Block(last.offset, last.rows + 1, last.cols, stride)
                continue
        own.append(Block(start, 1, end - start, end - start))
    return blocks


class SGTMAdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay) with SGTM step gating.

    `set_region_codes(param, codes)` registers the region of each element of a parameter this
    optimizer updates (its shard, for ZeRO optimizers); `gate` is set by the engine before each
    `step()`. Parameters without codes are all Θ_J and update on every step. Per-group counters
    ``sgtm_steps = [joint, retain, forget]`` give each region its own bias correction; they live
    in ``param_groups`` so every checkpoint format that saves the optimizer keeps them.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.gate = Gate()
        self._blocks: dict[int, dict[Region, list[Block]]] = {}
        self._state_views: dict[int, tuple] = {}  # id(param) -> (data pointers, views of param and moments)

    def set_region_codes(self, param: torch.Tensor, codes: torch.Tensor | None) -> None:
        self._state_views.pop(id(param), None)
        if codes is None:
            self._blocks.pop(id(param), None)
            return
        if codes.shape != param.shape:
            raise ValueError(f"region codes of shape {tuple(codes.shape)} for a parameter of {tuple(param.shape)}")
        self._blocks[id(param)] = region_blocks(codes)

    def codes_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The region codes registered for `param`, rebuilt from its blocks; None if it has none."""
        blocks = self._blocks.get(id(param))
        if blocks is None:
            return None
        codes = torch.full(param.shape, Region.JOINT, dtype=torch.uint8, device=param.device)
        for region, own in blocks.items():
            for block in own:
                block.view(codes).fill_(region)
        return codes

    def init_state(self) -> None:
        """Empty state for every parameter, so a checkpoint can be loaded into it in place."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))

    @property
    def gated_elements(self) -> int:
        """Elements of registered parameters outside Θ_J."""
        return sum(b.numel for blocks in self._blocks.values() for region, own in blocks.items()
                   if region != Region.JOINT for b in own)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        gate = self.gate
        for group in self.param_groups:
            steps = group.setdefault("sgtm_steps", [0, 0, 0])
            steps[Region.JOINT] += 1
            steps[Region.RETAIN] += 0 if gate.retain else 1
            steps[Region.FORGET] += 0 if gate.forget else 1
            tensors = []
            step = torch.tensor(float(steps[Region.JOINT]))  # every state's "step" (megatron's checkpoints read it)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = step
                tensors.append((p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
            if len(set(steps)) == 1:  # no region was ever gated: plain AdamW
                _adamw(tensors, steps[Region.JOINT], group)
            elif not (gate.retain or gate.forget):
                _adamw_region_bias_correction(tensors, self._region_views(tensors), steps, group)
            else:
                for region, own in self._region_views(tensors).items():
                    if not ((region == Region.RETAIN and gate.retain) or (region == Region.FORGET and gate.forget)):
                        _adamw(own, steps[region], group)
        return loss

    def _region_views(self, tensors: list[tuple[torch.Tensor, ...]]) -> dict[Region, list[tuple[torch.Tensor, ...]]]:
        """(param, grad, exp_avg, exp_avg_sq) of each region's elements: whole tensors (all Θ_J) or block views.
        The views of a parameter and its moments are kept while their storage is; a gradient's are made per step
        (keeping them would keep gradients alive that ZeRO frees)."""
        views: dict[Region, list[tuple[torch.Tensor, ...]]] = {region: [] for region in Region}
        for ts in tensors:
            param, grad, avg, sq = ts
            blocks = self._blocks.get(id(param))
            if blocks is None:
                views[Region.JOINT].append(ts)
                continue
            key = tuple(_contiguous(t).data_ptr() for t in (param, avg, sq))
            cached = self._state_views.get(id(param))
            if cached is None or cached[0] != key:
                cached = key, {region: [tuple(b.view(t) for t in (param, avg, sq)) for b in own]
                               for region, own in blocks.items()}
                self._state_views[id(param)] = cached
            _contiguous(grad)
            for region, own in blocks.items():
                views[region].extend((p, block.view(grad), a, q) for block, (p, a, q) in zip(own, cached[1][region]))
        return views


class ZeroSGTMAdamW(SGTMAdamW):
    """SGTMAdamW as DeepSpeed ZeRO's client optimizer (`deepspeed.initialize(optimizer=...)`): DeepSpeed calls its
    `step()` several times per optimizer step.

    ZeRO-1/2 step each param group separately; ZeRO-3 steps each sub-group with the other groups' `params`
    emptied. The per-region step counters of a group must advance once per *engine* step, so setting `gate`
    (before every `engine.step()` that steps, see `set_step_gate`) opens a step, and a call that finds a group
    empty or already advanced in this step leaves its counters where they were.
    """

    @property
    def gate(self) -> Gate:
        return self._gate

    @gate.setter
    def gate(self, gate: Gate) -> None:
        self._gate = gate
        self._advanced: set[int] = set()

    @torch.no_grad()
    def step(self, closure=None):
        gate = self.gate
        increment = [1, 0 if gate.retain else 1, 0 if gate.forget else 1]
        for group in self.param_groups:
            steps = group.setdefault("sgtm_steps", [0, 0, 0])
            key = id(group)
            if not group["params"] or key in self._advanced:
                # SGTMAdamW.step adds `increment`; pre-subtract it so this call does not advance.
                for code in (Region.JOINT, Region.RETAIN, Region.FORGET):
                    steps[code] -= increment[code]
            else:
                self._advanced.add(key)
        return super().step(closure)


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise RuntimeError(f"step gating needs contiguous parameters, gradients and moments; got strides "
                           f"{tensor.stride()} for shape {tuple(tensor.shape)}")
    return tensor


def _adamw(tensors: list[tuple[torch.Tensor, ...]], step: int, group: dict) -> None:
    """torch's AdamW update of (param, grad, exp_avg, exp_avg_sq) tuples that share the step count `step`:
    torch's fused kernel for dense tensors on CUDA and CPU (`FUSED_ADAMW_DEVICES`), foreach for
    the rest (strided block views)."""
    if not tensors:
        return
    fused_device = tensors[0][0].device.type in FUSED_ADAMW_DEVICES
    fusable = [fused_device and all(t.is_contiguous() for t in ts) for ts in tensors]
    for fused in (True, False):
        batch = [ts for ts, f in zip(tensors, fusable) if f == fused]
        if not batch:
            continue
        params, grads, avgs, sqs = (list(ts) for ts in zip(*batch))
        # Fresh per-tensor counters at step - 1 (adamw advances each by one): the fused kernel reads them on
        # the device, foreach on the host.
        counters = torch.full((len(params),), float(step - 1), device=params[0].device if fused else "cpu")
        beta1, beta2 = group["betas"]
        adamw(params, grads, avgs, sqs, [], list(counters.unbind(0)), foreach=not fused, fused=fused,
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False)


def _adamw_region_bias_correction(tensors: list[tuple[torch.Tensor, ...]],
                                  views: dict[Region, list[tuple[torch.Tensor, ...]]], steps: list[int],
                                  group: dict) -> None:
    """An ungated step with regions at different step counts: torch's foreach AdamW, operation for operation,
    with weight decay and moments over whole tensors and only the bias-corrected update per region's views."""
    if not tensors:
        return
    params, grads, avgs, sqs = (list(ts) for ts in zip(*tensors))
    lr, eps, (beta1, beta2) = group["lr"], group["eps"], group["betas"]
    torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
    torch._foreach_lerp_(avgs, grads, 1 - beta1)
    torch._foreach_mul_(sqs, beta2)
    torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
    for region, own in views.items():
        if not own:
            continue
        region_params, _, region_avgs, region_sqs = (list(ts) for ts in zip(*own))
        denom = torch._foreach_sqrt(region_sqs)
        torch._foreach_div_(denom, (1 - beta2 ** steps[region]) ** 0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(region_params, region_avgs, denom, -lr / (1 - beta1 ** steps[region]))
