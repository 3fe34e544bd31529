"""Region maps (Θ_F / Θ_R / Θ_J of every local parameter element) and in-memory ablation.

Step gating (the optimizers) and ablation (here and in the exporters) read the same maps, so
"what is forget" is decided once: `linear_regions` and `masked_embeddings` state the rule, which
`param_regions` applies to a live model chunk and `export.prune.global_regions` to global names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_sgtm.core.layers.linear import SGTMLinearMixin
from megatron_sgtm.core.model_hooks import model_partition
from megatron_sgtm.core.partition import Partition
from megatron_sgtm.core.strategy import LINEARS, LinearKind, Region


@dataclass(frozen=True)
class ParamRegion:
    """A parameter's region: all Θ_J, all Θ_R, or Θ_R split along `dim` by `forget_index` (Θ_F where True)."""

    region: Region  # JOINT or RETAIN: that of every element `forget_index` does not mark
    dim: int = 0
    forget_index: torch.Tensor | None = None

    @property
    def split(self) -> bool:
        return self.forget_index is not None

    def forget_mask(self, param: torch.Tensor) -> torch.Tensor:
        """Elementwise bool: True on Θ_F elements of `param` (this rank's shard)."""
        if not self.split:
            return torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        shape = [1] * param.dim()
        shape[self.dim] = -1
        return self.forget_index.to(param.device).view(shape).expand(param.shape)

    def retain_mask(self, param: torch.Tensor) -> torch.Tensor:
        """Elementwise bool: True on Θ_R elements."""
        if self.region == Region.JOINT:
            return torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        return ~self.forget_mask(param)

    def forget_numel(self, shape: torch.Size | tuple[int, ...]) -> int:
        """How many elements of a tensor of `shape` are Θ_F."""
        if not self.split:
            return 0
        return int(self.forget_index.sum()) * torch.Size(shape).numel() // len(self.forget_index)


def linear_regions(
    partition: Partition, kind: LinearKind, forget_index: torch.Tensor, has_bias: bool
) -> tuple[ParamRegion, ParamRegion | None]:
    """(weight, bias) regions of a masked layer's linear: Θ_F lines along `kind.forget_dim`, the rest Θ_R, or all
    Θ_J where the partition does not split `kind` (`Partition.splits`); bias None without one."""
    if not partition.splits(kind):
        return ParamRegion(Region.JOINT), ParamRegion(Region.JOINT) if has_bias else None
    bias = ParamRegion(Region.RETAIN, 0, forget_index) if kind.column_parallel else ParamRegion(Region.RETAIN)
    return ParamRegion(Region.RETAIN, kind.forget_dim, forget_index), bias if has_bias else None


def masked_embeddings(partition: Partition | None, tied: bool, position: bool) -> tuple[str, ...]:
    """The Θ_R embeddings (submodules of the embedding) of `mask_embeddings`. It needs untied embeddings: config
    loading and `attach_sgtm` refuse a tied model (its word embedding is the output layer too, Θ_J).
    A tied checkpoint written before that refusal keeps its word embeddings Θ_J, as its optimizer treated them."""
    if partition is None or not partition.active or not partition.mask_embeddings:
        return ()
    names = ("position_embeddings",) if position else ()
    return names if tied else ("word_embeddings", *names)


def sgtm_linears(model: torch.nn.Module):
    """The SGTM linears of masked layers (those with a forget index on this rank)."""
    for module in model.modules():
        if isinstance(module, SGTMLinearMixin) and module.forget_index is not None:
            yield module


def _linear_regions(linear: SGTMLinearMixin) -> tuple[ParamRegion, ParamRegion | None]:
    return linear_regions(linear.partition, LINEARS[linear.sgtm_kind], linear.forget_index, linear.bias is not None)


def param_regions(model: torch.nn.Module) -> dict[str, ParamRegion]:
    """Region of every named parameter of this rank's model chunk."""
    special: dict[int, ParamRegion] = {}
    linears = list(sgtm_linears(model))
    for linear in linears:
        for param, region in zip((linear.weight, linear.bias), _linear_regions(linear)):
            if param is not None:
                special[id(param)] = region
    embedding = getattr(model, "embedding", None)
    # The model's own partition: a first pipeline stage without masked layers still masks its embeddings.
    partition = model_partition(model)
    if embedding is not None:
        tied = getattr(model, "share_embeddings_and_output_weights", False)
        for name in masked_embeddings(partition, tied, embedding.add_position_embedding):
            special[id(getattr(embedding, name).weight)] = ParamRegion(Region.RETAIN)
    return {name: special.get(id(p), ParamRegion(Region.JOINT)) for name, p in model.named_parameters()}


@torch.no_grad()
def ablate(model: torch.nn.Module) -> int:
    """Zero the forget parameters in place; returns how many elements were zeroed on this rank.

    Θ_F of the linears of the strategy's `ablated_kinds`: all of Θ_F (forget rows of qkv and fc1 with
    their bias entries, forget columns of proj and fc2) but for gradient routing's qkv and fc1 only. With
    joint down-projections proj and fc2 have no Θ_F: the forget heads' and units' zero outputs silence them.
    """
    zeroed = 0
    for linear in sgtm_linears(model):
        if linear.sgtm_kind not in linear.rules.ablated_kinds:
            continue
        for param, region in zip((linear.weight, linear.bias), _linear_regions(linear)):
            if region is not None and region.split:
                mask = region.forget_mask(param)
                param.masked_fill_(mask, 0.0)
                zeroed += int(mask.sum())
    return zeroed


@contextlib.contextmanager
def ablated(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate the ablated model without losing the live one: ablate in place, restore on exit."""
    saved = [(p, p.detach().clone()) for linear in sgtm_linears(model) for p in (linear.weight, linear.bias)
             if p is not None]
    ablate(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)
