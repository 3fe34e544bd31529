"""Helpers shared by the unit and distributed tests (not tests themselves)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a test's child process: this checkout's code first on the path (then the caller's:
    tools/gpu_check.sh installs megatron-core there), one thread, third-party warnings off."""
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)


def run_worker(name: str, out: Path, timeout: int, **env: str) -> Path:
    """`tests/distributed/workers/NAME OUT` in one child process (a world of one, no torchrun), which must
    succeed; returns OUT, where it saved its results."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests/distributed/workers" / name), str(out)],
                          env=child_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out
