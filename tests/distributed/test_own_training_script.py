"""examples/own_training_script.py, a user's own megatron-core loop on the public API, under torchrun on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT, child_env

STEPS = 30  # ten cycles of (all-F, all-R, mixed) batches
# Θ_F of one layer (hidden 32, 4 heads of 8 channels, 1 forget head, 8 of 64 forget MLP units):
# qkv rows 3*8 x 32 + their bias 24, proj columns 32 x 8, fc1 rows 8 x 32 + their bias 8, fc2 columns 32 x 8.
FORGET_ELEMENTS = 2 * (3 * 8 * 32 + 24 + 32 * 8 + 8 * 32 + 8 + 32 * 8)


@pytest.fixture(scope="module")
def summary() -> dict:
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(ROOT / "examples" / "own_training_script.py"), "--steps", str(STEPS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
