"""Resume across layouts, processes and signals, on both engines.

Elastic (megatron): a DP=2 run checkpoints every 2 of 6 steps; its step-2 checkpoint resumes at DP=1, whose step-4
checkpoint resumes at DP=4. Elastic (DeepSpeed ZeRO-2): the same DP=2 run's step-4 checkpoint resumes at DP=1 through
DeepSpeed's universal checkpoint, converted on the fly. The global stream is counted in global steps, so each step
delivers the same documents as the uninterrupted run (every token once), the losses continue it (within fp32
round-off, as the DP reduction order changes), and `train_tokens` (summary.json) is the uninterrupted run's exactly.
Signals: SIGTERM to the ranks of a 2-rank torchrun job saves, records ``stopped`` in status.json and exits 75; the run
then finishes at DP=1. DeepSpeed: a ZeRO-2 run SIGKILLed after a checkpoint resumes in a fresh process with the
uninterrupted run's exact losses, and refuses another TP size or global batch size from meta.json alone.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from megatron_sgtm.compat.deepspeed import weights_only_torch_load
from megatron_sgtm.training.checkpoint import CheckpointError
from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.loop import STOPPED_EXIT_STATUS, check_resumable
from megatron_sgtm.training.run_data import TOKEN_GROUPS, load_data
from tests.distributed.launch import torchrun
from tests.support import child_env
from tests.support.cli_runs import kill_when, train_command, train_losses
from tests.support.train_fixtures import build_tiny_shards, tiny_config

STEPS = {"train_steps": 6, "eval_batches": 4}  # eval_batches: a multiple of every DP size here
DEEPSPEED = {"engine": "deepspeed", "zero_stage": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("data") / "shards")


def _run(data: Path, tmp: Path, nproc: int, name: str, checkpoint: dict, **sections) -> dict:
    """One `train()` job at world `nproc` (DP = world), recording the documents of every step."""
    cfg = tiny_config(data, tmp / name, train=STEPS,
                      checkpoint={"save_interval": 2, "keep_last": 5, **checkpoint}, **sections)
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


@pytest.fixture(scope="module")
def deepspeed_elastic(data, tmp_path_factory) -> dict:
    """ZeRO-2 at DP=2 for 6 steps; its step-4 checkpoint (after a step that froze Θ_R, so the per-region step
    counters differ) resumed at DP=1 (universal checkpoint) to step 6."""
    tmp = tmp_path_factory.mktemp("deepspeed_elastic")
    dp2 = _run(data, tmp, 2, "dp2", {"dir": str(tmp / "ckpt_dp2")}, parallel=DEEPSPEED)
    dp1 = _run(data, tmp, 1, "dp1", {"dir": str(tmp / "ckpt_dp1"), "resume": str(tmp / "ckpt_dp2" / "iter_0000004")},
               parallel=DEEPSPEED)
    return {**dp2, **dp1, "tmp": tmp}


def _tokens(docs: torch.Tensor, steps: range) -> list[tuple[int, int]]:
    """Sorted (document, offset) of every input token the recorded rows (step, doc, offset) hold at `steps`."""
    rows = docs[(docs[:, 0] >= steps.start) & (docs[:, 0] < steps.stop)]
    return sorted(map(tuple, rows[:, 1:].tolist()))


def assert_same_stream(results: dict, segments: list[tuple[str, range]]) -> None:
    """The runs of `segments` (name, the global steps it trained) deliver, step by step, exactly the tokens of the
    uninterrupted run (the first segment's run), none twice (six steps are well inside one epoch)."""
    reference = results[f"{segments[0][0]}/docs"]
    for name, steps in segments:
        assert results[f"{name}/docs"][:, 0].min() == steps.start, name  # resumed at the saved step
        for step in steps:
            assert _tokens(results[f"{name}/docs"], range(step, step + 1)) == \
                _tokens(reference, range(step, step + 1)), (name, step)
    delivered = [t for name, steps in segments for t in _tokens(results[f"{name}/docs"], steps)]
    assert len(delivered) == len(set(delivered)) == len(_tokens(reference, range(6))) > 0


def assert_losses_continue(results: dict, reference: str, resumed: dict[str, int]) -> None:
    """Each resumed run's losses (name -> its first step index) continue the reference run's, to fp32 round-off."""
    assert len(results[f"{reference}/losses"]) == 6
    for name, first in resumed.items():
        got = results[f"{name}/losses"]
        assert len(got) == 6 - first
        torch.testing.assert_close(got, results[f"{reference}/losses"][first:], rtol=1e-5, atol=0, msg=name)


def test_elastic_resume_delivers_every_document_of_the_uninterrupted_stream_once(elastic):
    """Steps 1-2 at DP=2, 3-4 at DP=1, 5-6 at DP=4."""
    assert_same_stream(elastic, [("dp2", range(0, 2)), ("dp1", range(2, 4)), ("dp4", range(4, 6))])


def test_elastic_resume_continues_the_losses(elastic):
    assert_losses_continue(elastic, "dp2", {"dp1": 2, "dp4": 4})


def test_elastic_resume_counts_the_uninterrupted_runs_train_tokens(elastic):
    """summary.json's per-group token counts, summed over DP and carried through two resumes at other DP sizes."""
    assert elastic["dp4/train_tokens"].tolist() == elastic["dp2/train_tokens"].tolist()
    assert elastic["dp2/train_tokens"][TOKEN_GROUPS.index("total")] > 0


# -- DeepSpeed at another DP size: the universal checkpoint -----------------------------------------------
def _sgtm_steps(checkpoint: Path) -> list[list[int]]:
    """Per param group, ZeroSGTMAdamW's per-region step counters [joint, retain, forget] in rank 0's ZeRO file."""
    with weights_only_torch_load():
        state = torch.load(checkpoint / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return [group["sgtm_steps"] for group in state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]]


def test_deepspeed_resumes_at_another_dp_size_through_a_universal_checkpoint(deepspeed_elastic):
    """ZeRO-2 DP=2 -> DP=1: the same documents step by step, the losses continued, the same `train_tokens`, and the
    per-region Adam step counters carried over: at the end both runs' counters are [steps, steps - steps that froze
    Θ_R, steps - steps that froze Θ_F] by the loop's own count of gated steps (meta.json)."""
    results, tmp = deepspeed_elastic, deepspeed_elastic["tmp"]
    resumed_from = tmp / "ckpt_dp2" / "iter_0000004"
    assert (resumed_from / "deepspeed_universal" / "zero").is_dir()  # converted, then loaded
    gated = json.loads((resumed_from / "meta.json").read_text())["gated"]
    assert gated["retain"] + gated["forget"] > 0, "no step froze a region before the resume: counters all equal"
    assert_same_stream(results, [("dp2", range(0, 4)), ("dp1", range(4, 6))])
    assert_losses_continue(results, "dp2", {"dp1": 4})
    assert results["dp1/train_tokens"].tolist() == results["dp2/train_tokens"].tolist()
    for run in ("dp2", "dp1"):
        final = tmp / f"ckpt_{run}" / "iter_0000006"
        gated = json.loads((final / "meta.json").read_text())["gated"]
        expected = [6, 6 - gated["retain"], 6 - gated["forget"]]
        assert _sgtm_steps(final) == [expected] * len(_sgtm_steps(final)), run


# -- Signals: a stop is not a success ----------------------------------------------------------------------
def test_sigterm_saves_records_stopped_exits_75_and_the_run_finishes_at_dp1(data, elastic, tmp_path):
    """SIGTERM to both ranks of a 2-rank torchrun job (as SLURM signals every task): they save, status.json says
    ``stopped`` with the signal, the step and the checkpoint, there is no summary.json, and the ranks exit 75
    (torchrun, itself exiting 1, reports their status). Resumed at DP=1 the run ends with the uninterrupted DP=2
    run's (the elastic fixture's) losses and `train_tokens`."""
    env = child_env()
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    cfg = tiny_config(data, run_dir, train=STEPS, checkpoint={"dir": str(ckpt), "resume": "auto"})
    log = tmp_path / "stopped.log"
    with log.open("w") as out:
        proc = subprocess.Popen(train_command(tmp_path, cfg, "stopped"), env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and train_losses(run_dir)):
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.02)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "megatron_sgtm.cli" in p.cmdline()]
        assert len(ranks) == 2
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    output = log.read_text()
    logged = train_losses(run_dir)
    assert max(logged) < 6, "the run finished before the signal"
    assert proc.returncode != 0, output
    assert len(re.findall(rf"exitcode\s*:\s*{STOPPED_EXIT_STATUS}\b", output)) >= 1, output
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["signal"] == "SIGTERM" and status["step"] == max(logged)
    assert Path(status["checkpoint"]) == ckpt / f"iter_{max(logged):07d}" and Path(status["checkpoint"]).is_dir()
    assert not (run_dir / "summary.json").exists()
    for step, loss in logged.items():
        assert loss == elastic["dp2/losses"][step - 1].item(), step

    subprocess.run(train_command(tmp_path, cfg, "resumed", 1), env=env, check=True, capture_output=True, timeout=600)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [summary["train_tokens"][g] for g in TOKEN_GROUPS] == elastic["dp2/train_tokens"].tolist()
    resumed = train_losses(run_dir)
    assert sorted(resumed) == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([resumed[s] for s in range(1, 7)], dtype=torch.float64),
                               elastic["dp2/losses"], rtol=1e-5, atol=0)


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

    # train_tokens (summary.json): exact across the kill and the resume.
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("full", "resumed")]
    assert summaries[1]["train_tokens"] == summaries[0]["train_tokens"]

    # The same checkpoint at another TP size or global batch size: refused from meta.json, naming both.
    saved = max(p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("iter_"))
    tp2 = from_dict({**resumed, "parallel": {**resumed["parallel"], "tensor_model_parallel_size": 2}})
    with pytest.raises(CheckpointError, match=r"size 2 \(TP 1, ZeRO-2\).*not at data-parallel size 1 \(TP 2\)"):
        check_resumable(tp2, load_data(tp2), saved, world=2)
    bigger = from_dict(tiny_config(data, tmp_path / "gbs", optim={"global_batch_size": 16}, **sections))
    with pytest.raises(CheckpointError, match="global_batch_size=16, but the checkpoint was saved with 8"):
        check_resumable(bigger, load_data(bigger), saved, world=2)
