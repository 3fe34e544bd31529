"""examples/own_training_script.py, a user's own megatron-core loop on the public API, under torchrun on CPU: its
toy run, and on `megatron-sgtm train`'s initial weights and batches (`--init`, `--batches`) against train itself
(engine megatron, TP=PP=DP=1): the same per-step losses within 1e-5 over 20 steps and the same gated steps
(docs/design.md §2, "one implementation")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT, child_env
from tests.support.cli_runs import train_command, train_losses
from tests.support.example_runs import matched_run, run

MATCHED_STEPS = 20
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


def test_the_example_matches_megatron_sgtm_train_per_step(tmp_path):
    cfg = matched_run(tmp_path, "megatron", MATCHED_STEPS, dp=1)
    run(train_command(tmp_path, cfg, "train", 1))
    train = train_losses(tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]

    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               str(ROOT / "examples" / "own_training_script.py"), "--steps", str(MATCHED_STEPS),
               "--batches", str(tmp_path / "batches.pt"), "--init", str(tmp_path / "init" / "model.safetensors")])
    example = json.loads(out.strip().splitlines()[-1])
    assert len(example["losses"]) == MATCHED_STEPS == len(train)
    worst = max(abs(a - train[step]) for step, a in enumerate(example["losses"], start=1))
    print(f"largest loss difference {worst:.2e}; gated R/F steps {last['gated_retain_steps']}/"
          f"{last['gated_forget_steps']}")
    assert worst <= 1e-5, (worst, example["losses"], train)
    assert [sum(g[0] for g in example["gates"]), sum(g[1] for g in example["gates"])] == [
        last["gated_retain_steps"], last["gated_forget_steps"]]
