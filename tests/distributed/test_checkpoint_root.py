"""Every command that takes --checkpoint (inspect, ablate, export-hf, eval, unlearn rmu and cir, attack finetune)
also takes a checkpoint root (a run's checkpoint.dir, Megatron-LM's --load): it reads the newest complete iteration,
not an older one nor a crashed save, and says on stderr which one; a root without a complete checkpoint is one line
(one worker process trains once and runs them all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_worker

COMMANDS = ("inspect", "ablate", "export-hf", "eval", "unlearn rmu", "unlearn cir", "attack finetune")
NEWEST, STEP = "iter_0000004", 4  # the worker trains 4 steps and saves at 2 and 4


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("checkpoint_root")
    run_worker("checkpoint_root.py", out, 1200, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return json.loads((out / "results.json").read_text())


def test_the_root_holds_an_older_iteration_and_a_crashed_save(results):
    assert results["iterations"] == ["iter_0000002", NEWEST, "iter_0000006.partial", "latest.json"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_root_runs_on_its_newest_complete_iteration_and_says_so(results, command):
    run = results[command]
    assert run["status"] == 0, run["stderr"][-5:]
    root = results["root"]
    assert f"--checkpoint {root}: using {NEWEST}, its newest complete checkpoint" in run["stderr"], run["stderr"]
    newest = str(Path(root) / NEWEST)
    read = {  # what each command's output records as its source
        "inspect": lambda: (json.loads(run["stdout"])["checkpoint"], json.loads(run["stdout"])["step"]),
        "ablate": lambda: (run["meta"]["source"], run["meta"]["step"]),
        "export-hf": lambda: (run["manifest"]["source"], run["manifest"]["step"]),
        "eval": lambda: (run["result"]["checkpoint"], run["result"]["step"]),
        "unlearn rmu": lambda: (run["meta"]["unlearning"]["source"], run["meta"]["step"]),
        "unlearn cir": lambda: (run["meta"]["unlearning"]["source"], run["meta"]["step"]),
        "attack finetune": lambda: (run["result"]["checkpoint"], STEP),
    }[command]()
    assert read == (newest, STEP)


def test_a_root_without_a_complete_checkpoint_is_one_line(results):
    run = results["unfinished"]
    assert run["status"] == 2
    assert run["stderr"][-1].startswith("megatron-sgtm inspect: --checkpoint ")
    assert run["stderr"][-1].endswith("a checkpoint directory without a complete checkpoint (incomplete ones: "
                                      "iter_0000002.partial)"), run["stderr"]
