"""CIR's disruption budget, its determinism, and the tensors RMU and CIR move, on a 4-layer model where their
layer ranges differ from "all layers" (tests/distributed/workers/unlearn_small.py, one process).

The budget run's forget step is large, so its disruption loss crosses the budget after a few epochs: the
epoch that crossed must be undone, leaving exactly the weights of the same run stopped before it, whose
retain loss, computed here from the logits, is within the budget, while the crossing epoch's is above it.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.workers.unlearn_small import CIR, NUM_LAYERS
from tests.support import run_worker


def _mlp(layers, kinds) -> set[str]:
    return {f"decoder.layers.{i}.mlp.linear_{fc}.{kind}" for i in layers for fc in ("fc1", "fc2") for kind in kinds}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("unlearn_small")
    run_worker("unlearn_small.py", out, 900)
    return torch.load(out / "results.pt", weights_only=True)


def _changed(results: dict, run: str) -> set[str]:
    start, params = results["start"], results[run]["params"]
    assert sorted(params) == sorted(start)
    return {n for n in start if not torch.equal(params[n], start[n])}


def test_cir_undoes_the_epoch_that_crossed_the_budget(results):
    crossed = results["cir"]["epochs"]
    assert 2 <= crossed < CIR.max_epochs, f"the budget was crossed at epoch {crossed}: not a test of the undo"
    before, final = results["cir_until_crossing"]["params"], results["cir"]["params"]
    assert _changed(results, "cir_until_crossing"), "the epochs before the crossing did not move the model"
    assert all(torch.equal(final[n], before[n]) for n in before), "the result is not the last epoch within budget"
    budget = results["start_loss"] * CIR.loss_budget
    assert results["cir"]["disruption"] <= budget, (results["cir"]["disruption"], budget)
    assert results["cir_crossing_kept"]["disruption"] > budget, "the crossing epoch did not cross the budget"


def test_cir_run_twice_gives_identical_weights(results):
    first, second = results["cir_paper"]["params"], results["cir_paper_again"]["params"]
    assert _changed(results, "cir_paper"), "the run did not move the model"
    assert all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.parametrize("run,configured", [
    ("cir_until_crossing", _mlp(range(3), ["weight"])),  # default range on 4 layers: 2..3, layers 0..2 updated
    ("cir_paper", _mlp(range(3), ["weight"])),
    ("rmu", _mlp(range(1, 4), ["weight", "bias"])),  # layer 3 steered: the MLPs of layers 1..3
])
def test_only_the_configured_tensors_change_and_all_of_them_do(results, run, configured):
    assert NUM_LAYERS == 4 and configured != _mlp(range(NUM_LAYERS), ["weight", "bias"])
    assert _changed(results, run) == configured  # each configured tensor moved, every other one bit-identical
