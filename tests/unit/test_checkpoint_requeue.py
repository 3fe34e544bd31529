"""slurm/launch.sh after USR1 requeues only a run that saved its checkpoint and stopped (status line "stopped",
or the tasks' exit status 75): one that failed (a non-finite loss, a refused checkpoint) would fail again on
every requeue. After TERM it requeues nothing and exits 75 for a stopped run. srun and scontrol are fakes: this
covers the script's branches on the step's outcome, not SLURM (tests/distributed/test_slurm.py runs the real one)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.support import ROOT

# The job step: reports it started, waits for the forwarded signal, then ends as FAKE_OUTCOME says: "stopped" as
# rank 0 and the tasks report a stop; "killed_rank0": exit 75 without the status line (srun ended rank 0 first).
FAKE_SRUN = """#!/bin/bash
got=0
trap 'got=1' USR1 TERM
touch "$FAKE_DIR/started"
for _ in $(seq 200); do sleep 0.05; [ $got = 1 ] && break; done
if [ "$FAKE_OUTCOME" = stopped ]; then echo stopped > "$SGTM_STATUS_FILE"; exit 75; fi
if [ "$FAKE_OUTCOME" = killed_rank0 ]; then exit 75; fi
exit 3
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_DIR/requeued"
"""


@pytest.mark.parametrize("sig,outcome,code,requeued", [
    (signal.SIGUSR1, "stopped", 0, True), (signal.SIGUSR1, "killed_rank0", 0, True),
    (signal.SIGUSR1, "failed", 3, False), (signal.SIGTERM, "stopped", 75, False)])
def test_usr1_requeues_a_stopped_run_and_not_a_failed_one(tmp_path, sig, outcome, code, requeued):
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), FAKE_OUTCOME=outcome,
               SGTM_HOME=str(ROOT), SGTM_PYTHON="python3", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node1",
               SLURM_NTASKS="2", TMPDIR=str(tmp_path))
    proc = subprocess.Popen(["bash", str(ROOT / "slurm" / "launch.sh"), "cfg.yaml"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(sig)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == code, out
    assert (tmp_path / "requeued").exists() == requeued, out
    if requeued:
        assert (tmp_path / "requeued").read_text() == "requeue 42\n"
