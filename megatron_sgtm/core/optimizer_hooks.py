"""The public step-gating hooks: put region codes into the optimizer that steps a user's model, and set each
step's gate.

`install_step_gating(optimizer, model)` dispatches on what it is given:
- a megatron-core `DistributedOptimizer` (also inside a `ChainedOptimizer`): each inner optimizer becomes an
  `SGTMAdamW` (taking over its param groups and state) with the region codes of the fp32 shards it steps;
- a DeepSpeed ZeRO-1/2/3 engine (`deepspeed.initialize`'s first result) whose client optimizer is a
  `ZeroSGTMAdamW`: the codes laid out as ZeRO lays out its flat fp32 partitions;
- an `SGTMAdamW` over the model's own parameters (plain torch training): the codes of each parameter.
Before each optimizer step, `set_step_gate(optimizers, step_gate(micro_batches))`. What reaches into
megatron's and DeepSpeed's internals is in `megatron_sgtm.compat`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from megatron_sgtm.compat.deepspeed import (
    full_shape,
    is_deepspeed_engine,
    layout_partitions,
    relink_optimizer_states,
    zero_optimizer,
)
from megatron_sgtm.compat.megatron_optimizer import Shard, is_megatron_optimizer, replace_inner_optimizers
from megatron_sgtm.core.gating import Gate, SGTMAdamW, ZeroSGTMAdamW, region_codes, region_codes_for_shard
from megatron_sgtm.core.regions import ParamRegion, param_regions
from megatron_sgtm.core.strategy import Region
from megatron_sgtm.errors import StepGatingError


def install_step_gating(optimizer, model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[SGTMAdamW]:
    """Make `optimizer` gate steps by the regions of `model` (this rank's GPTModel chunk, or a list of chunks;
    framework wrappers with `.module` are unwrapped); returns the gated optimizers whose `gate` is set before
    each step (`set_step_gate`). Call again after loading an optimizer checkpoint (ZeRO re-creates its state)."""
    chunks = [_unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
    regions = {id(p): r for chunk in chunks for p, r in zip(chunk.parameters(), param_regions(chunk).values())}
    if is_deepspeed_engine(optimizer):
        return [_install_zero(optimizer, chunks, regions)]
    if is_megatron_optimizer(optimizer):
        return _install_distributed(optimizer, regions)
    if isinstance(optimizer, SGTMAdamW):
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) in regions:
                    optimizer.set_region_codes(param, region_codes(regions[id(param)], param))
        return [optimizer]
    raise StepGatingError(f"install_step_gating: a {type(optimizer).__name__} cannot gate steps; build the "
                          "optimizer as megatron_sgtm.SGTMAdamW (ZeroSGTMAdamW under DeepSpeed), or use megatron's "
                          "DistributedOptimizer")


def set_step_gate(optimizers: Iterable[SGTMAdamW], gate: Gate) -> None:
    """The regions the next optimizer step leaves untouched, on every gated optimizer `install_step_gating`
    returned (set it before every step, also an ungated one: `Gate()`)."""
    for opt in optimizers:
        opt.gate = gate


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _install_distributed(optimizer, regions: dict[int, ParamRegion]) -> list[SGTMAdamW]:
    """Each DistributedOptimizer's inner optimizer becomes SGTMAdamW with the region codes of its shards."""

    def gated(inner: torch.optim.Optimizer, shards: list[Shard]) -> SGTMAdamW:
        hyper = {k: inner.defaults[k] for k in ("lr", "betas", "eps", "weight_decay") if k in inner.defaults}
        opt = SGTMAdamW([torch.nn.Parameter(torch.zeros(1))], **hyper)  # groups: the inner ones, taken over
        for model_param, shard_param, start, end in shards:
            if id(model_param) not in regions:
                raise StepGatingError("install_step_gating: the DistributedOptimizer steps parameters of another "
                                      "model than the one given; pass the model chunks it was built for")
            opt.set_region_codes(shard_param, region_codes_for_shard(regions[id(model_param)], model_param,
                                                                     start, end))
        return opt

    return replace_inner_optimizers(optimizer, gated)


def _install_zero(ds_engine, chunks: list[torch.nn.Module], regions: dict[int, ParamRegion]) -> ZeroSGTMAdamW:
    """The client ZeroSGTMAdamW gets the codes of the flat fp32 partitions this rank's ZeRO optimizer steps."""
    zero, stage = zero_optimizer(ds_engine)
    client = zero.optimizer
    if not isinstance(client, ZeroSGTMAdamW):
        raise StepGatingError(f"install_step_gating: DeepSpeed's client optimizer is a {type(client).__name__}; "
                              "pass megatron_sgtm.ZeroSGTMAdamW as deepspeed.initialize(optimizer=...)")
    codes: dict[int, torch.Tensor] = {}
    for chunk in chunks:
        for param in chunk.parameters():
            own = region_codes(regions[id(param)], torch.empty(full_shape(param), dtype=torch.uint8))
            if own is not None:
                codes[id(param)] = own.reshape(-1)

    def values(param: torch.nn.Parameter, numel: int) -> torch.Tensor:
        own = codes.get(id(param))
        return torch.full((numel,), Region.JOINT, dtype=torch.uint8) if own is None else own

    for fp32, laid in layout_partitions(ds_engine, values, torch.uint8, fill=Region.JOINT):
        client.set_region_codes(fp32, laid.to(fp32.device) if bool((laid != Region.JOINT).any()) else None)
        state = client.state[fp32]
        if not state:  # eager Adam state, for ZeRO-1/2 to link (below) before any step
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(fp32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(fp32, memory_format=torch.preserve_format)
    if stage in (1, 2):
        relink_optimizer_states(zero)
    return client
