"""The output bias the trainer's and `eval`'s calibration fits (the paper's: AdamW on b only, over hidden states
cached by one forward pass) against the optimum of the same objective found independently: L-BFGS on the cached
logits, in float64, of L_f + β·L_adj + α·L_ret; at TP=1 (PP=2) and TP=2 (one torchrun launch).

The objective is convex in b and invariant to adding a constant to b (every token occurs in every group's batch,
so its optimum is finite); the biases are compared after centring, and their objective values directly.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import torchrun

GROUPS = ("forget", "adjacent", "retain")
WEIGHTS = {"forget": 1.0, "adjacent": 100.0, "retain": 100.0}  # the worker's alpha = beta = 100


@pytest.fixture(scope="module")
def fit(tmp_path_factory) -> dict:
    return torchrun("calibration_optimum.py", 2, tmp_path_factory.mktemp("calibration"))


def _objective(bias: torch.Tensor, fit: dict) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for g in GROUPS:
        logits, targets = fit[f"tp2/logits/{g}"], fit[f"tp2/targets/{g}"].long()
        total = total + WEIGHTS[g] * torch.nn.functional.cross_entropy(logits + bias, targets)
    return total


def _optimum(fit: dict) -> torch.Tensor:
    bias = torch.zeros(fit["tp2/fitted"].numel(), dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([bias], lr=1, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15,
                               history_size=50, line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        loss = _objective(bias, fit)
        loss.backward()
        return loss

    solver.step(closure)
    return bias.detach()


def test_fitted_bias_is_the_independent_optimum_at_tp1_and_tp2(fit):
    optimum = _optimum(fit)
    assert float(torch.autograd.functional.jacobian(lambda b: _objective(b, fit), optimum).abs().max()) < 1e-6
    start, best = float(_objective(torch.zeros_like(optimum), fit)), float(_objective(optimum, fit))
    assert start - best > 1.0, "the test model's logits need calibration for this test to mean anything"
    for layout in ("tp1pp2", "tp2"):
        ours = fit[f"{layout}/fitted"].double()
        reached = float(_objective(ours, fit))
        assert reached - best <= 1e-3 * (start - best), (layout, reached, best, start)
        torch.testing.assert_close(ours - ours.mean(), optimum - optimum.mean(), rtol=0, atol=0.05)
        assert fit[f"{layout}/history"][-1] < fit[f"{layout}/history"][0]
    # the same fit at both layouts, and the engine's calibrated evaluation is the objective's loss
    torch.testing.assert_close(fit["tp1pp2/fitted"], fit["tp2/fitted"], rtol=0, atol=1e-4)
    cached = torch.stack([torch.nn.functional.cross_entropy(fit[f"tp2/logits/{g}"] + fit["tp2/fitted"].double(),
                                                            fit[f"tp2/targets/{g}"].long()) for g in GROUPS])
    for layout in ("tp1pp2", "tp2"):
        torch.testing.assert_close(fit[f"{layout}/evaluated"].double(), cached, rtol=1e-5, atol=1e-5)
