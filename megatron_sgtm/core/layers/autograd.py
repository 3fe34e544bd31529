"""The masked weight gradient: the one place where SGTM changes megatron's backward.

A linear's weight gradient is a sum over token positions, ``dW = sum_p g_p x_p^T``. SGTM drops the
terms of F positions from Θ_R rows/columns and those of R positions from Θ_F rows/columns. Rather than
an [s, b, n] mask, `masked_wgrad` runs one GEMM for all rows/columns under Θ_R's rule, with the
position mask ([p, 1]) on the operand that does not carry the row/column index, and recomputes only
the Θ_F rows (column-parallel: rows are outputs) or columns (row-parallel: columns are inputs) under
Θ_F's rule; label-uniform micro-batches skip the masks. The input gradient is untouched, so Θ_J and
earlier layers still see every token.

`MaskedWgradLinear` mirrors megatron's `LinearWithGradAccumulationAndAsyncCommunication`: the
sequence-parallel all-gather in forward and backward, the async TP all-reduce or reduce-scatter of
the input gradient, and the `main_grad` / `gradient_accumulation_fusion` accumulation.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import layers as mlayers
from megatron.core.utils import prepare_input_tensors_for_wgrad_compute

from megatron_sgtm.core.labels import LabelMasks


def keep_mask(masks: LabelMasks, forget_index: torch.Tensor | None) -> torch.Tensor:
    """[s, b, n] multiplier: 0 where a position's contribution must not reach that row/column.

    ``forget_index`` marks the Θ_F rows/columns; None means the tensor is entirely Θ_R.
    """
    if forget_index is None:
        return masks.not_forget
    return torch.where(forget_index.to(masks.not_forget.device), masks.not_retain, masks.not_forget)


def _position_masks(masks: LabelMasks, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """[p, 1] keep columns for Θ_R and Θ_F (p = s*b positions); None where nothing is dropped."""
    masks = masks.to(dtype)
    keep_retain = masks.not_forget.reshape(-1, 1) if masks.any_forget else None
    keep_forget = masks.not_retain.reshape(-1, 1) if masks.any_retain else None
    return keep_retain, keep_forget


# Lines: the rows (column-parallel: outputs) or columns (row-parallel: inputs) of a weight, equally the
# output columns of an activation. A slice when contiguous (views, no gathers), else an index tensor.
Lines = torch.Tensor | slice


def _none(lines: Lines | None) -> bool:
    if lines is None:
        return True
    return lines.stop <= lines.start if isinstance(lines, slice) else lines.numel() == 0


def _times(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return t if keep is None else t * keep


def masked_wgrad(grad_output: torch.Tensor, total_input: torch.Tensor, masks: LabelMasks,
                 forget_lines: Lines | None, mask_grad_output: bool) -> torch.Tensor:
    """``grad_output^T total_input`` over [p, n_out] x [p, n_in] with SGTM's per-position rule.

    `forget_lines`: indices of the Θ_F rows (``mask_grad_output``: column-parallel) or columns
    (row-parallel); None if the weight is entirely Θ_R.
    """
    keep_retain, keep_forget = _position_masks(masks, grad_output.dtype)
    if mask_grad_output:  # the rows are outputs: mask the input side
        grad_weight = grad_output.t().matmul(_times(total_input, keep_retain))
    else:  # the columns are inputs: mask the output side
        grad_weight = _times(grad_output, keep_retain).t().matmul(total_input)
    if _none(forget_lines) or (keep_retain is None and keep_forget is None):
        return grad_weight
    if mask_grad_output:
        grad_weight[forget_lines] = grad_output[:, forget_lines].t().matmul(_times(total_input, keep_forget))
    else:
        grad_weight[:, forget_lines] = _times(grad_output, keep_forget).t().matmul(total_input[:, forget_lines])
    return grad_weight


def masked_bias_grad(grad: torch.Tensor, masks: LabelMasks, forget_lines: Lines | None) -> torch.Tensor:
    """The bias gradient (sum over positions) under the same rule, as matrix-vector products."""
    grad = grad.reshape(-1, grad.shape[-1])
    keep_retain, keep_forget = _position_masks(masks, grad.dtype)
    out = grad.sum(0) if keep_retain is None else keep_retain.t().matmul(grad)[0]
    if _none(forget_lines) or (keep_retain is None and keep_forget is None):
        return out
    forget = grad[:, forget_lines]
    out[forget_lines] = forget.sum(0) if keep_forget is None else keep_forget.t().matmul(forget)[0]
    return out


class MaskedWgradLinear(torch.autograd.Function):
    """``x @ W^T`` (TP-aware) whose wgrad uses ``keep * grad_output`` or ``keep * input``."""

    @staticmethod
    @mlayers.custom_fwd
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, masks: LabelMasks, forget_lines: Lines | None,
                mask_grad_output: bool, gradient_accumulation_fusion: bool, allreduce_dgrad: bool,
                sequence_parallel: bool, tp_group, input_rule: bool = False) -> torch.Tensor:
        ctx.save_for_backward(input, weight)
        ctx.input_rule = input_rule  # the input's Θ_F columns are zero at R positions: so is their gradient
        ctx.masks = masks
        ctx.forget_lines = forget_lines
        ctx.mask_grad_output = mask_grad_output
        ctx.main_grad = weight.main_grad if gradient_accumulation_fusion and hasattr(weight, "main_grad") else None
        ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.tp_group = tp_group
        total_input = _gather_sequence(input, tp_group) if sequence_parallel else input
        return torch.matmul(total_input, weight.t())

    @staticmethod
    @mlayers.custom_bwd
    def backward(ctx, grad_output: torch.Tensor):
        input, weight = ctx.saved_tensors
        tp_group = ctx.tp_group
        total_input = _gather_sequence(input, tp_group) if ctx.sequence_parallel else input
        grad_input = grad_output.matmul(weight)
        if ctx.input_rule:
            scale_columns_(grad_input, ctx.forget_lines, ctx.masks.to(grad_input.dtype).not_retain)

        handle = None
        if ctx.allreduce_dgrad:
            handle = torch.distributed.all_reduce(grad_input, group=tp_group, async_op=True)
        elif ctx.sequence_parallel:
            sub_grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
            handle = mlayers.dist_reduce_scatter_func(sub_grad_input, grad_input, group=tp_group, async_op=True)
            grad_input = sub_grad_input

        grad_output, total_input = prepare_input_tensors_for_wgrad_compute(grad_output, total_input)
        grad_weight = masked_wgrad(grad_output, total_input, ctx.masks, ctx.forget_lines, ctx.mask_grad_output)
        if ctx.gradient_accumulation_fusion:
            grad_weight = _accumulate_into_main_grad(weight, ctx.main_grad, grad_weight)

        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, None, None, None, None, None, None, None, None


def _gather_sequence(input: torch.Tensor, tp_group) -> torch.Tensor:
    shape = list(input.shape)
    shape[0] *= tp_group.size()
    out = torch.empty(shape, dtype=input.dtype, device=input.device)
    mlayers.dist_all_gather_func(out, input.contiguous(), group=tp_group)
    return out


def _accumulate_into_main_grad(weight, main_grad, grad_weight):
    """megatron's gradient-accumulation fusion: add dW into ``weight.main_grad`` directly (the masked
    wgrad is computed first, so the fused CUDA GEMM-accumulate kernel does not apply)."""
    weight.main_grad = main_grad
    main_grad.add_(grad_weight)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    # Like megatron: hand autograd a dummy so DDP's hooks run on the main thread and skip the add.
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(main_grad.shape, dtype=grad_weight.dtype, device=main_grad.device)


class _MaskedBiasAdd(torch.autograd.Function):
    """``x + bias`` whose bias gradient sums only the positions SGTM's rule keeps."""

    @staticmethod
    def forward(ctx, x, bias, masks, forget_lines):
        ctx.masks = masks
        ctx.forget_lines = forget_lines
        return x + bias

    @staticmethod
    def backward(ctx, grad):
        return grad, masked_bias_grad(grad, ctx.masks, ctx.forget_lines), None, None


def masked_bias_add(x: torch.Tensor, bias: torch.Tensor, masks: LabelMasks, forget_lines: Lines | None) -> torch.Tensor:
    return _MaskedBiasAdd.apply(x, bias, masks, forget_lines)


@torch.no_grad()
def scale_columns_(x: torch.Tensor, cols: Lines, keep: torch.Tensor) -> None:
    """In place, outside autograd: columns `cols` of `x` ([s, b, n]) times `keep` ([s, b, 1]). Only for
    tensors nothing has saved (fresh outputs and gradients); a saved one would fail its version check."""
    x = x.detach()
    if isinstance(cols, slice):
        x[..., cols].mul_(keep)
    else:
        x.index_copy_(-1, cols, x.index_select(-1, cols) * keep)


class _ScaleColumns(torch.autograd.Function):
    """`x` with columns `cols` multiplied by `keep` ([s, b, 1]), in forward and in backward: one copy
    of `x` plus work on those columns only, instead of a full-width [s, b, n] mask."""

    @staticmethod
    def forward(ctx, x, cols, keep):
        ctx.save_for_backward(keep)
        ctx.cols = cols
        out = x.clone()
        scale_columns_(out, cols, keep)
        return out

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        grad = grad.clone()
        scale_columns_(grad, ctx.cols, keep)
        return grad, None, None


def scale_columns(x: torch.Tensor, cols: Lines, keep: torch.Tensor) -> torch.Tensor:
    return _ScaleColumns.apply(x, cols, keep)


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by `keep` (gradient routing's detach)."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.save_for_backward(keep)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep, None


def scale_grad(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return _ScaleGrad.apply(x, keep)
