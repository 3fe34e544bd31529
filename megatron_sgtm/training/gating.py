"""Step gating inside the sharded optimizers: AdamW that freezes a region on steps that skip it.

At a step where the *global* batch routed nothing to Θ_R (no R or U token), Θ_R's parameters and
Adam moments must stay bit-identical; likewise Θ_F when there is no F or U token. Masking the
gradient is not enough: momentum and weight decay would still move them. The reference does this
with two optimizers; here one `SGTMAdamW` carries a region code per element of each (flat, sharded)
parameter it updates, and each region keeps its own step count for Adam's bias correction, exactly
as split optimizers would. The engines map the partition's region maps onto the shards they own
(`region_codes_for_shard`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sgtm.labels import TokenLabel
from megatron_sgtm.regions import ParamRegion
from megatron_sgtm.strategy import Region


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


def step_metrics(loss_sum: float, tokens: float, grad_norm, lr: float, counts: torch.Tensor, gate: Gate) -> dict:
    """What every engine's `train_step` reports to the loop."""
    return {
        "loss": float(loss_sum) / max(tokens, 1.0),
        "tokens": tokens,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": lr,
        "label_counts": counts.tolist(),
        "gated_retain": gate.retain,
        "gated_forget": gate.forget,
    }


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


class SGTMAdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay) with SGTM step gating.

    `set_region_codes(param, codes)` registers the region of each element of a parameter this
    optimizer updates (its shard, for ZeRO optimizers); `gate` is set by the engine before each
    `step()`. Parameters without codes are all Θ_J and update on every step. Per-group counters
    ``sgtm_steps = [joint, retain, forget]`` give each region its own bias correction; they live
    in ``param_groups`` so every checkpoint format that saves the optimizer keeps them.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        self.gate = Gate()
        self._codes: dict[int, torch.Tensor] = {}

    def set_region_codes(self, param: torch.Tensor, codes: torch.Tensor | None) -> None:
        if codes is None:
            self._codes.pop(id(param), None)
            return
        if codes.shape != param.shape:
            raise ValueError(f"region codes of shape {tuple(codes.shape)} for a parameter of {tuple(param.shape)}")
        self._codes[id(param)] = codes.to(param.device)

    def init_state(self) -> None:
        """Empty state for every parameter, so a checkpoint can be loaded into it in place."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))

    @property
    def gated_elements(self) -> int:
        return sum(int(c.numel()) for c in self._codes.values())

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        gate = self.gate
        for group in self.param_groups:
            steps = group.setdefault("sgtm_steps", [0, 0, 0])
            steps[Region.JOINT] += 1
            steps[Region.RETAIN] += 0 if gate.retain else 1
            steps[Region.FORGET] += 0 if gate.forget else 1
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = torch.tensor(float(steps[Region.JOINT]))  # megatron's checkpoints read it
                codes = self._codes.get(id(p))
                _adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], codes, gate, steps,
                              lr, beta1, beta2, eps, wd)
        return loss


def _adamw_update(p, grad, exp_avg, exp_avg_sq, codes, gate: Gate, steps, lr, beta1, beta2, eps, wd) -> None:
    if codes is None:
        bc1, bc2 = 1 - beta1 ** steps[Region.JOINT], 1 - beta2 ** steps[Region.JOINT]
        p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq / bc2).sqrt_().add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / bc1)
        return
    # Per-element bias correction from each region's own step count (0-step regions are frozen).
    table = torch.tensor(steps, dtype=torch.float64)
    bc1 = (1 - beta1 ** table).to(p.dtype)[codes.long()]
    bc2 = (1 - beta2 ** table).to(p.dtype)[codes.long()]
    frozen = torch.zeros_like(codes, dtype=torch.bool)
    if gate.retain:
        frozen |= codes == Region.RETAIN
    if gate.forget:
        frozen |= codes == Region.FORGET
    new_avg = exp_avg.lerp(grad, 1 - beta1)
    new_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    new_p = p.mul(1 - lr * wd).sub_(lr * (new_avg / bc1) / ((new_avg_sq / bc2).sqrt_().add_(eps)))
    exp_avg.copy_(torch.where(frozen, exp_avg, new_avg))
    exp_avg_sq.copy_(torch.where(frozen, exp_avg_sq, new_avg_sq))
    p.copy_(torch.where(frozen, p, new_p))
