"""The NaN stop of `train` (tests/distributed/workers/bad_steps.py, one process): a non-finite grad norm with
a finite loss stops the run like a non-finite loss does, and `train.max_bad_steps` counts *consecutive* bad
steps (a good step resets it), saving no checkpoint of a bad step's state."""

from __future__ import annotations

import json
import math

import pytest

from tests.support import run_worker


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bad_steps")
    run_worker("bad_steps.py", out, 600)
    return json.loads((out / "results.json").read_text())


def test_a_non_finite_grad_norm_alone_stops_the_run(results):
    run = results["grad"]  # +inf in one gradient at step 3, train.max_bad_steps 1
    steps = run["train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in steps), "the loss was not finite: not a grad-norm-only stop"
    assert math.isfinite(steps[1]["grad_norm"]) and not math.isfinite(steps[2]["grad_norm"])
    assert run["error"].startswith(f"step 3: loss is {steps[2]['loss']} (grad norm inf) on 1 consecutive step(s), "
                                   "train.max_bad_steps=1;"), run["error"]
    assert run["checkpoints"] == ["iter_0000001", "iter_0000002"]


def test_max_bad_steps_counts_consecutive_bad_steps(results):
    run = results["loss"]  # +inf losses (finite gradients) at steps 2, 4 and 5, train.max_bad_steps 2
    steps = run["train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]  # step 2 alone is not enough; 4 and 5 are
    assert [math.isfinite(r["loss"]) for r in steps] == [True, False, True, False, False]
    assert run["error"].startswith("step 5: loss is "), run["error"]
    assert "on 2 consecutive step(s), train.max_bad_steps=2;" in run["error"]
    assert run["checkpoints"] == ["iter_0000001", "iter_0000003"]  # save_interval 1: none of a bad step
    # the injected loss changed no gradient: step 3 is the run without it (the other run, clean until step 3)
    assert steps[2]["loss"] == results["grad"]["train"][2]["loss"]
