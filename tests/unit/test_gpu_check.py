"""tools/gpu_check.sh stays runnable: its dry run lists every step and finds the tools, flags and tests it uses."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support import ROOT

SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = ("install", "environment", "tests", "overhead", "summary", "train", "train-packed", "deepspeed")


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
    assert "--target" in out and "--no-index" in out and "--no-deps" in out  # the machine's own torch stays
    assert "[ok] tools/bench_sgtm_overhead.py takes" in out and "[ok] tools/bench_train.py takes" in out
    assert "tests collected" in out
    assert "pip download --python-version 3.12 --only-binary=:all:" in out  # the empty wheel dir: how to fill it
    assert "megatron-core==0.16.1" in out
    assert "dry run OK" in out


def test_unknown_argument_is_one_line():
    proc = _run("--bogus", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["tools/gpu_check.sh: unknown argument --bogus (see --help)"]


def test_a_failed_step_is_reported_and_the_next_one_runs(tmp_path):
    """A GPU lease is short: one failure must not cost the other steps' figures (the first GPU run lost its
    benchmarks to a failed test step before this). `false` as the interpreter fails every step at once."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl").touch()
    proc = _run("--python", "false", "--wheels", str(wheels), "--site", str(tmp_path / "site"),
                "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = ("install", "environment", "tests", "overhead", "train", "train-packed")
    for name in failed:
        assert re.search(rf"^\[fail\] {name} \(exit 1\)", proc.stdout, re.MULTILINE), proc.stdout
    assert proc.stdout.strip().splitlines()[-1].endswith("FAILED steps: " + " ".join(failed))
    assert (tmp_path / "out" / "gpu_check.log").read_text() == proc.stdout
