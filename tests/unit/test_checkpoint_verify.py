"""Checkpoint checksums (model-only checkpoints), the resume identity check, the optimizer settings a
resume ignores, metrics.jsonl rewound to the resumed step, and its per-step wall and CPU seconds."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest
import torch

from megatron_sgtm.training import checkpoint
from megatron_sgtm.training.checkpoint import CheckpointError
from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.logging import RunLogger
from tests.support.train_fixtures import build_tiny_shards, tiny_config


@pytest.fixture
def model_only(tmp_path) -> Path:
    extra = tmp_path / "tokenizer.json"
    extra.write_text("{}")
    state = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}
    return checkpoint.write_model_only(tmp_path / "ablated", state, {"config": {}}, [extra])


def test_a_model_only_checkpoint_records_and_checks_the_sha256_of_its_files(model_only):
    meta = json.loads((model_only / "meta.json").read_text())
    assert sorted(meta["sha256"]) == ["model.safetensors", "tokenizer.json"]
    assert torch.equal(checkpoint.load_model_only(model_only)[1]["w"], torch.arange(64.0).reshape(8, 8))
    weights = model_only / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # the last weight's last byte: still a readable file
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_model_only(model_only)
    assert str(err.value) == (f"checkpoint {model_only}: model.safetensors does not match its SHA-256 in meta.json "
                              "(corrupt or modified)")
    unchecked = checkpoint.load_model_only(model_only, verify=False)[1]["w"]
    assert not torch.equal(unchecked, torch.arange(64.0).reshape(8, 8))


def test_a_missing_file_is_named_and_a_checkpoint_without_checksums_still_loads(model_only):
    (model_only / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer.json is missing \(its SHA-256 is in meta.json\)$"):
        checkpoint.load_model_only(model_only)
    meta = json.loads((model_only / "meta.json").read_text())
    del meta["sha256"], meta["meta_digest"]  # written before checksums existed
    (model_only / "meta.json").write_text(json.dumps(meta))
    (model_only / "meta.sha256").unlink()
    assert checkpoint.load_model_only(model_only)[1]["w"].shape == (8, 8)


def test_meta_json_is_checked_against_its_digest_and_the_digest_cannot_just_be_removed(model_only):
    """meta.json edited (a value a reader acts on) is refused naming it; deleting meta.sha256 as well does not
    pass for an older checkpoint, since meta.json names its digest file."""
    meta_file = model_only / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "ablated": True}, indent=2))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_model_only(model_only)
    assert str(err.value) == (f"checkpoint {model_only}: meta.json does not match its SHA-256 in meta.sha256 "
                              "(corrupt or edited; a checkpoint's meta.json is not to be changed by hand)")
    (model_only / "meta.sha256").write_bytes(b"\xff\xfe not a digest")
    with pytest.raises(CheckpointError, match=r"meta.json does not match its SHA-256 in meta.sha256 \(corrupt"):
        checkpoint.load_model_only(model_only)
    (model_only / "meta.sha256").unlink()
    with pytest.raises(CheckpointError, match=r"meta.sha256 is missing \(the SHA-256 of its meta.json, which names "
                                              r"it\)$"):
        checkpoint.load_model_only(model_only)
    assert checkpoint.load_model_only(model_only, verify=False)[0]["ablated"]  # checkpoint.verify: false


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfg")
    return from_dict(tiny_config(build_tiny_shards(tmp / "shards", num_docs=60), tmp / "run"))


def test_a_resume_by_another_method_partition_or_data_is_refused_naming_the_field(cfg, tmp_path):
    identity = checkpoint.run_identity(cfg, cfg.sgtm.resolve(cfg.model.dims()))
    checkpoint.check_identity(tmp_path, {"identity": identity}, identity)
    checkpoint.check_identity(tmp_path, {}, identity)  # a checkpoint from before identities: not checked
    other = from_dict({**cfg.to_dict(), "sgtm": {"forget_heads": 2, "forget_mlp_units": 8}})
    cases = {
        "method": ({**identity, "method": "none"}, "'none' there but 'sgtm'"),
        "partition.forget_heads": (checkpoint.run_identity(other, other.sgtm.resolve(other.model.dims())),
                                   "[2, 3] there but [3]"),
        "model.hidden_size": ({**identity, "model.hidden_size": 64}, "64 there but 32"),
        "data": ({**identity, "data": "0" * 64}, f"'{'0' * 64}' there but '{identity['data']}'"),
    }
    for field, (saved, values) in cases.items():
        with pytest.raises(CheckpointError) as err:
            checkpoint.check_identity(tmp_path, {"identity": saved}, identity)
        assert str(err.value).startswith(f"checkpoint {tmp_path}: {field} is {values} in this run ("), field


def test_the_settings_a_resume_ignores_are_listed_old_to_new(cfg):
    saved = {"config": cfg.to_dict()}
    assert checkpoint.ignored_changes(saved, cfg) == []
    changed = from_dict({**cfg.to_dict(), "optim": {**cfg.to_dict()["optim"], "lr": 0.01, "clip_grad": 0.5}})
    assert checkpoint.ignored_changes(saved, changed) == ["optim.lr 0.003 -> 0.01"]  # clip_grad takes effect
    longer = from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "train_steps": 9}})
    assert checkpoint.ignored_changes(saved, longer) == [
        "train.train_steps 5 -> 9 for the LR decay (the run trains to step 9, its LR decays over the checkpoint's 5 "
        "steps)"]


def test_rewind_keeps_one_record_per_step_up_to_the_resumed_one(cfg):
    log = RunLogger(cfg, rank=0, world_size=1)
    log.rewind(0)  # the module's other tests share the run directory
    for step in range(1, 7):
        log.record("train", step, {"loss": float(step)})
    log.record("eval", 5, {"forget_loss": 1.0})
    log.metrics.write('{"kind": "train", "st')  # torn by a SIGKILL
    log.rewind(4)
    log.record("train", 5, {"loss": 15.0})
    log.close()
    records = [json.loads(line) for line in (Path(cfg.logging.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r["loss"]) for r in records] == [
        *(("train", s, float(s)) for s in range(1, 5)), ("train", 5, 15.0)]


def test_rewind_at_the_last_step_drops_the_final_evaluation_the_run_repeats(cfg):
    log = RunLogger(cfg, rank=0, world_size=1)
    log.rewind(0)  # a fresh run: nothing from an earlier one stays
    last = cfg.train.train_steps
    log.record("train", last, {"loss": 1.0})
    log.record("eval", last, {"forget_loss": 2.0})
    log.rewind(last)
    log.close()
    lines = (Path(cfg.logging.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert [(r["kind"], r["step"]) for r in map(json.loads, lines)] == [("train", last)]


def test_checkpoint_resume_given_a_root_continues_its_newest_complete_checkpoint(tmp_path, capsys):
    """checkpoint.resume=<checkpoint.dir> (Megatron-LM's --load) is the newest complete iteration, as 'auto' finds
    it, not an older one nor a crashed save; an iteration given itself is kept."""
    root = tmp_path / "ckpt"
    for name in ("iter_0000002", "iter_0000004"):
        (root / name).mkdir(parents=True)
        (root / name / checkpoint.META).write_text("{}")
    (root / "iter_0000006.partial").mkdir()
    (root / checkpoint.LATEST).write_text('{"step": 4, "path": "iter_0000004"}')
    assert checkpoint.resolve_resume(str(root), None) == root / "iter_0000004"
    assert "checkpoint.resume " + str(root) + ": using iter_0000004" in capsys.readouterr().err
    assert checkpoint.resolve_resume(str(root / "iter_0000002"), None) == root / "iter_0000002"


def test_train_records_carry_the_steps_wall_and_cpu_seconds(cfg):
    """tools/bench_train.py's CPU clock: a train record's `step_cpu_s` is this process's CPU time since the previous
    record (getrusage's user + system time), to which time off the CPU (a sleep here, other processes holding the
    cores on a shared machine) adds nothing; `step_s` is the wall time, to which it does."""
    log = RunLogger(cfg, rank=0, world_size=1)
    log.rewind(0)
    metrics = {"loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens": 100.0, "label_counts": [1.0, 1.0, 1.0]}
    gated = {"retain": 0, "forget": 0}
    log.train_step(1, 2, metrics, gated)

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    start_cpu, start_wall = cpu_seconds(), time.time()
    while cpu_seconds() - start_cpu < 0.3:  # busy
        sum(range(1000))
    time.sleep(0.4)  # off the CPU
    burned, waited = cpu_seconds() - start_cpu, time.time() - start_wall
    log.train_step(2, 2, metrics, gated)
    log.close()
    record = [json.loads(line) for line in (Path(cfg.logging.run_dir) / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["step"] == 2
    assert abs(record["step_cpu_s"] - burned) < 0.05, (record["step_cpu_s"], burned)
    assert record["step_s"] >= waited and record["step_s"] - record["step_cpu_s"] >= 0.35
    assert record["tokens_per_s"] == pytest.approx(100.0 / record["step_s"])
