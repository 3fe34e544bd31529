"""The masked-wgrad autograd function in isolation, and the CPU platform switch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_sgtm.core.labels import TokenLabel, masks_from_labels
from megatron_sgtm.core.layers.autograd import MaskedWgradLinear, masked_bias_add, masked_bias_grad, masked_wgrad

UNLABELED, RETAIN, FORGET = TokenLabel

LABELS = torch.tensor([[RETAIN, FORGET, UNLABELED, FORGET], [UNLABELED, RETAIN, RETAIN, FORGET]])  # [b, s]
FORGET_ROWS = torch.tensor([False, True, False, False, True])
# The mixed micro-batch and the label-uniform ones that take the shortcuts (no F, no R, neither).
BATCHES = {
    "mixed": LABELS,
    "no_forget": torch.where(LABELS == FORGET, UNLABELED, LABELS),
    "no_retain": torch.where(LABELS == RETAIN, UNLABELED, LABELS),
    "unlabeled": torch.full_like(LABELS, UNLABELED),
}


def _expected_wgrad(labels, x, g, column: bool):
    """sum over positions p of g_p x_p^T, skipping F positions for Θ_R rows (column-parallel) or columns
    (row-parallel) and R positions for Θ_F ones."""
    lab = labels.t()  # [s, b]
    out = torch.zeros(g.shape[-1], x.shape[-1])
    for s in range(lab.shape[0]):
        for b in range(lab.shape[1]):
            for row in range(out.shape[0]):
                for col in range(out.shape[1]):
                    blocked = RETAIN if FORGET_ROWS[row if column else col] else FORGET
                    if lab[s, b] != blocked:
                        out[row, col] += g[s, b, row] * x[s, b, col]
    return out


def _run(labels, column: bool, gradient_accumulation_fusion: bool = False):
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3 if column else 5, requires_grad=True)  # [s, b, in]
    w = torch.randn(5 if column else 3, x.shape[-1], requires_grad=True)
    g = torch.randn(4, 2, w.shape[0])
    if gradient_accumulation_fusion:
        w.main_grad = torch.ones(w.shape)
        w.grad_added_to_main_grad = False
    rows = FORGET_ROWS.nonzero().squeeze(1)
    y = MaskedWgradLinear.apply(x, w, masks_from_labels(labels), rows, column, gradient_accumulation_fusion,
                                False, False, None)
    y.backward(g)
    return x, w, g


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("column", [True, False], ids=["column", "row"])
def test_masked_wgrad_drops_blocked_positions_and_keeps_the_input_gradient(batch, column):
    x, w, g = _run(BATCHES[batch], column)
    torch.testing.assert_close(w.grad, _expected_wgrad(BATCHES[batch], x.detach(), g, column))
    torch.testing.assert_close(x.grad, g @ w.detach())


def test_main_grad_accumulation_path_adds_the_masked_wgrad():
    x, w, g = _run(LABELS, column=True, gradient_accumulation_fusion=True)
    torch.testing.assert_close(w.main_grad, 1.0 + _expected_wgrad(LABELS, x.detach(), g, column=True))
    assert w.grad_added_to_main_grad


@pytest.mark.parametrize("batch", BATCHES)
def test_masked_bias_add_sums_only_kept_positions(batch):
    labels = BATCHES[batch]
    x = torch.zeros(4, 2, 5)
    bias = torch.zeros(5, requires_grad=True)
    grad = torch.randn(4, 2, 5)
    masked_bias_add(x, bias, masks_from_labels(labels), FORGET_ROWS.nonzero().squeeze(1)).backward(grad)
    lab = labels.t()
    expected = [float(grad[:, :, i][lab != (RETAIN if f else FORGET)].sum()) for i, f in enumerate(FORGET_ROWS)]
    torch.testing.assert_close(bias.grad, torch.tensor(expected))


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_cpu_shims_map_cuda_devices_to_cpu():
    out = _python(
        "from megatron_sgtm.compat.cpu import enable_cpu_execution; import torch\n"
        "print(enable_cpu_execution(), torch.empty(2, device='cuda').device, torch.ones(1).cuda().device)"
    )
    assert out == "True cpu cpu"


def test_cpu_shims_change_nothing_when_cuda_is_available():
    out = _python(
        "import torch; torch.cuda.is_available = lambda: True\n"
        "before = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state)\n"
        "from megatron_sgtm.compat.cpu import enable_cpu_execution\n"
        "from torch.overrides import _get_current_function_mode_stack as stack\n"
        "print(enable_cpu_execution(), before == (torch.cuda.current_device, torch.cuda.synchronize,"
        " torch.cuda.get_rng_state), len(stack()))"
    )
    assert out == "False True 0"


@pytest.mark.parametrize("column", [True, False], ids=["column", "row"])
def test_contiguous_forget_rows_as_a_slice_give_the_same_gradients(column):
    """Linears pass contiguous Θ_F rows as a slice (views instead of gathers): same results as indices."""
    torch.manual_seed(1)
    g, x = torch.randn(8, 6), torch.randn(8, 7)
    masks = masks_from_labels(LABELS)
    width = 6 if column else 7
    rows = torch.arange(width - 2, width)
    span = slice(width - 2, width)
    torch.testing.assert_close(masked_wgrad(g, x, masks, span, column), masked_wgrad(g, x, masks, rows, column),
                               rtol=0, atol=0)
    torch.testing.assert_close(masked_bias_grad(g, masks, slice(4, 6)), masked_bias_grad(g, masks, torch.arange(4, 6)),
                               rtol=0, atol=0)
