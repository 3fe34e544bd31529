"""Training jobs through the real CLI under torchrun, for the kill/resume tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml


def train_command(tmp: Path, cfg: dict, name: str, nproc: int = 2, *overrides: str) -> list[str]:
    """`megatron-sgtm train` of `cfg` (written to tmp/name.yaml) on `nproc` gloo ranks."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))  # YAML floats: JSON's 1e+30 would read back as a string
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_sgtm.cli", "train", "--config", str(path), *overrides]


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def kill_when(command: list[str], env: dict, marker: Path, timeout: float = 300) -> None:
    """Start `command`, and SIGKILL the launcher and every rank (torchrun puts its workers in sessions of their
    own) as soon as `marker` exists; asserts that it appeared."""
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        process.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"the run never wrote {marker}"
