"""megatron-core 0.16 DistributedOptimizer surgery: a gated inner optimizer, and loading reshardable state."""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_sgtm.compat import require
from megatron_sgtm.errors import StepGatingError

KNOWN = ("0.16",)

# (model parameter, the fp32 shard of it this rank's inner optimizer steps, [start, end) of the flat parameter)
Shard = tuple[torch.nn.Parameter, torch.Tensor, int, int]


def _distributed_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_megatron_optimizer(optimizer) -> bool:
    """Whether `optimizer` is one of megatron-core's optimizer wrappers (without importing megatron-core)."""
    return any(c.__module__.startswith("megatron.core.optimizer") for c in type(optimizer).__mro__)


def distributed_optimizers(optimizer) -> list:
    """The `DistributedOptimizer`s of a megatron optimizer (itself, or those a `ChainedOptimizer` chains); a
    one-line error for any other megatron optimizer (its inner optimizer steps unsharded model copies)."""
    require("megatron-core", KNOWN, "distributed_optimizers")
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    found = _distributed_optimizers(optimizer)
    for opt in found:
        if not isinstance(opt, DistributedOptimizer):
            raise StepGatingError(f"step gating of megatron optimizers needs the DistributedOptimizer "
                             f"(OptimizerConfig.use_distributed_optimizer=True); got {type(opt).__name__}")
    return found


def replace_inner_optimizers(optimizer, make_inner: Callable[[torch.optim.Optimizer, list[Shard]],
                                                             torch.optim.Optimizer]) -> list:
    """Swap each DistributedOptimizer's inner optimizer for `make_inner(the inner one, its shards)`, which takes over
    the inner one's param groups and state; returns the new inner optimizers."""
    installed = []
    for dist_opt in distributed_optimizers(optimizer):
        pairs = [
            *zip(dist_opt.model_float16_groups, dist_opt.shard_fp32_from_float16_groups),
            *zip(dist_opt.model_fp32_groups, dist_opt.shard_fp32_groups),
        ]
        shards = []
        for model_group, shard_group in pairs:
            for model_param, shard_param in zip(model_group, shard_group):
                span = dist_opt._get_model_param_range_map(model_param)["param"]
                shards.append((model_param, shard_param, span.start, span.end))
        inner = dist_opt.optimizer
        new = make_inner(inner, shards)
        # The shard params are views megatron swapped in past add_param_group; take its groups as is.
        new.param_groups = inner.param_groups
        new.state = inner.state
        dist_opt.optimizer = new
        installed.append(new)
    return installed


def load_fully_reshardable(optimizer, state: dict) -> None:
    """Load the optimizer part of a ``fully_reshardable`` distributed checkpoint.

    megatron 0.16's torch-Adam path describes the inner state through a per-parameter 'step'
    but then copies every per-parameter entry from the checkpoint, which stores no 'step'; so
    the non-tensor state is loaded first and the reshardable parameter state without 'step'.
    """
    require("megatron-core", KNOWN, "load_fully_reshardable")
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    optimizer.load_state_dict(state)
    (dist_opt,) = _distributed_optimizers(optimizer)
    steps = {p: s.pop("step") for p, s in dist_opt.optimizer.state.items() if "step" in s}
    dist_opt.load_parameter_state_from_fully_reshardable(param_state)
    for param, step in steps.items():
        dist_opt.optimizer.state[param]["step"] = step
