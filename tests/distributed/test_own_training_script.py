"""examples/own_training_script.py, a user's own megatron-core loop on the public API, under torchrun on CPU: its
toy run, and on `megatron-sgtm train`'s initial weights and batches (`--init`, `--batches`) against train itself
(engine megatron, TP=PP=DP=1): the same per-step losses within 1e-5 over 20 steps and the same gated steps
(docs/design.md §2, "one implementation")."""

from __future__ import annotations

import pytest

from tests.support.cli_runs import train_command
from tests.support.example_runs import assert_matches_train, matched_run, run, run_example

MATCHED_STEPS = 20
STEPS = 30  # ten cycles of (all-F, all-R, mixed) batches
# Θ_F of one layer (hidden 32, 4 heads of 8 channels, 1 forget head, 8 of 64 forget MLP units):
# qkv rows 3*8 x 32 + their bias 24, proj columns 32 x 8, fc1 rows 8 x 32 + their bias 8, fc2 columns 32 x 8.
FORGET_ELEMENTS = 2 * (3 * 8 * 32 + 24 + 32 * 8 + 8 * 32 + 8 + 32 * 8)


@pytest.fixture(scope="module")
def summary() -> dict:
    return run_example("own_training_script.py", 1, "--steps", str(STEPS))


def test_the_loss_falls(summary):
    losses = summary["losses"]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])


def test_gated_regions_stay_bit_identical(summary):
    assert summary["frozen_moved"] == {"retain on all-F steps": 0.0, "forget on all-R steps": 0.0}


def test_ablate_zeroes_exactly_theta_f(summary):
    assert summary["zeroed"] == FORGET_ELEMENTS
    assert summary["forget_left"] == 0.0


def test_ablation_leaves_r_token_outputs_alone_and_hurts_forget_more_than_retain(summary):
    live, ablated = summary["live"], summary["ablated"]
    assert ablated["retain (R labels)"] == pytest.approx(live["retain (R labels)"], abs=1e-6)
    assert ablated["forget"] - live["forget"] > ablated["retain"] - live["retain"] + 0.1


def test_the_example_matches_megatron_sgtm_train_per_step(tmp_path):
    cfg = matched_run(tmp_path, "megatron", MATCHED_STEPS, dp=1)
    run(train_command(tmp_path, cfg, "train", 1))
    example = run_example("own_training_script.py", 1, "--steps", str(MATCHED_STEPS), "--batches",
                          str(tmp_path / "batches.pt"), "--init", str(tmp_path / "init" / "model.safetensors"))
    assert_matches_train(example, tmp_path / "run", MATCHED_STEPS)
