"""`megatron-sgtm eval` gives the same per-category losses (live, ablated, calibrated) for a native checkpoint,
its HF export and at TP=2 as at TP=1 (fp32): the checkpoint readers, the engine's layouts and the calibration
are layout-independent; `--lm-eval` runs the generated tasks on the live and the ablated export. One process
trains, exports and evaluates at TP=1; one torchrun launch evaluates at TP=2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT, child_env

WORKER = ROOT / "tests" / "distributed" / "workers" / "eval_parity.py"


def _env() -> dict:
    return child_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("eval")
    runs = [[sys.executable, str(WORKER), str(out), "single"],
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), str(out),
             "tp2"]]
    for cmd in runs:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-8000:]
    found = {name: json.loads((out / name / "eval.json").read_text()) for name in ("native", "hf", "tp2")}
    return found | {"first_losses": json.loads((out / "first_losses.json").read_text())}


def _losses(result: dict) -> dict[str, float]:
    return {f"{group}/{model}": values[model]["loss"] for group, values in result["categories"].items()
            for model in ("live", "ablated", "calibrated") if model in values}


def test_native_hf_and_tp2_evaluations_agree(evaluations):
    reference = _losses(evaluations["native"])
    assert {k.split("/")[0] for k in reference} >= {"forget", "retain", "adjacent"}
    assert {k.split("/")[1] for k in reference} == {"live", "ablated", "calibrated"}
    for name in ("hf", "tp2"):
        found = _losses(evaluations[name])
        assert found.keys() == reference.keys(), name
        for key, value in reference.items():
            assert abs(found[key] - value) <= 1e-4, (name, key, found[key], value)
    assert evaluations["tp2"]["layout"]["tp"] == 2 and evaluations["hf"]["kind"] == "hf"


def test_reports_are_complete(evaluations):
    result = evaluations["native"]
    for values in result["categories"].values():
        assert values["bytes"] > 0 and values["tokens"] > 0
        assert 0 < values["live"]["bits_per_byte"] and list(values["live"]["quantiles"]) == [
            "p05", "p25", "p50", "p75", "p95"]
    assert result["calibration"]["objective_end"] < result["calibration"]["objective_start"]


def test_calibration_flags_reach_the_fit(evaluations):
    """`--calibration-alpha 30 --calibration-beta 3` (not the defaults, α ≠ β): the fit's first objective is
    L_f + β·L_adj + α·L_ret of the ablated model on each group's first calibration micro-batch, recomputed from
    losses measured outside eval; the record names the flags' values."""
    first = evaluations["first_losses"]
    assert set(first) == {"forget", "adjacent", "retain"}
    expected = first["forget"] + 3.0 * first["adjacent"] + 30.0 * first["retain"]
    for name in ("native", "hf", "tp2"):
        calibration = evaluations[name]["calibration"]
        assert abs(calibration["objective_start"] - expected) <= 1e-5 * expected, (name, calibration, first)
        assert {k: calibration[k] for k in ("steps", "alpha", "beta", "lr")} == {
            "steps": 10, "alpha": 30.0, "beta": 3.0, "lr": 0.05}


def test_lm_eval_scores_the_live_and_the_ablated_export(evaluations):
    result = evaluations["native"]
    models = result["lm_eval"]["models"]
    assert set(models) == {"live", "ablated"}
    tasks = set(models["live"])
    assert any(t.startswith("sgtm_ppl_") for t in tasks) and any(t.startswith("sgtm_cloze_") for t in tasks)
    assert set(models["ablated"]) == tasks and all(models["live"][t]["n"] <= 4 for t in tasks)
    ppl = [t for t in tasks if t.startswith("sgtm_ppl_")]
    assert any(models["live"][t]["bits_per_byte"] != models["ablated"][t]["bits_per_byte"] for t in ppl)
