"""Every reader of a checkpoint checks it first (`checkpoint.read_meta`): a bit flipped in a weight is refused by
export-hf, ablate, inspect, eval, unlearn rmu, attack finetune and a train resume, each with exit 2 and one line
naming the file, and none writes a meta.json; meta.json edited (step, sampler step, garbage) is refused;
``resume=auto`` skips a corrupt newest checkpoint for the newest intact one and says so; a checkpoint of the
other engine, a same-shaped shard directory with other documents and another tokenizer are refused naming the
field and both values. One worker process trains once (and a one-step DeepSpeed run) and runs them all."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.support import run_worker

READERS = ("export-hf", "ablate", "inspect", "eval", "unlearn rmu", "attack finetune", "train resume")
IDENTITY_HINT = " in this run (resume only the run that wrote it, or start a new checkpoint.dir)"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("checkpoint_verify")
    run_worker("checkpoint_verify.py", out, 1200, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return json.loads((out / "results.json").read_text())


def _one_line(run: dict, command: str) -> str:
    """The command's error line: exit 2, the only line of ours, the last one, no traceback."""
    ours = [line for line in run["stderr"] if line.startswith("megatron-sgtm ")]
    assert run["status"] == 2 and len(ours) == 1 and ours[0] == run["stderr"][-1], run["stderr"][-10:]
    assert not any(line.startswith("Traceback") for line in run["stderr"])
    assert ours[0].startswith(f"megatron-sgtm {command.split(' resume')[0]}: "), ours[0]
    return ours[0].split(": ", 1)[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_flip_is_silent_damage_one_unit_in_the_last_place_of_one_fc1_weight(results):
    before, after = results["flip"]["before"], results["flip"]["after"]
    assert before != after and abs(after - before) < 1e-8


@pytest.mark.parametrize("command", READERS)
def test_a_flipped_bit_is_refused_by_every_reader_naming_the_file_and_nothing_is_written(results, command):
    run, path = results["flipped"][command], results["flipped"]["path"]
    assert _one_line(run, command) == (f"checkpoint {path}: {results['flip']['file']} does not match its SHA-256 in "
                                       "meta.json (corrupt or modified)")
    assert run["written"] == []  # no meta.json blessing the damaged weights (nor a checkpoint of them)
    if command == "train resume":
        assert not run["summary"] and run["checkpoints"] == []


@pytest.mark.parametrize("command", ["export-hf", "attack finetune"])
def test_a_deleted_common_pt_is_one_line_naming_it(results, command):
    path = results["deleted"]["path"]
    assert _one_line(results["deleted"][command], command) == (f"checkpoint {path}: common.pt is missing (its SHA-256 "
                                                               "is in meta.json)")


@pytest.mark.parametrize("edit", ["step", "sampler step", "garbage"])
@pytest.mark.parametrize("command", ["train resume", "ablate"])
def test_an_edited_meta_json_is_refused_naming_it(results, edit, command):
    run = results["edited"][edit]
    assert _one_line(run[command], command) == (
        f"checkpoint {run['path']}: meta.json does not match its SHA-256 in meta.sha256 (corrupt or edited; a "
        "checkpoint's meta.json is not to be changed by hand)")
    if command == "train resume":
        assert not run[command]["summary"] and run[command]["checkpoints"] == []


@pytest.mark.parametrize("edit, message", [("garbage, no digest", "not valid JSON (Expecting value: line 1"),
                                           ("a JSON list, no digest", "not a checkpoint's meta.json (a JSON list")])
def test_a_garbage_meta_json_without_its_digest_is_still_one_line_naming_it(results, edit, message):
    run = results["edited"][edit]
    assert _one_line(run["inspect"], "inspect").startswith(f"{run['path']}/meta.json: {message}")


def test_resume_auto_skips_a_corrupt_newest_checkpoint_for_the_newest_intact_one_and_says_so(results):
    run, root = results["fallback"], results["fallback"]["root"]
    assert run["status"] == 0, run["stderr"][-10:]
    assert (f"checkpoint.resume=auto {root}: skipping iter_0000004, it fails its checks: checkpoint {root}/"
            f"iter_0000004: {results['flip']['file']} does not match its SHA-256 in meta.json (corrupt or "
            "modified)") in run["stderr"]
    assert f"resumed from {root}/iter_0000002 at step 2" in run["stderr"]
    assert [r["step"] for r in run["metrics"] if r["kind"] == "train"] == [3, 4]
    assert run["summary"] and run["checkpoints"] == ["iter_0000002", "iter_0000004", "latest.json"]


def test_resume_auto_with_no_intact_checkpoint_is_refused_not_started_over(results):
    run, root = results["none intact"], results["none intact"]["root"]
    assert _one_line(run, "train") == (
        f"checkpoint.resume=auto {root}: no complete checkpoint passes its checks (checkpoint {root}/iter_0000002: "
        f"{results['flip']['file']} does not match its SHA-256 in meta.json (corrupt or modified); 1 newer one(s) "
        "failed too)")
    assert not run["summary"]


@pytest.mark.parametrize("direction", ["deepspeed -> megatron", "megatron -> deepspeed"])
def test_a_checkpoint_of_the_other_engine_is_refused_in_one_line(results, direction):
    run = results["engine"][direction]
    saved, mine = direction.split(" -> ")
    assert _one_line(run, "train") == f"checkpoint {run['path']}: parallel.engine is '{saved}' there but '{mine}'" \
                                      + IDENTITY_HINT
    assert not run["summary"]


def test_a_same_shaped_shard_directory_with_other_documents_is_refused_naming_data_and_both_values(results):
    run = results["content"]["other documents"]
    ours, theirs = (json.loads((Path(p) / "manifest.json").read_text()) for p in (results["data"], run["data"]))
    assert ours["num_docs"] == theirs["num_docs"] and len(ours["shards"]) == len(theirs["shards"])
    assert ours["shards"][0]["sha256"] != theirs["shards"][0]["sha256"]
    line = _one_line(run, "train")
    saved = results["identity"]["data"]
    assert line.startswith(f"checkpoint {results['newest']}: data is '{saved}' there but '") and \
        line.endswith(f"'{IDENTITY_HINT}"), line
    mine = line.split(" there but '")[1].split("'")[0]
    assert len(mine) == 64 and mine != saved


def test_another_tokenizer_is_refused_naming_it_and_both_files_sha256(results):
    run = results["content"]["other tokenizer"]
    saved, mine = (_sha256(Path(p) / "tokenizer.json") for p in (results["data"], run["data"]))
    assert saved != mine
    assert _one_line(run, "train") == (f"checkpoint {results['newest']}: tokenizer is '{saved}' there but '{mine}'"
                                       + IDENTITY_HINT)
