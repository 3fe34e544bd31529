"""Region maps (Θ_F / Θ_R / Θ_J of every local parameter element) and in-memory ablation.

Step gating (the optimizers) and ablation (here and in the exporters) read the same maps, so
"what is forget" is decided once, by the partition and the SGTM linears.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_sgtm.layers.linear import KINDS, SGTMLinearMixin

JOINT, RETAIN, SPLIT = "joint", "retain", "split"


@dataclass(frozen=True)
class ParamRegion:
    """A parameter's region: all Θ_J, all Θ_R, or split along `dim` by `forget_index` (Θ_F where True)."""

    region: str
    dim: int = 0
    forget_index: torch.Tensor | None = None

    def forget_mask(self, param: torch.Tensor) -> torch.Tensor:
        """Elementwise bool: True on Θ_F elements of `param` (this rank's shard)."""
        if self.region != SPLIT:
            return torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        shape = [1] * param.dim()
        shape[self.dim] = -1
        return self.forget_index.to(param.device).view(shape).expand(param.shape)

    def retain_mask(self, param: torch.Tensor) -> torch.Tensor:
        """Elementwise bool: True on Θ_R elements."""
        if self.region == JOINT:
            return torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        return ~self.forget_mask(param)


def sgtm_linears(model: torch.nn.Module):
    """The SGTM linears of masked layers (those with a forget index on this rank)."""
    for module in model.modules():
        if isinstance(module, SGTMLinearMixin) and module.forget_index is not None:
            yield module


def param_regions(model: torch.nn.Module) -> dict[str, ParamRegion]:
    """Region of every named parameter of this rank's model chunk."""
    special: dict[int, ParamRegion] = {}
    linears = list(sgtm_linears(model))
    for linear in linears:
        column = KINDS[linear.sgtm_kind] == "column"
        special[id(linear.weight)] = ParamRegion(SPLIT, 0 if column else 1, linear.forget_index)
        if linear.bias is not None:
            # Column-parallel biases follow their rows; the output bias of proj/fc2 is Θ_R.
            special[id(linear.bias)] = ParamRegion(SPLIT, 0, linear.forget_index) if column else ParamRegion(RETAIN)
    embedding = getattr(model, "embedding", None)
    # The model's own partition: a first pipeline stage without masked layers still masks its embeddings.
    partition = getattr(model, "sgtm_partition", None) or (linears[0].partition if linears else None)
    if partition is not None and partition.active and partition.mask_embeddings and embedding is not None:
        if not getattr(model, "share_embeddings_and_output_weights", False):
            # Tied embeddings are the output layer too, which is Θ_J.
            special[id(embedding.word_embeddings.weight)] = ParamRegion(RETAIN)
        if embedding.add_position_embedding:
            special[id(embedding.position_embeddings.weight)] = ParamRegion(RETAIN)
    return {name: special.get(id(p), ParamRegion(JOINT)) for name, p in model.named_parameters()}


@torch.no_grad()
def ablate(model: torch.nn.Module) -> int:
    """Zero the forget parameters in place; returns how many elements were zeroed on this rank.

    sgtm / activation masking / none: all of Θ_F (forget rows of qkv and fc1 with their bias entries,
    forget columns of proj and fc2). gradient routing: the forget rows of qkv and fc1 only.
    """
    zeroed = 0
    for linear in sgtm_linears(model):
        column = KINDS[linear.sgtm_kind] == "column"
        if linear.partition.strategy == "gradient_routing" and not column:
            continue
        params = [(linear.weight, 0 if column else 1)]
        if column and linear.bias is not None:
            params.append((linear.bias, 0))
        for param, dim in params:
            mask = ParamRegion(SPLIT, dim, linear.forget_index).forget_mask(param)
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
