"""tools/bench_train.py's interleaved rounds train what the trainer trains: two engines stepping in turn in one
process (sharing megatron's parallel state) end on the same losses, bit for bit, as each method's own
`megatron-sgtm train` job. Otherwise its SGTM/none ratio would time something else."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT, child_env

TINY = ["--hidden", "32", "--layers", "2", "--heads", "2", "--seq", "64", "--micro-batch", "2", "--global-batch", "4",
        "--steps", "3", "--warmup", "1", "--repeats", "1", "--engines", "megatron", "--docs", "200", "--clock", "cpu"]


def _final_losses(tmp_path, *mode: str) -> dict[str, float]:
    out = tmp_path / f"{mode[0].strip('-')}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), *TINY, *mode, "--json", str(out)],
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["method"]: r["final_loss"] for r in json.loads(out.read_text())["results"]}


def test_interleaved_engines_end_on_each_methods_own_training_losses(tmp_path):
    interleaved = _final_losses(tmp_path, "--interleave")
    jobs = _final_losses(tmp_path, "--no-interleave", "--no-concurrent")
    assert interleaved == jobs
    assert interleaved["sgtm"] != interleaved["none"]  # the two engines are the two methods
