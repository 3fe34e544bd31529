"""`SGTMAdamW` against optimizers the project did not write: `torch.optim.AdamW` on ungated steps, and
split optimizers (one torch AdamW per region, stepped only when its region is not gated — what the
authors' reference does) on gated ones. Values, not counters."""

from __future__ import annotations

import pytest
import torch

from megatron_sgtm.core.gating import Gate, SGTMAdamW
from megatron_sgtm.core.strategy import Region

HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
ROWS, COLS, FORGET_ROWS = 6, 5, slice(4, 6)  # the last two rows of the split weight are Θ_F


def _codes() -> torch.Tensor:
    codes = torch.full((ROWS, COLS), Region.RETAIN, dtype=torch.uint8)
    codes[FORGET_ROWS] = Region.FORGET
    return codes


def _grads(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(ROWS, COLS, generator=g), torch.randn(7, generator=g)) for _ in range(steps)]


def _ours(gates: list[Gate], with_codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    split = torch.nn.Parameter(torch.randn(ROWS, COLS, generator=g))
    joint = torch.nn.Parameter(torch.randn(7, generator=g))
    opt = SGTMAdamW([split, joint], **HYPER)
    if with_codes:
        opt.set_region_codes(split, _codes())
    for gate, (g_split, g_joint) in zip(gates, _grads(len(gates))):
        split.grad, joint.grad = g_split.clone(), g_joint.clone()
        opt.gate = gate
        opt.step()
    return split.detach(), joint.detach()


@pytest.mark.parametrize("with_codes", [False, True])
def test_ungated_steps_equal_torch_adamw(with_codes):
    steps = 6
    split, joint = _ours([Gate()] * steps, with_codes)
    g = torch.Generator().manual_seed(1)
    ref_split = torch.nn.Parameter(torch.randn(ROWS, COLS, generator=g))
    ref_joint = torch.nn.Parameter(torch.randn(7, generator=g))
    ref = torch.optim.AdamW([ref_split, ref_joint], foreach=False, **HYPER)
    for g_split, g_joint in _grads(steps):
        ref_split.grad, ref_joint.grad = g_split.clone(), g_joint.clone()
        ref.step()
    torch.testing.assert_close(split, ref_split.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(joint, ref_joint.detach(), rtol=1e-6, atol=1e-7)


def test_gated_steps_equal_split_optimizers():
    """Θ_R rows, Θ_F rows and a Θ_J tensor as three torch AdamWs; a gated region's optimizer skips the step
    (no moment update, no weight decay, no step count: its own bias correction, as split optimizers have)."""
    gates = [Gate(), Gate(retain=True), Gate(retain=True), Gate(forget=True), Gate(), Gate(forget=True), Gate()]
    split, joint = _ours(gates, with_codes=True)

    g = torch.Generator().manual_seed(1)
    full = torch.randn(ROWS, COLS, generator=g)
    retain = torch.nn.Parameter(full[: FORGET_ROWS.start].clone())
    forget = torch.nn.Parameter(full[FORGET_ROWS].clone())
    ref_joint = torch.nn.Parameter(torch.randn(7, generator=g))
    opts = {name: torch.optim.AdamW([p], foreach=False, **HYPER)
            for name, p in (("retain", retain), ("forget", forget), ("joint", ref_joint))}
    for gate, (g_split, g_joint) in zip(gates, _grads(len(gates))):
        retain.grad, forget.grad = g_split[: FORGET_ROWS.start].clone(), g_split[FORGET_ROWS].clone()
        ref_joint.grad = g_joint.clone()
        opts["joint"].step()
        if not gate.retain:
            opts["retain"].step()
        if not gate.forget:
            opts["forget"].step()
    torch.testing.assert_close(split[: FORGET_ROWS.start], retain.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split[FORGET_ROWS], forget.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(joint, ref_joint.detach(), rtol=1e-6, atol=1e-7)


def _kernels(gates: list[Gate], with_codes: bool) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _ours(gates, with_codes)
    return {event.key for event in prof.key_averages()}


def test_dense_steps_run_torchs_fused_kernel_on_cpu():
    """Ungated steps over whole tensors, and a gated step's contiguous region blocks (here whole rows), are
    torch's fused AdamW on CPU as on GPU (the values: the tests above)."""
    assert "aten::_fused_adamw_" in _kernels([Gate()] * 2, with_codes=True)
    assert "aten::_fused_adamw_" in _kernels([Gate(retain=True)], with_codes=True)
