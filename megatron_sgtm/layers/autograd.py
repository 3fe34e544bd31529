"""The masked weight gradient: the one place where SGTM changes megatron's backward.

A linear's weight gradient is a sum over token positions, ``dW = sum_p g_p x_p^T``. SGTM drops the
terms of F positions from Θ_R rows/columns and those of R positions from Θ_F rows/columns, which is
one elementwise multiply on ``grad_output`` (column-parallel: rows are outputs) or on ``input``
(row-parallel: columns are inputs) right before the wgrad GEMM. The input gradient is untouched, so
Θ_J and earlier layers still see every token.

`MaskedWgradLinear` mirrors megatron's `LinearWithGradAccumulationAndAsyncCommunication`: the
sequence-parallel all-gather in forward and backward, the async TP all-reduce or reduce-scatter of
the input gradient, and the `main_grad` / `gradient_accumulation_fusion` accumulation.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import layers as mlayers
from megatron.core.utils import prepare_input_tensors_for_wgrad_compute

from megatron_sgtm.layers.labels import LabelMasks


def keep_mask(masks: LabelMasks, forget_index: torch.Tensor | None) -> torch.Tensor:
    """[s, b, n] multiplier: 0 where a position's contribution must not reach that row/column.

    ``forget_index`` marks the Θ_F rows/columns; None means the tensor is entirely Θ_R.
    """
    if forget_index is None:
        return masks.not_forget
    return torch.where(forget_index.to(masks.not_forget.device), masks.not_retain, masks.not_forget)


class MaskedWgradLinear(torch.autograd.Function):
    """``x @ W^T`` (TP-aware) whose wgrad uses ``keep * grad_output`` or ``keep * input``."""

    @staticmethod
    @mlayers.custom_fwd
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor,
        masks: LabelMasks,
        forget_index: torch.Tensor,
        mask_grad_output: bool,
        gradient_accumulation_fusion: bool,
        allreduce_dgrad: bool,
        sequence_parallel: bool,
        tp_group,
    ) -> torch.Tensor:
        ctx.save_for_backward(input, weight)
        ctx.masks = masks
        ctx.forget_index = forget_index
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

        handle = None
        if ctx.allreduce_dgrad:
            handle = torch.distributed.all_reduce(grad_input, group=tp_group, async_op=True)
        elif ctx.sequence_parallel:
            sub_grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
            handle = mlayers.dist_reduce_scatter_func(sub_grad_input, grad_input, group=tp_group, async_op=True)
            grad_input = sub_grad_input

        keep = keep_mask(ctx.masks.to(grad_output.dtype), ctx.forget_index)
        if ctx.mask_grad_output:
            grad_output = grad_output * keep
        else:
            total_input = total_input * keep
        grad_output, total_input = prepare_input_tensors_for_wgrad_compute(grad_output, total_input)

        if ctx.gradient_accumulation_fusion:
            grad_weight = _accumulate_into_main_grad(weight, ctx.main_grad, grad_output, total_input)
        else:
            grad_weight = grad_output.t().matmul(total_input)

        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, None, None, None, None, None, None, None


def _gather_sequence(input: torch.Tensor, tp_group) -> torch.Tensor:
    shape = list(input.shape)
    shape[0] *= tp_group.size()
    out = torch.empty(shape, dtype=input.dtype, device=input.device)
    mlayers.dist_all_gather_func(out, input.contiguous(), group=tp_group)
    return out


def _accumulate_into_main_grad(weight, main_grad, grad_output, total_input):
    """megatron's gradient-accumulation fusion: add dW into ``weight.main_grad`` directly."""
    weight.main_grad = main_grad
    if mlayers._grad_accum_fusion_available and main_grad.is_cuda:
        fused = mlayers.fused_weight_gradient_mlp_cuda
        if main_grad.dtype == torch.float32:
            fused.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
        else:
            fused.wgrad_gemm_accum_fp16(total_input, grad_output, main_grad)
    else:
        main_grad.add_(grad_output.t().matmul(total_input))
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    # Like megatron: hand autograd a dummy so DDP's hooks run on the main thread and skip the add.
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(main_grad.shape, dtype=total_input.dtype, device=main_grad.device)


class _MaskedBiasAdd(torch.autograd.Function):
    """``x + bias`` whose bias gradient sums only the positions `keep_mask` keeps."""

    @staticmethod
    def forward(ctx, x, bias, masks, forget_index):
        ctx.masks = masks
        ctx.forget_index = forget_index
        return x + bias

    @staticmethod
    def backward(ctx, grad):
        keep = keep_mask(ctx.masks.to(grad.dtype), ctx.forget_index)
        grad_bias = (grad * keep).sum(dim=tuple(range(grad.dim() - 1)))
        return grad, grad_bias, None, None


def masked_bias_add(
    x: torch.Tensor, bias: torch.Tensor, masks: LabelMasks, forget_index: torch.Tensor | None
) -> torch.Tensor:
    return _MaskedBiasAdd.apply(x, bias, masks, forget_index)


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
