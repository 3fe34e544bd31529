"""The output bias the trainer's calibration fits (iterative scaling with forward passes only) against the
optimum of the same objective found independently: L-BFGS on the ablated model's logits, in float64.

The objective is the label-smoothed cross-entropy of the calibration tokens, Σ_t CE_ε(z_t + b, y_t), which is
convex in b and invariant to adding a constant to b; so the two biases are compared after centring, and their
objective values directly.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import torchrun


@pytest.fixture(scope="module")
def fit(tmp_path_factory) -> dict:
    return torchrun("calibration_optimum.py", 1, tmp_path_factory.mktemp("calibration"))


def _objective(bias: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    log_p = torch.log_softmax(logits + bias, dim=-1)
    return -((1 - eps) * log_p.gather(1, targets[:, None]).sum() + eps * log_p.mean(dim=-1).sum())


def test_fitted_bias_is_the_independent_optimum(fit):
    logits, targets, eps = fit["logits"], fit["targets"].long(), float(fit["smoothing"])
    bias = torch.zeros(logits.shape[-1], dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([bias], lr=1, max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-15,
                               history_size=50, line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        loss = _objective(bias, logits, targets, eps)
        loss.backward()
        return loss

    solver.step(closure)
    optimum = bias.detach()
    assert float(torch.autograd.functional.jacobian(
        lambda b: _objective(b, logits, targets, eps), optimum).abs().max()) < 1e-6  # L-BFGS converged

    ours = fit["fitted"].double()
    start = float(_objective(torch.zeros_like(optimum), logits, targets, eps))
    best = float(_objective(optimum, logits, targets, eps))
    reached = float(_objective(ours, logits, targets, eps))
    assert start - best > 1.0, "the test model's logits need calibration for this test to mean anything"
    assert reached - best <= 1e-6 * len(targets), (reached, best)
    torch.testing.assert_close(ours - ours.mean(), optimum - optimum.mean(), rtol=0, atol=1e-3)
    assert float(fit["residuals"][-1]) < 1e-4  # the fit's own optimality gap agrees
