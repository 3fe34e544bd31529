"""Running a sweep's unfinished runs: one SLURM job array (`slurm/sweep_array.sbatch`, each task
preemption-safe through `slurm/launch.sh`), or one run after another on this machine.

Every run's full training config is written to ``<out>/sweep/configs/<run>.yaml``; the array reads
line ``SLURM_ARRAY_TASK_ID`` of a manifest listing the configs of the runs it was submitted for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron_sgtm.sweep.grid import Grid, GridError, Run

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def config_path(grid: Grid, run: Run) -> Path:
    return grid.out / "sweep" / "configs" / f"{run.name}.yaml"


def write_configs(grid: Grid, runs: list[Run]) -> Path:
    """Each run's config, and a manifest of their absolute paths (one per array index)."""
    for run in runs:
        path = config_path(grid, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(run.config, sort_keys=False))
    manifest = grid.out / "sweep" / f"array-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    manifest.write_text("".join(f"{config_path(grid, r).resolve()}\n" for r in runs))
    return manifest


def sbatch_command(grid: Grid, manifest: Path, count: int) -> list[str]:
    """`sbatch` of the array template; signal, requeue and log mode come from the template's header."""
    res, slurm = grid.resources, grid.slurm
    array = f"0-{count - 1}" + (f"%{slurm['max_concurrent']}" if slurm.get("max_concurrent") else "")
    cmd = ["sbatch", "--parsable", f"--job-name=sgtm-{grid.name}", f"--array={array}", f"--nodes={res.nodes}",
           f"--ntasks-per-node={res.gpus_per_node or res.tasks_per_node}",
           f"--output={(grid.out / 'logs').resolve()}/%A_%a.out", f"--export=ALL,SGTM_HOME={SLURM_DIR.parent}"]
    if res.gpus_per_node:
        cmd.append(f"--gpus-per-node={res.gpus_per_node}")
    if res.cpus_per_task:
        cmd.append(f"--cpus-per-task={res.cpus_per_task}")
    cmd += [f"--{key}={slurm[key]}" for key in ("partition", "account", "time") if slurm.get(key)]
    cmd += [str(a) for a in slurm.get("extra_args") or []]
    return [*cmd, str(SLURM_DIR / "sweep_array.sbatch"), str(manifest)]


def submit(grid: Grid, runs: list[Run]) -> str:
    """Submit the runs as one job array; returns the array's job id."""
    (grid.out / "logs").mkdir(parents=True, exist_ok=True)
    manifest = write_configs(grid, runs)
    proc = subprocess.run(sbatch_command(grid, manifest, len(runs)), capture_output=True, text=True)
    if proc.returncode:
        raise GridError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def local_command(grid: Grid, run: Run) -> list[str]:
    train = ["-m", "megatron_sgtm.cli", "train", "--config", str(config_path(grid, run))]
    world = grid.resources.world_size
    if world == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *train]


def run_local(grid: Grid, runs: list[Run]) -> list[str]:
    """Train the runs one after another on this machine; returns the names of those that failed."""
    if grid.resources.nodes > 1:
        raise GridError(f"{grid.path}: resources.nodes={grid.resources.nodes}: the local runner uses one machine")
    write_configs(grid, runs)
    logs = grid.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    failed = []
    for i, run in enumerate(runs):
        log = logs / f"{run.name}.log"
        print(f"[sweep] {i + 1}/{len(runs)} {run.name} (log: {log})", file=sys.stderr, flush=True)
        with log.open("a") as out:
            rc = subprocess.run(local_command(grid, run), stdout=out, stderr=subprocess.STDOUT).returncode
        if rc or not run.finished:
            print(f"[sweep] {run.name} failed (exit {rc}); see {log}", file=sys.stderr, flush=True)
            failed.append(run.name)
    return failed
