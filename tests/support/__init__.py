"""Helpers shared by the unit and distributed tests (not tests themselves)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a test's child process: this checkout's code, one thread, third-party warnings off."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
