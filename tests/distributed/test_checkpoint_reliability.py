"""Checkpoint reliability through `megatron-sgtm train` (megatron engine, gloo ranks): a SIGKILLed run
resumed in its own run directory logs each step once, with the uninterrupted run's losses, in metrics.jsonl
and in the one (offline) wandb run both jobs wrote to; a corrupted
checkpoint or one of another partition is refused with one line; a non-finite loss ends the run with an
error, no summary and no checkpoint of the bad state.

Six CLI jobs in all: the reference, the killed and the resumed run (2 ranks), two refused resumes (1 rank)
and the diverging run (2 ranks).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import child_env
from tests.support.cli_runs import kill_when, train_command
from tests.support.train_fixtures import build_tiny_shards, tiny_config
from tests.support.wandb_runs import offline_runs

STEPS = {"train_steps": 8}
ENV = child_env()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("data") / "shards")


def _train(tmp: Path, cfg: dict, name: str, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(tmp, cfg, name, nproc, *overrides), env=ENV, capture_output=True, text=True,
                          timeout=600)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed(data, tmp_path_factory) -> dict:
    """An uninterrupted 8-step run, and the same run SIGKILLed after its step-4 checkpoint and resumed
    (with a changed optim.lr, which the checkpoint's schedule ignores) in the same run directory."""
    tmp = tmp_path_factory.mktemp("resumed")
    full = _train(tmp, tiny_config(data, tmp / "full", train=STEPS), "full", 2)
    assert full.returncode == 0, full.stderr[-3000:]

    ckpt = {"dir": str(tmp / "ckpt"), "save_interval": 2, "keep_last": 2, "resume": "auto"}
    cfg = tiny_config(data, tmp / "run", train=STEPS, checkpoint=ckpt)
    cfg["logging"].update(wandb_mode="offline", wandb_group="grid-a", wandb_name="run-a")
    kill_when(train_command(tmp, cfg, "run", 2), ENV, tmp / "ckpt" / "iter_0000004" / "meta.json")
    killed_at = max(r["step"] for r in _records(tmp / "run") if r["kind"] == "train")
    assert killed_at < 8, "the run finished before it could be killed"

    again = _train(tmp, cfg, "run", 2, "--optim.lr=0.01")
    assert again.returncode == 0, again.stderr[-3000:]
    return {"tmp": tmp, "full": tmp / "full", "run": tmp / "run", "ckpt": tmp / "ckpt", "stderr": again.stderr}


def test_a_resumed_run_logs_each_step_once_with_the_uninterrupted_losses(resumed):
    records = _records(resumed["run"])
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    expected = {r["step"]: r["loss"] for r in _records(resumed["full"]) if r["kind"] == "train"}
    assert {r["step"]: r["loss"] for r in train} == expected  # bit for bit, the new optim.lr ignored
    assert [r["step"] for r in records if r["kind"] == "eval"] == [8]
    assert (resumed["run"] / "summary.json").is_file()
    assert re.search(r"changed since the checkpoint, ignored .*: optim\.lr 0\.003 -> 0\.01$", resumed["stderr"],
                     re.MULTILINE), resumed["stderr"][-3000:]


def test_a_resumed_run_continues_its_wandb_run_with_one_history_row_per_step(resumed):
    killed, again = offline_runs(resumed["run"])  # the SIGKILLed job's offline run, then the resumed job's
    meta = json.loads((resumed["ckpt"] / "iter_0000008" / "meta.json").read_text())  # saved by the resumed job
    assert again.run_id and again.run_id == meta["wandb_run_id"]
    assert killed.path.name.endswith(again.run_id)  # one wandb run: the resumed job continued the killed one's id
    assert (again.group, again.name) == ("grid-a", "run-a")
    assert again.config["method"] == "sgtm" and again.config["train"]["train_steps"] == 8
    # The killed job's history is what wandb-core had written before the SIGKILL (offline it buffers); the
    # resumed job sends the steps after its checkpoint, none twice.
    rows = [row for run in (killed, again) for row in run.history]
    assert [row["_step"] for row in again.history] == list(range(5, 9))
    assert sorted(row["_step"] for row in rows) == sorted({row["_step"] for row in rows})
    expected = {r["step"]: r["loss"] for r in _records(resumed["full"]) if r["kind"] == "train"}
    assert all(row["train/loss"] == expected[row["_step"]] for row in rows)
    final = json.loads((resumed["run"] / "summary.json").read_text())
    assert rows[-1]["eval/forget_loss"] == final["forget_loss"]  # the final evaluation, at step 8
    assert {k: again.summary[k] for k in ("forget_loss", "retain_loss", "method")} == {
        k: final[k] for k in ("forget_loss", "retain_loss", "method")}


def test_a_checkpoint_with_one_flipped_byte_is_refused_naming_the_file(resumed, data):
    tmp = resumed["tmp"]
    corrupt = tmp / "corrupt" / "iter_0000008"
    shutil.copytree(resumed["ckpt"] / "iter_0000008", corrupt)
    shard = next(p for p in sorted(corrupt.iterdir()) if p.suffix == ".distcp")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    cfg = tiny_config(data, tmp / "corrupt_run", train={"train_steps": 10}, checkpoint={"resume": str(corrupt)})
    proc = _train(tmp, cfg, "corrupt_run", 1)
    assert proc.returncode != 0
    line = (f"megatron-sgtm train: checkpoint {corrupt}: {shard.name} does not match its SHA-256 in meta.json "
            "(corrupt or modified)")
    assert line in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert not (tmp / "corrupt_run" / "summary.json").exists()


def test_a_resume_with_another_partition_is_refused_naming_the_field(resumed, data):
    tmp = resumed["tmp"]
    cfg = tiny_config(data, tmp / "other_run", train={"train_steps": 10},
                      checkpoint={"resume": str(resumed["ckpt"] / "iter_0000008")})
    proc = _train(tmp, cfg, "other_run", 1, "--sgtm.forget_heads=2")
    assert proc.returncode != 0
    assert re.search(r"^megatron-sgtm train: checkpoint \S+iter_0000008: partition\.forget_heads is \[3\] there "
                     r"but \[2, 3\] in this run \(", proc.stderr, re.MULTILINE), proc.stderr[-3000:]


def test_a_non_finite_loss_stops_the_run_with_an_error_and_no_checkpoint_of_it(data, tmp_path):
    """lr 1e30 diverges within a few steps; a crash's leftover `.partial` checkpoint is reported and skipped."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000009.partial").mkdir(parents=True)
    cfg = tiny_config(data, tmp_path / "run", optim={"lr": 1e30}, train={"train_steps": 8},
                      checkpoint={"dir": str(ckpt), "save_interval": 1, "resume": "auto"})
    proc = _train(tmp_path, cfg, "run", 2)
    assert proc.returncode != 0
    assert (f"checkpoint.resume=auto: {ckpt} holds only incomplete checkpoints (iter_0000009.partial); "
            "starting from step 0") in proc.stderr.splitlines(), proc.stderr[-3000:]
    found = re.search(r"^megatron-sgtm train: step (\d+): loss is (nan|inf|-inf) ", proc.stderr, re.MULTILINE)
    assert found, proc.stderr[-3000:]
    bad = int(found.group(1))
    train = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert train[-1]["step"] == bad and not math.isfinite(train[-1]["loss"])
    assert all(math.isfinite(r["loss"]) for r in train[:-1])
    assert not (tmp_path / "run" / "summary.json").exists()
    saved = sorted(p.name for p in ckpt.glob("iter_???????"))
    assert saved[-1] == f"iter_{bad - 1:07d}", saved  # every step before the bad one, not the bad state
