"""The output bias the trainer's and `eval`'s calibration fits (the paper's: AdamW on b only, lr decaying linearly to
a tenth, one micro-batch of each group per step, L_f + β·L_adj + α·L_ret) against an independent recomputation:
the ablated model's logits from tests/support/reference_gpt.py (plain torch, Θ_F zeroed by its own masks) at the
loss-bearing positions, the fit replayed step by step with a hand-written Adam in float64, and the optimum of the
objective found by L-BFGS. α ≠ β, several micro-batches per group (4, 3 and 2 loss-bearing ones, cycled over the
steps), partial loss masks (the masked positions all target one token), at TP=1 (PP=2), TP=2 and DP=2 (one
torchrun launch).

The objective is convex in b (every token is a loss-bearing target somewhere, so its optimum is finite); the
fitted bias is compared with the replay element by element and with the optimum by its objective value (its
rarely-seen tokens' entries are still on their way after the paper's few hundred steps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_sgtm.model import ModelConfig
from tests.distributed.launch import torchrun
from tests.support import reference_gpt
from tests.support.train_fixtures import tiny_config

GROUPS = ("forget", "adjacent", "retain")
# The worker's settings: (α, β) per fit, steps, lr.
WEIGHTS = {"fit": {"forget": 1.0, "adjacent": 3.0, "retain": 30.0},
           "swapped": {"forget": 1.0, "adjacent": 30.0, "retain": 3.0}}
STEPS, LR = 300, 0.1
LAYOUTS = ("tp1pp2", "tp2", "dp2")


@pytest.fixture(scope="module")
def fit(tmp_path_factory) -> dict:
    return torchrun("calibration_optimum.py", 2, tmp_path_factory.mktemp("calibration"))


@pytest.fixture(scope="module")
def reference(fit) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per group, its loss-bearing micro-batches in global order: (logits [n, vocab] of the ablated model at the
    loss-bearing positions, float64; their targets), from the plain-torch GPT."""
    model = ModelConfig(**tiny_config(Path("."), Path("."))["model"])
    state = fit["dp2/weights"]
    forget, _ = reference_gpt.forget_masks(state, model, heads=(3,), units=range(56, 64), layers=(0, 1))
    ablated = {k: v.masked_fill(forget[k], 0.0) for k, v in state.items()}
    out: dict = {}
    with torch.no_grad():
        for g in GROUPS:
            out[g] = []
            for mb in fit["dp2/batches"][g]:
                keep = mb["loss_mask"] == 1
                if not keep.any():
                    continue
                logits = reference_gpt.logits(ablated, model, mb["tokens"], torch.zeros_like(mb["tokens"]), None,
                                              (3,), range(56, 64), (0, 1))
                out[g].append((logits[keep].double(), mb["targets"][keep].long()))
    return out


def _step_objective(bias: torch.Tensor, ref: dict, weights: dict, step: int) -> torch.Tensor:
    """Step `step` of the paper's fit: micro-batch step mod n_g of every group g."""
    return sum(weights[g] * F.cross_entropy(ref[g][step % len(ref[g])][0] + bias, ref[g][step % len(ref[g])][1])
               for g in GROUPS)


def _group_losses(bias: torch.Tensor, ref: dict) -> dict[str, torch.Tensor]:
    """Each group's mean over its micro-batches of their mean token loss."""
    return {g: torch.stack([F.cross_entropy(logits + bias, targets) for logits, targets in ref[g]]).mean()
            for g in GROUPS}


def _objective(bias: torch.Tensor, ref: dict, weights: dict) -> torch.Tensor:
    """What the cycled fit minimises: L_f + β·L_adj + α·L_ret over every micro-batch."""
    losses = _group_losses(bias, ref)
    return sum(weights[g] * losses[g] for g in GROUPS)


def _replayed_fit(ref: dict, weights: dict) -> tuple[torch.Tensor, list[float]]:
    """Adam (β₁ 0.9, β₂ 0.999, ε 1e-8, no weight decay) from b = 0, lr LR · (1 − 0.9·k/(STEPS − 1)) at step k."""
    vocab = ref["forget"][0][0].shape[1]
    bias, m, v = (torch.zeros(vocab, dtype=torch.float64) for _ in range(3))
    history = []
    for k in range(STEPS):
        b = bias.clone().requires_grad_(True)
        loss = _step_objective(b, ref, weights, k)
        (grad,) = torch.autograd.grad(loss, b)
        history.append(float(loss.detach()))
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        lr = LR * (1 - 0.9 * k / (STEPS - 1))
        bias = bias - lr * (m / (1 - 0.9 ** (k + 1))) / ((v / (1 - 0.999 ** (k + 1))).sqrt() + 1e-8)
    return bias, history


def _optimum(ref: dict, weights: dict) -> torch.Tensor:
    bias = torch.zeros(ref["forget"][0][0].shape[1], dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([bias], lr=1, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15,
                               history_size=50, line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        loss = _objective(bias, ref, weights)
        loss.backward()
        return loss

    solver.step(closure)
    return bias.detach()


def test_the_fit_replays_the_papers_procedure_on_independent_logits(fit, reference):
    """α ≠ β, micro-batches cycled per group, partial loss masks, the lr schedule: the bias and the objective of
    every step equal the replay's; every layout (DP=2 included) gives the same fit."""
    assert [len(reference[g]) for g in GROUPS] == [4, 3, 2], "the worker's micro-batches changed"
    for key in ("fit", "swapped"):
        replayed, history = _replayed_fit(reference, WEIGHTS[key])
        layouts = LAYOUTS if key == "fit" else ("dp2",)
        for layout in layouts:
            ours = fit[f"{layout}/{key}/fitted"].double()
            torch.testing.assert_close(ours, replayed, rtol=0, atol=2e-5, msg=f"{layout}/{key}")
            torch.testing.assert_close(fit[f"{layout}/{key}/history"].double(), torch.tensor(history).double(),
                                       rtol=1e-5, atol=0, msg=f"{layout}/{key} objective per step")
        assert float(fit[f"dp2/{key}/dp_spread"]) == 0.0, "the DP ranks fitted different biases"
    for layout in ("tp2", "dp2"):  # DP=2 and TP=2 give the DP=1, PP=2 fit
        torch.testing.assert_close(fit[f"{layout}/fit/fitted"], fit["tp1pp2/fit/fitted"], rtol=0, atol=1e-5)


def test_the_fit_reaches_the_independent_optimum(fit, reference):
    for key, weights in WEIGHTS.items():
        optimum = _optimum(reference, weights)
        gradient = torch.autograd.functional.jacobian(lambda b, w=weights: _objective(b, reference, w), optimum)
        assert float(gradient.abs().max()) < 1e-6
        start = float(_objective(torch.zeros_like(optimum), reference, weights))
        best = float(_objective(optimum, reference, weights))
        assert start - best > 1.0, "the test model's logits need calibration for this test to mean anything"
        for layout in LAYOUTS if key == "fit" else ("dp2",):
            ours = fit[f"{layout}/{key}/fitted"].double()
            reached = float(_objective(ours, reference, weights))
            assert reached - best <= 5e-4 * (start - best), (layout, key, reached, best, start)


def test_alpha_weighs_the_retain_loss_and_beta_the_adjacent_loss(fit, reference):
    """Swapping α and β moves the fit the way the objective says: the fit with the larger α has the lower retain
    loss, the one with the larger β the lower adjacent loss, and (optimality of each fit for its own weights)
    L_ret(b₁) − L_ret(b₂) ≤ L_adj(b₁) − L_adj(b₂) for α₁ − β₁ > α₂ − β₂."""
    first = _group_losses(fit["dp2/fit/fitted"].double(), reference)
    second = _group_losses(fit["dp2/swapped/fitted"].double(), reference)
    assert first["retain"] < second["retain"] - 1e-3, (first, second)
    assert first["adjacent"] > second["adjacent"] + 1e-3, (first, second)
    assert first["retain"] - second["retain"] <= first["adjacent"] - second["adjacent"]


def test_the_calibrated_evaluation_is_the_objectives_loss(fit, reference):
    """The engine's evaluation with the fitted bias: each group's token-weighted loss over its loss-bearing
    positions, recomputed from the reference logits."""
    for layout in LAYOUTS:
        bias = fit[f"{layout}/fit/fitted"].double()
        for g in GROUPS:
            logits = torch.cat([lg for lg, _ in reference[g]])
            targets = torch.cat([t for _, t in reference[g]])
            expected = float(F.cross_entropy(logits + bias, targets))
            assert abs(fit[f"{layout}/fit/evaluated"][g] - expected) <= 1e-5 * expected, (layout, g)
