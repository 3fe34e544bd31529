"""The SLURM templates and the sweep job array against a real scheduler (munged, slurmctld, slurmd
started by tests/support/slurm_cluster.py; srun launching real `megatron-sgtm train` ranks over gloo).

- slurm/train.sbatch with 2 tasks trains the tiny SGTM model on 2 ranks and ends with a complete
  checkpoint;
- the same job preempted twice (USR1 to the batch script: checkpoint, `scontrol requeue` by the
  script; then an external `scontrol requeue`: SIGTERM, checkpoint, SLURM requeues) resumes both
  times and reproduces every step's loss and the final evaluation of the uninterrupted job exactly;
- `megatron-sgtm sweep --submit` runs 2 sizes x 2 methods as a job array, skips them once finished,
  and `sweep collect` writes the CSV and the plots.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import yaml

from megatron_sgtm.cli import main
from megatron_sgtm.training.distributed import first_slurm_host
from tests.support import ROOT
from tests.support.slurm_cluster import SlurmCluster
from tests.support.train_fixtures import build_tiny_shards, tiny_config

STEPS = 60
LOSSES = ["forget_loss", "retain_loss", "adjacent_loss", "forget_loss_ablated", "retain_loss_ablated",
          "adjacent_loss_ablated"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("slurm_data") / "shards")


def _train_steps(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl (the last record of a step wins, across restarts)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _sbatch(cluster: SlurmCluster, tmp: Path, name: str, data: Path) -> tuple[str, Path]:
    """slurm/train.sbatch, 2 tasks on the CPU node (the template's GPU defaults overridden)."""
    cfg = tiny_config(data, tmp / name, train={"train_steps": STEPS},
                      checkpoint={"dir": str(tmp / name / "checkpoints"), "keep_last": 2})
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    job = cluster.run("sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                      f"--output={tmp / name}.out", f"--export=ALL,SGTM_HOME={ROOT}", "--chdir", str(ROOT),
                      str(ROOT / "slurm" / "train.sbatch"),
                      str(tmp / f"{name}.yaml")).strip()
    return job, tmp / name


def _wait_for_step(cluster: SlurmCluster, job: str, run_dir: Path, step: int, after: int = 0) -> int:
    """Block until the job's metrics show a step >= `step` logged after `after` records; returns it."""
    deadline = time.time() + 300
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        text = path.read_text() if path.is_file() else ""
        lines = text[: text.rfind("\n") + 1].splitlines()  # complete records only
        steps = [json.loads(x)["step"] for x in lines[after:] if '"kind": "train"' in x]
        if steps and steps[-1] >= step:
            return steps[-1]
        time.sleep(0.05)
    raise TimeoutError(f"job {job} never reached step {step}:\n{cluster.log_tail()}")


@pytest.fixture(scope="module")
def train_jobs(slurm_cluster, data, tmp_path_factory) -> dict:
    """An uninterrupted 2-task job, and the same job preempted twice mid-run."""
    cluster, tmp = slurm_cluster, tmp_path_factory.mktemp("train_jobs")
    full, full_dir = _sbatch(cluster, tmp, "full", data)
    preempted, run_dir = _sbatch(cluster, tmp, "preempted", data)  # starts when `full` frees the CPUs
    # 1) USR1 to the batch script, as --signal=B:USR1@120 sends it before the time limit.
    first = _wait_for_step(cluster, preempted, run_dir, 5)
    cluster.run("scancel", "--batch", "--signal=USR1", preempted)
    # 2) once it has resumed and trained a few more steps: SLURM requeues it (SIGTERM to every task).
    deadline = time.time() + 120
    while cluster.job_field(preempted, "Restarts") != "1" or cluster.job_field(preempted, "JobState") != "RUNNING":
        assert time.time() < deadline, f"job {preempted} was not requeued and restarted:\n{cluster.log_tail()}"
        time.sleep(0.1)
    before_resume = len((run_dir / "metrics.jsonl").read_text().splitlines())
    second = _wait_for_step(cluster, preempted, run_dir, first + 5, after=before_resume)
    cluster.run("scontrol", "requeue", preempted)
    cluster.wait_job(preempted, timeout=400)
    cluster.wait_job(full)
    return {"cluster": cluster, "full": full, "full_dir": full_dir, "preempted": preempted, "run_dir": run_dir,
            "signalled_at": (first, second)}


def test_two_task_job_trains_sgtm_on_two_gloo_ranks_and_ends_with_a_checkpoint(train_jobs):
    cluster, job, run_dir = train_jobs["cluster"], train_jobs["full"], train_jobs["full_dir"]
    assert cluster.job_field(job, "JobState") == "COMPLETED" and cluster.job_field(job, "ExitCode") == "0:0"
    log = Path(f"{run_dir}.out").read_text()
    assert "training sgtm (megatron engine, world 2)" in log and "run finished" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "sgtm" and summary["step"] == STEPS
    assert sorted(_train_steps(run_dir)) == list(range(1, STEPS + 1))
    final = run_dir / "checkpoints" / f"iter_{STEPS:07d}"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 2 and meta["method"] == "sgtm"
    assert sorted(p.name for p in (final / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == STEPS
    assert not list((run_dir / "checkpoints").glob("*.partial"))


def test_preempted_job_checkpoints_requeues_resumes_and_matches_the_uninterrupted_run(train_jobs):
    cluster, job, run_dir = train_jobs["cluster"], train_jobs["preempted"], train_jobs["run_dir"]
    first, second = train_jobs["signalled_at"]
    assert cluster.job_field(job, "JobState") == "COMPLETED"
    assert cluster.job_field(job, "Restarts") == "2"
    log = Path(f"{run_dir}.out").read_text()
    assert "(restart 1)" in log and "(restart 2)" in log
    assert "SIGUSR1 received" in log and f"requeueing job {job}" in log
    stops = [int(line.split()[3]) for line in log.splitlines() if line.startswith("stopping at step")]
    resumes = [int(line.split()[-1]) for line in log.splitlines() if line.startswith("resumed from")]
    assert len(stops) == 2 and resumes == stops, log
    assert first <= stops[0] < stops[1] < STEPS and second <= stops[1]
    expected, got = _train_steps(train_jobs["full_dir"]), _train_steps(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in got.items():
        assert loss == expected[step], f"step {step}: {loss!r} != {expected[step]!r}"
    full = json.loads((train_jobs["full_dir"] / "summary.json").read_text())
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert {k: resumed[k] for k in LOSSES} == {k: full[k] for k in LOSSES}
    assert resumed["gated"] == full["gated"]


@pytest.fixture(scope="module")
def sweep(slurm_cluster, data, tmp_path_factory) -> dict:  # noqa: F811
    """2 sizes x 2 methods as a job array of 1-task runs (two at a time on the 2-CPU node)."""
    tmp = tmp_path_factory.mktemp("sweep")
    base = tiny_config(data, tmp / "unused")
    del base["logging"]["run_dir"], base["train"]["train_steps"]
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    grid = tmp / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "base": "base.yaml", "out": str(tmp / "out"), "sizes": ["tiny-h32", "tiny-h64"],
        "methods": ["sgtm", "weak_filter"], "undiscovered_rates": [0.2], "seeds": [3], "budget": {"train_steps": 4},
        "resources": {"nodes": 1, "tasks_per_node": 1}, "slurm": {"time": "00:10:00"},
    }))
    return {"cluster": slurm_cluster, "grid": grid, "out": tmp / "out"}


def test_sweep_runs_as_a_job_array_skips_finished_runs_and_collects(sweep, capsys, monkeypatch):
    cluster, grid, out = sweep["cluster"], str(sweep["grid"]), sweep["out"]
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    assert main(["sweep", "--grid", grid, "--submit"]) == 0
    printed = capsys.readouterr().out
    assert "submitted job array" in printed and "4 run(s)" in printed, printed
    job = printed.split("submitted job array ")[1].split(":")[0]
    cluster.wait_job(job, timeout=400)

    methods = {f"{size}_{method}_u0.2_s3": method for size in ("tiny-h32", "tiny-h64")
               for method in ("sgtm", "weak_filter")}
    names = list(methods)
    summaries = {}
    for name in names:
        logs = "\n".join(p.read_text()[-3000:] for p in (out / "logs").iterdir())
        assert (out / name / "summary.json").is_file(), logs
        summaries[name] = json.loads((out / name / "summary.json").read_text())
        assert summaries[name]["step"] == 4 and summaries[name]["method"] == methods[name]
    assert len(list((out / "logs").glob(f"{job}_*.out"))) == 4

    # Everything finished: nothing is submitted again.
    assert main(["sweep", "--grid", grid, "--submit"]) == 0
    assert "all 4 runs of grid are finished; nothing to run" in capsys.readouterr().out
    assert cluster.run("squeue", "-h").strip() == ""
    assert main(["sweep", "--grid", grid, "--dry-run"]) == 0
    assert "4 runs, 0 pending, 4 finished" in capsys.readouterr().out

    assert main(["sweep", "collect", "--grid", grid]) == 0
    with (out / "results.csv").open() as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(names)
    for name, row in rows.items():
        for key in LOSSES:
            assert float(row[key]) == summaries[name][key]
    for plot in ("forget_vs_retain.png", "forget_vs_undiscovered.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_rank0_host_is_the_first_node_of_a_multi_node_step(slurm_cluster, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "3")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08],cpu01")
    assert first_slurm_host() == "gpu07"
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "1")
    assert first_slurm_host() == "127.0.0.1"
