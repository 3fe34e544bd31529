"""`attach_sgtm`: the one call that makes a user's GPTModel a complete SGTM model.

The SGTM layer spec masks the transformer layers; `mask_embeddings` also makes the embeddings Θ_R, which
needs a forward hook on the embedding (its gradient at F positions is dropped). A model with the spec but
without that hook would be half-SGTM: `param_regions` would call the embeddings Θ_R while F tokens still
train them. So `param_regions` (and through it every step-gating hook) asks `model_partition`, which refuses
such a model in one line.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_sgtm.core.labels import active_masks
from megatron_sgtm.core.layers.autograd import scale_grad
from megatron_sgtm.core.layers.linear import SGTMLinearMixin
from megatron_sgtm.core.partition import Partition
from megatron_sgtm.errors import UserError

# The embedding hook drops the lookup gradient at F positions; a tied word embedding is also the output layer, which
# every token updates (Θ_J), so that rule would hold only half-way.
TIED_MASK_EMBEDDINGS = ("sgtm.mask_embeddings=true needs untied embeddings (model.tie_embeddings=false; gpt2-style "
                        "models tie them): the tied matrix is also the output layer (Θ_J)")
# The attribute `attach_sgtm` sets on a model whose embedding-gradient mask it installed (the hook's handle).
MASK_ATTRIBUTE = "sgtm_embedding_mask"


class SGTMModelError(UserError, ValueError):
    """A model whose SGTM parts do not fit together (the message says which call fixes it)."""


def attach_sgtm(model: torch.nn.Module, partition: Partition | None) -> torch.nn.Module:
    """Complete a megatron-core `GPTModel` (this pipeline stage's chunk, built with
    `get_sgtm_layer_spec(partition)`) for SGTM: records `partition` as `model.sgtm_partition` and, when the
    partition masks embeddings, installs the embedding-gradient mask on the first pipeline stage (tied
    embeddings are refused). Idempotent; returns `model`."""
    layers = _layer_partition(model)
    if partition is not None and layers is not None and layers != partition:
        raise SGTMModelError("attach_sgtm: the model's SGTM layers were built with another partition than the one "
                             "given; pass the partition given to get_sgtm_layer_spec")
    attached = getattr(model, "sgtm_partition", None)
    if hasattr(model, "sgtm_partition") and attached != partition:
        raise SGTMModelError("attach_sgtm: the model is already attached to another partition")
    model.sgtm_partition = partition
    if (_masks_embeddings(partition) and getattr(model, "embedding", None) is not None
            and getattr(model, MASK_ATTRIBUTE, None) is None):
        setattr(model, MASK_ATTRIBUTE, _mask_embedding_gradients(model))
    return model


def model_partition(model: torch.nn.Module) -> Partition | None:
    """The partition of a model chunk (`attach_sgtm`'s, else its SGTM layers'); SGTMModelError if that partition
    masks embeddings that this chunk holds without the mask installed."""
    partition = getattr(model, "sgtm_partition", None) or _layer_partition(model)
    if (_masks_embeddings(partition) and getattr(model, "embedding", None) is not None
            and getattr(model, MASK_ATTRIBUTE, None) is None):
        raise SGTMModelError("the model's partition has mask_embeddings=True but its embedding-gradient mask is not "
                             "installed: call megatron_sgtm.attach_sgtm(model, partition) after building the GPTModel")
    return partition


def _masks_embeddings(partition: Partition | None) -> bool:
    return partition is not None and partition.active and partition.mask_embeddings


def _layer_partition(model: torch.nn.Module) -> Partition | None:
    """The partition the model's SGTM linears were built with (None without any)."""
    return next((m.partition for m in model.modules() if isinstance(m, SGTMLinearMixin)), None)


def _mask_embedding_gradients(gpt: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Θ_R embeddings: the gradient of the embedding output at F positions is dropped."""
    if getattr(gpt, "share_embeddings_and_output_weights", False):
        raise SGTMModelError(TIED_MASK_EMBEDDINGS)
    sequence_parallel = gpt.config.sequence_parallel

    def hook(_module, _inputs, output):
        masks = active_masks()
        if masks is None or not masks.any_forget:
            return output
        if sequence_parallel:  # the output is this rank's slice of the sequence
            masks = masks.seq_slice(parallel_state.get_tensor_model_parallel_rank(),
                                    parallel_state.get_tensor_model_parallel_world_size())
        return scale_grad(output, masks.not_forget.to(output.dtype))

    return gpt.embedding.register_forward_hook(hook)
