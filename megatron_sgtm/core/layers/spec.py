"""megatron-core ModuleSpecs with the SGTM linears swapped in (and the same specs without them).

With ``partition=None`` the spec is the identical plain megatron-core layer, which the benchmarks compare
against. Backends: ``local`` runs anywhere (SDPA core attention, torch norms); ``gpu`` uses Transformer
Engine's fused attention and norms where TE is installed, else SDPA core attention (megatron's own refuses
packed sequences) and apex norms when present. The four masked linears are megatron's local tensor-parallel
linears in both.
"""

from __future__ import annotations

import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_sgtm.core.layers.attention import SDPACoreAttention
from megatron_sgtm.core.layers.linear import SGTMColumnParallelLinear, SGTMLinearMixin, SGTMRowParallelLinear
from megatron_sgtm.core.layers.norm import SequenceParallelTorchNorm
from megatron_sgtm.core.partition import Partition
from megatron_sgtm.core.strategy import LINEARS

BACKENDS = ("local", "gpu")


class SGTMTransformerLayer(TransformerLayer):
    """A megatron `TransformerLayer` that tells its SGTM linears which (global) layer they are in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for module in self.modules():
            if isinstance(module, SGTMLinearMixin):
                module.bind_layer(self.layer_number - 1)


def _without_dense_masks(te_attention: type) -> type:
    """TE applies a boolean mask only for its padding/arbitrary mask types: under causal attention it would
    silently drop the dense document mask (and SGTM's isolation with it), so that input is refused; the
    packed path hands TE `PackedSeqParams` instead."""

    class TEDocumentAttention(te_attention):
        def forward(self, query, key, value, attention_mask, *args, **kwargs):
            if attention_mask is not None:
                raise NotImplementedError("Transformer Engine attention ignores a dense document mask under causal "
                                          "attention; use data.attention: packed (the default) on GPU")
            return super().forward(query, key, value, attention_mask, *args, **kwargs)

    return TEDocumentAttention


@functools.cache
def _gpu_modules() -> tuple[type, type]:
    """(core attention, norm) for the GPU backend: the fastest megatron offers on this install."""
    try:
        import transformer_engine  # noqa: F401  (megatron's TE wrappers import without it and fail when built)
        from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm

        return _without_dense_masks(TEDotProductAttention), TENorm
    except ImportError:
        pass
    try:
        import apex  # noqa: F401  (FusedLayerNorm needs apex's kernels)
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        return SDPACoreAttention, FusedLayerNorm
    except ImportError:
        return SDPACoreAttention, SequenceParallelTorchNorm


def _backend_modules(backend: str) -> tuple[type, type]:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    return (SDPACoreAttention, SequenceParallelTorchNorm) if backend == "local" else _gpu_modules()


def _linear(partition: Partition | None, kind: str) -> ModuleSpec | type:
    column = LINEARS[kind].column_parallel
    if partition is None:
        return ColumnParallelLinear if column else RowParallelLinear
    module = SGTMColumnParallelLinear if column else SGTMRowParallelLinear
    return ModuleSpec(module=module, params={"partition": partition, "sgtm_kind": kind})


def get_sgtm_layer_spec(partition: Partition | None, backend: str = "local") -> ModuleSpec:
    """`TransformerLayer` spec whose qkv/proj/fc1/fc2 are SGTM linears (plain ones if no partition)."""
    core_attention, norm = _backend_modules(backend)
    return ModuleSpec(
        module=TransformerLayer if partition is None else SGTMTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=_linear(partition, "qkv"),
                    core_attention=core_attention,
                    linear_proj=_linear(partition, "proj"),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=_linear(partition, "fc1"), linear_fc2=_linear(partition, "fc2")),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_sgtm_block_spec(config, partition: Partition | None, backend: str = "local", pp_rank=None) -> ModuleSpec:
    """The decoder block of this pipeline stage: SGTM layers and a final norm of the same backend."""
    layer = get_sgtm_layer_spec(partition, backend)
    _, norm = _backend_modules(backend)
    num_layers = get_num_layers_to_build(config, pp_rank=pp_rank)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm),
    )
