"""SGTM versions of megatron's column- and row-parallel linears (extended at `_forward_impl`).

Each of the four linears of a masked layer knows which of its rows (qkv, fc1) or columns (proj,
fc2) are Θ_F on this TP rank. With labels active, the partition's `Strategy` decides:
- every active strategy applies the retain-forward rule at the row-parallel inputs (forget heads'
  context and forget units' activations are zero at R positions); `retain_at_forget` says what the
  retain ones do at F positions (kept, zeroed, or kept without gradient);
- `masks_gradients`: the weight and bias gradients follow SGTM's rule (`MaskedWgradLinear`, `masked_bias_add`),
  in the linears the partition splits (`Partition.splits`: joint down-projections keep proj and fc2 plain).
Without labels (inference, evaluation, unmasked layers) they are plain megatron linears.

Biases are added here rather than by megatron's callers, so their gradient can be masked too; a
caller that expects ``skip_bias_add`` still receives a bias where it needs one (a zero, for the
fused bias-activation kernels).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from megatron_sgtm.core.labels import LabelMasks, active_masks
from megatron_sgtm.core.layers.autograd import (
    MaskedWgradLinear,
    keep_mask,
    masked_bias_add,
    scale_columns,
    scale_columns_,
    scale_grad,
)
from megatron_sgtm.core.partition import Partition
from megatron_sgtm.core.strategy import LINEARS, RetainAtForget


class SGTMLinearMixin:
    """State shared by both SGTM linears: partition, kind and (once bound) local forget index."""

    def _init_sgtm(self, partition: Partition, sgtm_kind: str, skip_bias_add: bool) -> None:
        if sgtm_kind not in LINEARS:
            raise ValueError(f"sgtm_kind={sgtm_kind!r}: expected one of {sorted(LINEARS)}")
        self.partition = partition
        self.rules = partition.rules
        self.sgtm_kind = sgtm_kind
        # Masked weight and bias gradients: the strategy masks them and this linear has Θ_F / Θ_R lines.
        self._masks_wgrad = self.rules.masks_gradients and partition.splits(LINEARS[sgtm_kind])
        # fc1 and fc2 apply the MLP's retain-forward rule in place only where fc2's backward is masked anyway.
        self._fc_in_place = self.rules.masks_gradients and partition.splits(LINEARS["fc2"])
        self._caller_adds_bias = skip_bias_add
        self._wgrad_masks: LabelMasks | None = None
        self._input_rule = False  # fc2 with masked gradients: fc1 zeroed the input's forget units; mask their gradient
        self.register_buffer("forget_index", None, persistent=False)  # bool over this rank's rows/columns: Θ_F
        self.register_buffer("sgtm_forget_lines", None, persistent=False)  # its indices, for the masked grads
        self._forget_span: slice | None = None  # the same lines when contiguous (views instead of gathers)

    def bind_layer(self, layer_index: int) -> None:
        """Called by the owning layer: masking applies only in the partition's masked layers."""
        if self.partition.active and self.partition.is_masked(layer_index):
            tp_group = get_tensor_model_parallel_group_if_none(self.tp_group)
            shard = self.partition.shard(tp_group.rank(), tp_group.size())
            self.forget_index = shard.for_kind(self.sgtm_kind).to(self.weight.device)
            self.sgtm_forget_lines = self.forget_index.nonzero().squeeze(1)
            lines = self.sgtm_forget_lines.tolist()
            if lines and lines == list(range(lines[0], lines[-1] + 1)):
                self._forget_span = slice(lines[0], lines[-1] + 1)

    @property
    def forget_lines(self) -> torch.Tensor | slice | None:
        """The Θ_F rows (column-parallel) or columns (row-parallel) for the masked gradients: a slice when
        contiguous, else indices."""
        return self._forget_span if self._forget_span is not None else self.sgtm_forget_lines

    def _masks(self) -> LabelMasks | None:
        return None if self.forget_index is None else active_masks()

    def _forward_impl(self, input, weight, *args, **kwargs):
        masks = self._wgrad_masks
        if masks is None or not weight.requires_grad:
            return super()._forward_impl(input, weight, *args, **kwargs)
        if kwargs.get("grad_output_buffer") is not None:
            raise NotImplementedError("SGTM linears do not support defer_embedding_wgrad_compute")
        return MaskedWgradLinear.apply(
            input, weight, masks, self.forget_lines, LINEARS[self.sgtm_kind].column_parallel,
            kwargs["gradient_accumulation_fusion"], kwargs["allreduce_dgrad"], kwargs["sequence_parallel"],
            get_tensor_model_parallel_group_if_none(kwargs.get("tp_group")), self._input_rule,
        )

    def _finish_bias(self, output, bias, masks: LabelMasks | None, forget_lines):
        """Add the bias (with a masked gradient given `masks`) or hand it back as megatron's caller expects."""
        if bias is None:
            return output, None
        if masks is None:
            return (output, bias) if self._caller_adds_bias else (output + bias, None)
        output = masked_bias_add(output, bias, masks, forget_lines)
        if self._caller_adds_bias and self.config.bias_activation_fusion and self.sgtm_kind == "fc1":
            return output, torch.zeros_like(bias, requires_grad=False)
        return output, None

    def _run(self, forward, *args):
        try:
            return forward(*args)
        finally:
            self._wgrad_masks = None
            self._input_rule = False

    def _fc_rule(self, masks: LabelMasks | None) -> bool:
        """With fc2's gradients masked, the MLP's retain-forward rule (forget units' activations zero at R positions) is
        applied in place at fc1's output, whose zero stays zero through GELU / SwiGLU, and fc2 zeroes the
        matching input gradient in its backward: no copy of the [s, b, ffn] activation or its gradient. (Joint
        down-projections: fc2 applies the rule itself, as `scale_columns`.)"""
        return (masks is not None and masks.any_retain and self._fc_in_place
                and self.sgtm_forget_lines.numel() > 0)


class SGTMColumnParallelLinear(SGTMLinearMixin, ColumnParallelLinear):
    """`linear_qkv` / `linear_fc1` with Θ_F rows masked per token."""

    def __init__(self, *args, partition: Partition, sgtm_kind: str, skip_bias_add: bool = False, **kwargs):
        super().__init__(*args, skip_bias_add=True, **kwargs)
        if self.gather_output:
            raise ValueError("SGTM column-parallel linears keep their output sharded (gather_output=False)")
        self._init_sgtm(partition, sgtm_kind, skip_bias_add)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        masks = self._masks() if self._masks_wgrad else None
        self._wgrad_masks = masks
        output, bias = self._run(super().forward, input_, weight, runtime_gather_output)
        output, bias = self._finish_bias(output, bias, masks, self.forget_lines)
        if self.sgtm_kind == "fc1" and self._fc_rule(masks):
            scale_columns_(output, self.forget_lines, masks.to(output.dtype).not_retain)
        return output, bias


class SGTMRowParallelLinear(SGTMLinearMixin, RowParallelLinear):
    """`linear_proj` / `linear_fc2`: forward rules on forget/retain columns, masked wgrad."""

    def __init__(self, *args, partition: Partition, sgtm_kind: str, skip_bias_add: bool = False, **kwargs):
        super().__init__(*args, skip_bias_add=True, **kwargs)
        self._init_sgtm(partition, sgtm_kind, skip_bias_add)

    def forward(self, input_):
        masks = self._masks()
        input_rule = self.sgtm_kind == "fc2" and self._fc_rule(masks) and self.weight.requires_grad
        if masks is not None and not input_rule:
            input_ = self._forward_rule(input_, masks.to(input_.dtype))
        wgrad_masks = masks if self._masks_wgrad else None
        self._wgrad_masks = wgrad_masks
        self._input_rule = input_rule
        output, bias = self._run(super().forward, input_)
        if wgrad_masks is not None and self.sequence_parallel:
            tp_group = get_tensor_model_parallel_group_if_none(self.tp_group)
            wgrad_masks = wgrad_masks.seq_slice(tp_group.rank(), tp_group.size())
        # The output bias is entirely Θ_R (Θ_J with joint down-projections: no masks then).
        return self._finish_bias(output, bias, wgrad_masks, None)

    def _forward_rule(self, x: torch.Tensor, masks: LabelMasks) -> torch.Tensor:
        forget = self.forget_index
        rule = self.rules.retain_at_forget
        if rule is RetainAtForget.ZERO:
            # R positions: forget columns zero; F positions: retain columns zero.
            return x * keep_mask(masks, forget)
        if masks.any_retain and self.sgtm_forget_lines.numel():
            x = scale_columns(x, self.forget_lines, masks.not_retain)
        if rule is RetainAtForget.DETACH and masks.any_forget:
            x = scale_grad(x, torch.where(forget, torch.ones_like(masks.not_forget), masks.not_forget))
        return x
