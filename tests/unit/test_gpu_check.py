"""tools/gpu_check.sh stays runnable: its dry run lists every step and finds the tools, flags and tests it uses."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support import ROOT

SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = ("venv", "install", "environment", "tests", "overhead", "summary", "train")


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_lists_the_steps_and_validates_them(tmp_path):
    proc = _run("--dry-run", "--python", sys.executable, "--wheels", str(tmp_path / "wheels"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in STEPS:
        assert re.search(rf"^\[step\] {name}[ :]", out, re.MULTILINE), f"step {name} not listed:\n{out}"
    assert "--system-site-packages" in out and "--no-index" in out and "megatron-core==0.16.1" in out
    assert "[ok] tools/bench_sgtm_overhead.py takes" in out and "[ok] tools/bench_train.py takes" in out
    assert "tests collected" in out
    assert "pip download --python-version 3.12 --only-binary=:all:" in out  # the empty wheel dir: how to fill it
    assert "dry run OK" in out


def test_unknown_argument_is_one_line():
    proc = _run("--bogus", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["tools/gpu_check.sh: unknown argument --bogus (see --help)"]
