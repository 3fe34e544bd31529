"""SGTM submodules for megatron-core: masked linears, label context, layer specs."""

from megatron_sgtm.labels import active_masks, token_labels
from megatron_sgtm.layers.linear import SGTMColumnParallelLinear, SGTMLinearMixin, SGTMRowParallelLinear
from megatron_sgtm.layers.spec import get_sgtm_block_spec, get_sgtm_layer_spec

__all__ = [
    "SGTMColumnParallelLinear",
    "SGTMLinearMixin",
    "SGTMRowParallelLinear",
    "active_masks",
    "get_sgtm_block_spec",
    "get_sgtm_layer_spec",
    "token_labels",
]
