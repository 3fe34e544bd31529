"""`megatron-sgtm demo` trains its runs side by side within the cores: never more processes than cores, the
single-process runs two at a time on 2 cores, and a failed run stops the others (each run here is a short Python
process standing in for `megatron-sgtm train`: what is tested is the scheduling, not training)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from megatron_sgtm import demo

RUN = """
import json, sys, time
from pathlib import Path
run_dir, seconds, code = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
start = time.time()
time.sleep(seconds)
if code:
    sys.exit(code)
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "summary.json").write_text(json.dumps({"start": start, "end": time.time()}))
"""


def _fake_training(monkeypatch, seconds: dict[str, float], fail: str | None = None) -> None:
    def command(out: Path, data: Path, name: str, steps: int | None) -> list[str]:
        return [sys.executable, "-c", RUN, str(out / "runs" / name), str(seconds[name]), str(int(name == fail) * 3)]
    monkeypatch.setattr(demo, "_train_command", command)


def test_runs_share_the_cores_and_each_result_is_kept(tmp_path, monkeypatch):
    _fake_training(monkeypatch, dict.fromkeys(demo.RUNS, 0.6))
    results = demo.train_runs(tmp_path, tmp_path, steps=None, cores=2)
    assert set(results) == set(demo.RUNS)
    spans = {name: (r["start"], r["end"]) for name, r in results.items()}
    for t in sorted(s for span in spans.values() for s in span):  # processes alive at each start or end
        busy = sum(demo.RUNS[n][1] for n, (a, b) in spans.items() if a <= t < b)
        assert busy <= 2, (t, spans)
    (a0, a1), (b0, b1) = spans["weak_filter"], spans["no_filter"]
    assert a0 < b1 and b0 < a1, spans  # the single-process runs overlap
    started = time.time()
    assert demo.train_runs(tmp_path, tmp_path, steps=None, cores=2) == results  # finished runs are not rerun
    assert time.time() - started < 0.5


def test_a_failed_run_stops_the_others_and_says_which(tmp_path, monkeypatch):
    _fake_training(monkeypatch, {**dict.fromkeys(demo.RUNS, 0.2), "no_filter": 2.0}, fail="weak_filter")
    started = time.time()
    with pytest.raises(SystemExit, match=r"(?s)step failed \(exit 3\).*train_weak_filter\.log"):
        demo.train_runs(tmp_path, tmp_path, steps=None, cores=2)
    assert time.time() - started < 2.0  # weak_filter's failure is reported at once ...
    time.sleep(2.5)
    assert not (tmp_path / "runs" / "no_filter" / "summary.json").exists()  # ... and no_filter was stopped
    assert json.loads((tmp_path / "runs" / "sgtm" / "summary.json").read_text())  # finished before: kept
