"""Resume across layouts and processes: elastic resume on the megatron engine, DeepSpeed in a fresh process.

Elastic: a DP=2 run checkpoints every 2 of 6 steps; its step-2 checkpoint resumes at DP=1, whose step-4
checkpoint resumes at DP=4. The global stream is counted in global steps, so each step delivers the
same documents as the uninterrupted run (every token once), and the losses continue it (within fp32
round-off, as the DP reduction order changes). DeepSpeed: a ZeRO-2 run SIGKILLed after a checkpoint
resumes in a fresh process with the uninterrupted run's exact losses, and refuses another DP size or
global batch size from meta.json alone, before anything is built.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_sgtm.training.checkpoint import CheckpointError
from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.loop import check_resumable
from megatron_sgtm.training.run_data import load_data
from tests.distributed.launch import torchrun
from tests.support import child_env
from tests.support.cli_runs import kill_when, train_command, train_losses
from tests.support.train_fixtures import build_tiny_shards, tiny_config

STEPS = {"train_steps": 6, "eval_batches": 4}  # eval_batches: a multiple of every DP size here


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("data") / "shards")


def _run(data: Path, tmp: Path, nproc: int, name: str, checkpoint: dict) -> dict:
    """One `train()` job at world `nproc` (DP = world), recording the documents of every step."""
    cfg = tiny_config(data, tmp / name, train=STEPS,
                      checkpoint={"save_interval": 2, "keep_last": 5, **checkpoint})
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"runs": {name: cfg}, "record_docs": True}))
    return torchrun("megatron_train.py", nproc, tmp / f"{name}_out", str(spec))


@pytest.fixture(scope="module")
def elastic(data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("elastic")
    dp2 = _run(data, tmp, 2, "dp2", {"dir": str(tmp / "ckpt_dp2")})
    dp1 = _run(data, tmp, 1, "dp1", {"dir": str(tmp / "ckpt_dp1"), "resume": str(tmp / "ckpt_dp2" / "iter_0000002")})
    dp4 = _run(data, tmp, 4, "dp4", {"dir": str(tmp / "ckpt_dp4"), "resume": str(tmp / "ckpt_dp1" / "iter_0000004")})
    return {**dp2, **dp1, **dp4}


def _tokens(docs: torch.Tensor, steps: range) -> list[tuple[int, int]]:
    """Sorted (document, offset) of every input token the recorded rows (step, doc, offset) hold at `steps`."""
    rows = docs[(docs[:, 0] >= steps.start) & (docs[:, 0] < steps.stop)]
    return sorted(map(tuple, rows[:, 1:].tolist()))


def test_elastic_resume_delivers_every_document_of_the_uninterrupted_stream_once(elastic):
    """Steps 1-2 at DP=2, 3-4 at DP=1, 5-6 at DP=4 deliver, step by step, exactly the tokens of the
    uninterrupted DP=2 run, none twice (six steps are well inside one epoch)."""
    segments = [("dp2", range(0, 2)), ("dp1", range(2, 4)), ("dp4", range(4, 6))]
    for name, steps in segments:
        assert elastic[f"{name}/docs"][:, 0].min() == steps.start, name  # resumed at the saved step
        for step in steps:
            assert _tokens(elastic[f"{name}/docs"], range(step, step + 1)) == \
                _tokens(elastic["dp2/docs"], range(step, step + 1)), (name, step)
    delivered = [t for name, steps in segments for t in _tokens(elastic[f"{name}/docs"], steps)]
    assert len(delivered) == len(set(delivered)) == len(_tokens(elastic["dp2/docs"], range(6))) > 0


def test_elastic_resume_continues_the_losses(elastic):
    reference = elastic["dp2/losses"]
    assert len(reference) == 6
    for name, first in (("dp1", 2), ("dp4", 4)):
        resumed = elastic[f"{name}/losses"]
        assert len(resumed) == 6 - first
        torch.testing.assert_close(resumed, reference[first:], rtol=1e-5, atol=0, msg=name)


# -- DeepSpeed: resume in a fresh process ---------------------------------------------------------
def test_deepspeed_sigkill_and_resume_in_a_fresh_process_reproduce_the_run_exactly(data, tmp_path):
    env = child_env()
    sections = {"train": {"train_steps": 8}, "parallel": {"engine": "deepspeed", "zero_stage": 2}}
    full = tiny_config(data, tmp_path / "full", **sections)
    subprocess.run(train_command(tmp_path, full, "full"), env=env, check=True, capture_output=True,
                   timeout=600)

    ckpt = {"dir": str(tmp_path / "ckpt"), "save_interval": 2, "keep_last": 2, "resume": "auto"}
    killed = tiny_config(data, tmp_path / "killed", checkpoint=ckpt, **sections)
    kill_when(train_command(tmp_path, killed, "killed"), env, tmp_path / "ckpt" / "iter_0000004" / "meta.json")
    assert max(train_losses(tmp_path / "killed")) < 8, "the run finished before it could be killed"

    resumed = tiny_config(data, tmp_path / "resumed", checkpoint=ckpt, **sections)
    subprocess.run(train_command(tmp_path, resumed, "resumed"), env=env, check=True, capture_output=True,
                   timeout=600)
    expected, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert min(got) >= 5 and max(got) == 8
    for step, loss in got.items():
        assert loss == expected[step], f"step {step}: {loss!r} != {expected[step]!r}"

    # The same checkpoint at another DP size or global batch size: refused from meta.json, naming both.
    saved = max(p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("iter_"))
    cfg = from_dict(resumed)
    with pytest.raises(CheckpointError, match="data-parallel size 2 .*not at data-parallel size 1"):
        check_resumable(cfg, load_data(cfg), saved, world=1)
    bigger = from_dict(tiny_config(data, tmp_path / "gbs", optim={"global_batch_size": 16}, **sections))
    with pytest.raises(CheckpointError, match="global_batch_size=16, but the checkpoint was saved with 8"):
        check_resumable(bigger, load_data(bigger), saved, world=2)
