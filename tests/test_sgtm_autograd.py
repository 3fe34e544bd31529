"""The masked-wgrad autograd function in isolation, and the CPU platform switch."""

from __future__ import annotations

import subprocess
import sys

import torch

from megatron_sgtm.labels import FORGET, RETAIN, UNLABELED
from megatron_sgtm.layers.autograd import MaskedWgradLinear, masked_bias_add
from megatron_sgtm.layers.labels import masks_from_labels

LABELS = torch.tensor([[RETAIN, FORGET, UNLABELED, FORGET], [UNLABELED, RETAIN, RETAIN, FORGET]])  # [b, s]
FORGET_ROWS = torch.tensor([False, True, False, False, True])


def _expected_wgrad(x, g):
    """sum over positions p of g_p x_p^T, skipping F positions for Θ_R rows and R for Θ_F rows."""
    lab = LABELS.t()  # [s, b]
    out = torch.zeros(g.shape[-1], x.shape[-1])
    for s in range(lab.shape[0]):
        for b in range(lab.shape[1]):
            for row in range(g.shape[-1]):
                blocked = RETAIN if FORGET_ROWS[row] else FORGET
                if lab[s, b] != blocked:
                    out[row] += g[s, b, row] * x[s, b]
    return out


def _run(gradient_accumulation_fusion: bool):
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, requires_grad=True)  # [s, b, in]
    w = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(4, 2, 5)
    if gradient_accumulation_fusion:
        w.main_grad = torch.ones(5, 3)
        w.grad_added_to_main_grad = False
    masks = masks_from_labels(LABELS)
    y = MaskedWgradLinear.apply(x, w, masks, FORGET_ROWS, True, gradient_accumulation_fusion, False, False, None)
    y.backward(g)
    return x, w, g


def test_masked_wgrad_drops_blocked_positions_and_keeps_the_input_gradient():
    x, w, g = _run(gradient_accumulation_fusion=False)
    torch.testing.assert_close(w.grad, _expected_wgrad(x.detach(), g))
    torch.testing.assert_close(x.grad, g @ w.detach())


def test_main_grad_accumulation_path_adds_the_masked_wgrad():
    x, w, g = _run(gradient_accumulation_fusion=True)
    torch.testing.assert_close(w.main_grad, 1.0 + _expected_wgrad(x.detach(), g))
    assert w.grad_added_to_main_grad


def test_masked_bias_add_sums_only_kept_positions():
    x = torch.zeros(4, 2, 5)
    bias = torch.zeros(5, requires_grad=True)
    masked_bias_add(x, bias, masks_from_labels(LABELS), FORGET_ROWS).backward(torch.ones(4, 2, 5))
    lab = LABELS.t()
    retain_rows = float((lab != FORGET).sum())
    forget_rows = float((lab != RETAIN).sum())
    assert bias.grad.tolist() == [forget_rows if f else retain_rows for f in FORGET_ROWS.tolist()]


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_cpu_shims_map_cuda_devices_to_cpu():
    out = _python(
        "from megatron_sgtm.platform import enable_cpu_execution; import torch\n"
        "print(enable_cpu_execution(), torch.empty(2, device='cuda').device, torch.ones(1).cuda().device)"
    )
    assert out == "True cpu cpu"


def test_cpu_shims_change_nothing_when_cuda_is_available():
    out = _python(
        "import torch; torch.cuda.is_available = lambda: True\n"
        "before = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state)\n"
        "from megatron_sgtm.platform import enable_cpu_execution\n"
        "from torch.overrides import _get_current_function_mode_stack as stack\n"
        "print(enable_cpu_execution(), before == (torch.cuda.current_device, torch.cuda.synchronize,"
        " torch.cuda.get_rng_state), len(stack()))"
    )
    assert out == "False True 0"
