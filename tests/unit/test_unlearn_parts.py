"""The depth-scaled layer defaults of RMU and CIR and CIR's projection of common directions."""

from __future__ import annotations

import torch

from megatron_sgtm.unlearning.cir import _basis, _collapse, default_range
from megatron_sgtm.unlearning.rmu import default_layer


def test_layer_defaults_follow_the_papers_16_layer_choices():
    assert default_layer(16) == 7 and default_range(16) == (6, 12)  # RMU: layer 7; CIR: MLPs 6..11
    assert default_layer(2) == 1 and default_range(2) == (1, 2)
    assert default_layer(1) == 0 and default_range(1) == (0, 1)


def test_collapse_removes_the_mean_and_top_components_only():
    torch.manual_seed(0)
    common = torch.randn(2, 16)
    vectors = torch.randn(500, 2) @ common * 10 + torch.randn(500, 16) * 0.1 + torch.randn(16)
    basis = _basis(vectors, directions=3, iters=8)  # the mean + 2 principal components
    assert basis.shape == (16, 3)
    assert torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-5)
    collapsed = _collapse(vectors, basis)
    assert collapsed.norm(dim=1).mean() < 0.05 * vectors.norm(dim=1).mean()  # little is specific to a row
    assert torch.allclose(_collapse(collapsed, basis), collapsed, atol=1e-4)  # idempotent
    assert _basis(vectors, directions=36, iters=8).shape == (16, 8)  # at most half the width
