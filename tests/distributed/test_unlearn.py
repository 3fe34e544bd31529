"""`megatron-sgtm unlearn rmu | cir` on a tiny no-filter model: the effect on held-out forget/retain loss,
exactly the configured parameters changed, determinism, and one-line errors (one worker process)."""

from __future__ import annotations

import json

import pytest

from tests.support import run_worker

RMU_TENSORS = sorted(f"decoder.layers.{i}.mlp.linear_{fc}.{kind}" for i in (0, 1) for fc in ("fc1", "fc2")
                     for kind in ("weight", "bias"))  # layer 1 of 2 steered: the MLPs of layers 0..1
CIR_TENSORS = sorted(f"decoder.layers.{i}.mlp.linear_{fc}.weight" for i in (0, 1) for fc in ("fc1", "fc2"))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("unlearn")
    run_worker("unlearn.py", out, 1200)
    return json.loads((out / "results.json").read_text())


def _change(result: dict, name: str) -> float:
    losses = result["meta"]["unlearning"]["losses"]
    return losses["after"][name] - losses["before"][name]


def test_rmu_raises_forget_loss_and_keeps_retain_loss(results):
    rmu = results["rmu"]
    assert _change(rmu, "forget") >= 1.0, rmu["meta"]["unlearning"]["losses"]
    assert abs(_change(rmu, "retain")) <= 0.1, rmu["meta"]["unlearning"]["losses"]


def test_cir_raises_forget_loss_within_its_disruption_budget(results):
    cir = results["cir"]
    assert _change(cir, "forget") >= 1.0, cir["meta"]["unlearning"]["losses"]
    assert abs(_change(cir, "retain")) <= 0.01, cir["meta"]["unlearning"]["losses"]
    record = cir["meta"]["unlearning"]["settings"]
    assert record["epochs"] >= 2 and record["collapse"] == "retain" and record["disruption_mask"]


def test_papers_cir_runs_with_its_settings(results):
    """The paper's configuration runs end to end with its own forget loss. On this 2-layer model it barely moves
    (it does not separate whole languages: README), so its disruption budget is not reached here; the budget's
    stop and undo are tested where they trigger: tests/distributed/test_unlearn_budget.py."""
    cir = results["cir_paper"]
    assert cir["meta"]["unlearning"]["settings"]["forget_loss"] == "mlp-breaking"
    assert abs(_change(cir, "retain")) <= 0.01, cir["meta"]["unlearning"]["losses"]


@pytest.mark.parametrize("name,configured", [("rmu", RMU_TENSORS), ("cir", CIR_TENSORS),
                                             ("cir_paper", CIR_TENSORS)])
def test_only_the_configured_tensors_change(results, name, configured):
    result = results[name]
    record = result["meta"]["unlearning"]
    assert result["names"]  # the same tensors as the source, every other one bit-identical
    assert record["trainable_params"] == configured
    assert set(result["differing"]) == set(record["changed_params"]) <= set(configured)
    if name != "cir_paper":
        assert result["differing"] == configured


def test_meta_records_method_source_settings_and_keeps_the_partition(results):
    for method in ("rmu", "cir"):
        meta = results[method]["meta"]
        assert meta["engine"] == "model-only" and "partition" in meta and meta["method"] == "none"
        record = meta["unlearning"]
        assert record["method"] == method and record["source"] == results["source"]
        assert record["settings"]["seed"] == 42
    assert results["rmu"]["meta"]["unlearning"]["settings"]["layer"] == 1


def test_same_seed_same_weights(results):
    assert results["rmu_deterministic"]


def test_errors_are_one_line(results):
    errors = results["errors"]
    status, text = errors["layer"]
    assert status == 2 and "--layer 7: out of range for this 2-layer model" in text.splitlines()[-1]
    status, text = errors["no_forget"]
    assert status == 2 and "no non-held-out documents of the forget categories" in text.splitlines()[-1]
    assert errors["bad_outputs"] == []
