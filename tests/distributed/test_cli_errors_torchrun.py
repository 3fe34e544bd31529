"""Under torchrun the one-line error appears once, whichever ranks meet the bad input: all of them before the
process groups exist (a bad config) and after (a resume path that is not a checkpoint), or rank 1 alone while
rank 0 waits in a collective (printed by rank 1; torchrun reports its exit status 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.train_fixtures import build_tiny_shards, tiny_config


def _torchrun_train(config: Path, *overrides: str, program: tuple[str, ...] = ("-m", "megatron_sgtm.cli"),
                    ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONWARNINGS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           *program, "train", "--config", str(config), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("data") / "shards", num_docs=100)


@pytest.mark.parametrize("case", ["bad config", "resume from a non-checkpoint", "rank 1 alone"])
def test_the_error_line_appears_once_and_no_traceback_of_ours(case, shards, tmp_path):
    if case == "bad config":
        config = tmp_path / "bad.yaml"
        config.write_text("model: {bogus: 1}\n")
        proc, needle = _torchrun_train(config), f"megatron-sgtm train: {config}: model: unknown key(s) ['bogus']"
    elif case == "rank 1 alone":
        config = tmp_path / "cfg.yaml"
        config.write_text(json.dumps(tiny_config(shards, tmp_path / "run")))
        proc = _torchrun_train(config, program=(str(ROOT / "tests/distributed/workers/rank_one_error.py"),))
        needle = f"megatron-sgtm train: shard {shards}/shard-000000.tar: cannot be read (Input/output error on rank 1)"
    else:  # checked in train(), after init_distributed
        config = tmp_path / "cfg.yaml"
        config.write_text(json.dumps(tiny_config(shards, tmp_path / "run")))
        missing = tmp_path / "no-checkpoint"
        proc = _torchrun_train(config, f"--checkpoint.resume={missing}")
        needle = f"megatron-sgtm train: checkpoint.resume={missing}: not a complete checkpoint (no meta.json there)"
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    ours = [line for line in output.splitlines() if "megatron-sgtm train:" in line]
    assert len(ours) == 1 and ours[0].startswith(needle), output[-4000:]
    assert not re.search(r'File ".*megatron_sgtm', output), output[-4000:]  # torchrun's own report may follow
    assert "exitcode: 2" in output or "exitcode  : 2" in output, output[-4000:]
