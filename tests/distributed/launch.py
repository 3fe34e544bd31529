"""Launch a worker script under torchrun (real gloo process groups) and load what rank 0 saved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.support import ROOT, child_env


def torchrun(script: str, nproc: int, out_dir: Path, *args: str, timeout: int = 1200) -> dict:
    """Run tests/distributed/workers/<script> on `nproc` ranks; returns the results rank 0 saved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = child_env()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(ROOT / "tests" / "distributed" / "workers" / script), str(out_dir), *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-12000:]}")
    return torch.load(out_dir / "results.pt", weights_only=True)
