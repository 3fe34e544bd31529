"""tools/chaos_resume.py end to end, small: one trial (a 2-rank job SIGKILLed just after step 4 of 6 is logged,
so after its step-2 checkpoint, then resumed with ``checkpoint.resume=auto``) must reproduce the uninterrupted
run's every logged step loss and final evaluation. The full 20-trial result is in docs/results/reliability.md."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support import ROOT, child_env


def test_one_chaos_trial_resumes_to_the_uninterrupted_runs_losses_and_evaluation(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "chaos_resume.py"), "--trials", "1", "--steps", "6",
                           "--save-interval", "2", "--seed", "2", "--out", str(tmp_path)],
                          env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trial 1/1: identical" in proc.stdout and "1/1 trials resumed" in proc.stdout, proc.stdout
    resumed_at = re.search(r"resumed (\d+)\.\.6", proc.stdout)
    assert resumed_at and int(resumed_at.group(1)) > 1, proc.stdout  # from a checkpoint, not from scratch
