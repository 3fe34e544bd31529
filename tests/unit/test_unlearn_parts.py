"""The depth-scaled layer defaults of RMU and CIR, and CIR's two collapses: projecting out the forget data's
common directions, and whitening by the retain data's second moment."""

from __future__ import annotations

import pytest
import torch

from megatron_sgtm.unlearning.cir import (
    CIRSettings,
    check_layers,
    default_range,
    mean_and_top_components,
    project_out,
    whitening,
)
from megatron_sgtm.unlearning.common import UnlearnError
from megatron_sgtm.unlearning.rmu import default_layer


def test_layer_defaults_follow_the_papers_16_layer_choices():
    assert default_layer(16) == 7 and default_range(16) == (6, 12)  # RMU: layer 7; CIR: MLPs 6..11
    assert default_layer(2) == 1 and default_range(2) == (1, 2)
    assert default_layer(1) == 0 and default_range(1) == (0, 1)


def test_collapse_removes_the_mean_and_top_components_only():
    torch.manual_seed(0)
    common = torch.randn(2, 16)
    vectors = torch.randn(500, 2) @ common * 10 + torch.randn(500, 16) * 0.1 + torch.randn(16)
    basis = mean_and_top_components(vectors, directions=3, iters=8)  # the mean + 2 principal components
    assert basis.shape == (16, 3)
    assert torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-5)
    collapse = project_out(basis)
    collapsed = vectors @ collapse
    assert collapsed.norm(dim=1).mean() < 0.05 * vectors.norm(dim=1).mean()  # little is specific to a row
    assert torch.allclose(collapsed @ collapse, collapsed, atol=1e-4)  # idempotent
    assert mean_and_top_components(vectors, directions=36, iters=8).shape == (16, 8)  # at most half the width


def test_retain_whitening_buys_forget_change_with_little_retain_change():
    """An update W += g·uᵀ moves a forget input a_f by g·(u·a_f) and the retain inputs by g·(A_r u): with
    u = (M_r + λI)⁻¹ a_f the retain change per unit of forget change is far below the plain u = a_f's,
    when the forget input shares most of its length with the directions retain data uses."""
    torch.manual_seed(0)
    shared, own = torch.randn(4, 32), torch.randn(32)
    retain = torch.randn(2000, 4) @ shared + 0.05 * torch.randn(2000, 32)
    forget = torch.randn(4) @ shared + 0.3 * own  # mostly along the retain directions
    inverse = whitening(retain, ridge=1e-3)

    def retain_change_per_forget_change(u: torch.Tensor) -> float:
        return float((retain @ u).norm() / len(retain) ** 0.5 / (u @ forget).abs())

    plain, whitened = retain_change_per_forget_change(forget), retain_change_per_forget_change(forget @ inverse)
    assert whitened < 0.15 * plain, (whitened, plain)  # measured: 11x smaller


@pytest.mark.parametrize("change,message", [
    ({"collapse": "bogus"}, "--collapse bogus: must be one of ['retain', 'forget']"),
    ({"forget_loss": "bogus"}, "--forget-loss bogus: must be one of ['label-logit', 'mlp-breaking']"),
    ({"grad_directions": -1}, "--grad-directions -1: must be 0 (off) or more"),
    ({"ridge": 0.0}, "--ridge 0.0: must be positive"),
    ({"retain_momentum": 1.0}, "--retain-momentum 1.0: must be in [0, 1)"),
    ({"end": 1}, "--end-layer 1: must be above --start-layer 1"),
])
def test_bad_cir_settings_name_their_flag(change, message):
    settings = CIRSettings(**{"start": 1, "end": 2, **change})
    with pytest.raises(UnlearnError) as error:
        check_layers(settings, settings.start, settings.end, num_layers=2)
    assert str(error.value) == message
