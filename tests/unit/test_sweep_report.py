"""`megatron-sgtm report` on a fake finished grid whose summaries follow known laws: the compute fit,
the penalties, the leakage and its bounds, the tables and the plots come out as constructed."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from megatron_sgtm.cli import main
from megatron_sgtm.sweep.collect import deployed_loss
from megatron_sgtm.sweep.grid import load
from tests.support.train_fixtures import tiny_config

LAWS = {"forget": (6.0, 0.05), "retain": (5.0, 0.04), "adjacent": (5.5, 0.045)}  # loss = a * C^-b
FORGET_SHARE = 0.3  # of the tokens a run trains on, the forget documents' share


def law(category: str, compute: float) -> float:
    a, b = LAWS[category]
    return a * compute ** -b


def summary(run) -> dict:
    """A run's summary.json by construction: `none` losses on the power laws; per size the forget loss
    falls by 1 nat from 0 forget tokens to all of them (the leakage curve: half a nat linearly to a tenth of
    them, the other half linearly in log tokens, as the report interpolates); sgtm [full] at
    leakage 0.01 and the retain loss of half its compute (calibrated); sgtm [units4] less forget
    knowledge than a model that never saw forget data (a bound) and the retain loss of a quarter of
    its compute (uncalibrated only); weak_filter at leakage 1 and 90% of its compute."""
    compute = 6 * run.params.total * run.tokens
    full = FORGET_SHARE * run.tokens

    def curve(tokens: float) -> float:
        if tokens <= 0.1 * full:
            return law("forget", compute) + 1 - 0.5 * tokens / (0.1 * full)
        return law("forget", compute) + 0.5 * math.log(full / tokens) / math.log(10)

    kept = {"none": run.forget_keep_fraction or 1.0, "oracle": 0.0,
            "weak_filter": run.undiscovered_rate or 0.0}.get(run.method, 1 - (run.undiscovered_rate or 0))
    undiscovered = full * (run.undiscovered_rate or 0)
    tokens = {"forget": kept * full, "forget_undiscovered": undiscovered, "forget_labelled": kept * full - undiscovered,
              "retain": 0.6 * run.tokens, "adjacent": 0.1 * run.tokens, "total": run.tokens}
    out = {"step": run.train_steps, "time_s": 1.0, "train_tokens": tokens,
           **{f"{c}_loss": law(c, compute) for c in LAWS}}
    if run.method in ("none", "oracle"):
        out["forget_loss"] = curve(tokens["forget"])
    elif run.method == "weak_filter":
        out.update(forget_loss=curve(undiscovered), retain_loss=law("retain", 0.9 * compute))
    elif run.variant == "full":
        out.update(forget_loss_ablated=curve(0.01 * undiscovered), retain_loss_ablated=law("retain", compute) + 0.2,
                   adjacent_loss_ablated=3.0, forget_loss_ablated_calibrated=curve(0.01 * undiscovered) - 0.1,
                   retain_loss_ablated_calibrated=law("retain", compute / 2),
                   adjacent_loss_ablated_calibrated=law("adjacent", compute))
    else:
        out.update(forget_loss_ablated=curve(0) + 0.5, retain_loss_ablated=law("retain", compute / 4),
                   adjacent_loss_ablated=law("adjacent", compute))
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The grid file and its runs, all finished but the last."""
    tmp = tmp_path_factory.mktemp("report")
    base = tiny_config(tmp / "no-data", tmp / "unused")
    del base["logging"]["run_dir"], base["train"]["train_steps"]
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"base": "base.yaml", "out": str(tmp / "out"), "sizes": ["tiny-h32", "tiny-h64"],
            "methods": ["sgtm", "weak_filter", "none", "oracle"], "undiscovered_rates": [0, 0.2], "seeds": [0, 1],
            "variants": {"full": {}, "units4": {"sgtm.forget_mlp_units": 4}}, "forget_keep_fractions": [0.1, 0.5],
            "budget": {"coefficient": 0.01}, "resources": {"nodes": 1, "tasks_per_node": 1}}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    runs = load(path).runs
    for run in runs[:-1]:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "summary.json").write_text(json.dumps(summary(run)))
    return path, runs


def tables(text: str) -> list[list[dict]]:
    """The Markdown tables of a report as lists of {header: cell}."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            header = [c.strip() for c in line.strip("|").split("|")]
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                body.append(dict(zip(header, (c.strip() for c in row.strip("|").split("|")))))
            found.append(body)
    return found


def number(cell: str) -> float:
    return float(cell.split(" ± ")[0])


def test_report_of_a_fake_finished_grid(finished, tmp_path, capsys):
    path, runs = finished
    assert len(runs) == 2 * (2 * 2 * 2 + 2 * 2 + 3 * 2 + 2)
    assert main(["report", "--grid", str(path), "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "report.md")
    assert f"not finished (1): {runs[-1].name}" in err
    text = (tmp_path / "report.md").read_text()
    assert f"**Not finished (1):** `{runs[-1].name}`" in text and "39 of 40 runs finished" in text
    losses, fits, penalties, curve, leakage = tables(text)

    # Losses: one row per size, method, variant and setting; mean ± std over the two seeds.
    row = next(r for r in losses if r["method"] == "none" and r["undiscovered"] == "forget kept 0.1"
               and r["size"] == "tiny-h32")
    assert row["seeds"] == "2" and row["forget ablated"] == "–" and " ± 0.0000" in row["forget live"]
    assert {r["variant"] for r in losses if r["method"] == "sgtm"} == {"full", "units4"}
    assert len(losses) == 2 * (2 * 2 + 2 + 3 + 1)

    # The compute fit recovers the laws of the `none` runs (N = total parameters).
    for fit in fits:
        assert (float(fit["a"]), float(fit["b"])) == (pytest.approx(LAWS[fit["category"]][0], rel=1e-3),
                                                     pytest.approx(LAWS[fit["category"]][1], rel=1e-3))
        assert fit["points"] == "4"
    by_key = {(r["size"], r["method"], r["variant"], r["undiscovered"]): r for r in penalties}
    for size in ("tiny-h32", "tiny-h64"):
        full = by_key[(size, "sgtm", "full", "0.2")]
        assert number(full["retain"]) == pytest.approx(0.5) and number(full["adjacent"]) == pytest.approx(0, abs=1e-6)
        assert full["loss"] == "calibrated"
        units4 = by_key[(size, "sgtm", "units4", "0.2")]
        assert number(units4["retain"]) == pytest.approx(0.75) and units4["loss"] == "ablated"
        assert number(by_key[(size, "weak_filter", "–", "0")]["retain"]) == pytest.approx(0.1)
        assert number(by_key[(size, "none", "–", "–")]["forget"]) == pytest.approx(0, abs=1e-6)

    # The leakage curve: oracle at 0 tokens, none at 10%, 50% and all forget documents.
    assert [r["size"] for r in curve] == ["tiny-h32"] * 4 + ["tiny-h64"] * 4
    assert float(curve[0]["forget tokens"].replace(",", "")) == 0
    by_series = {(r["method"], r["undiscovered"]): r for r in leakage}
    assert set(by_series) == {("sgtm [full]", "0.2"), ("sgtm [units4]", "0.2"), ("weak_filter", "0.2")}
    for size in ("tiny-h32", "tiny-h64"):
        assert number(by_series[("sgtm [full]", "0.2")][size]) == pytest.approx(0.01, rel=1e-6)
        assert number(by_series[("weak_filter", "0.2")][size]) == pytest.approx(1.0, rel=1e-6)
        assert by_series[("weak_filter", "0.2")][size].endswith(" [1, 1]")  # seeds alike: no curve noise
        assert by_series[("sgtm [units4]", "0.2")][size] == "<0, <0 [<0, <0]"
    # seeds alike: standard errors 0, but the last run (tiny-h64's oracle, seed 1) is missing: one seed, no error,
    # and the segment next to it is named as unresolved
    assert [r["std error"] for r in curve] == ["0.0000"] * 4 + ["– (1 seed)"] + ["0.0000"] * 3
    assert "**tiny-h64: the curve does not resolve** 0–" in text and "tiny-h32: the curve does not" not in text

    for plot in ("forget_vs_retain.png", "forget_vs_undiscovered.png", "tradeoff_by_variant.png",
                 "leakage_vs_size.png"):
        assert f"]({plot})" in text
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_writes_the_variant_fraction_calibrated_and_token_columns(finished, tmp_path):
    path, runs = finished
    assert main(["sweep", "collect", "--grid", str(path), "--out", str(tmp_path)]) == 0
    with (tmp_path / "results.csv").open() as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    for run in runs[:-1]:
        row, expected = rows[run.name], summary(run)
        assert row["variant"] == (run.variant or "")
        assert row["forget_keep_fraction"] == ("" if run.forget_keep_fraction is None else
                                               str(run.forget_keep_fraction))
        for group, tokens in expected["train_tokens"].items():
            assert float(row[f"train_tokens_{group}"]) == pytest.approx(tokens)
        calibrated = expected.get("retain_loss_ablated_calibrated")
        assert row["retain_loss_ablated_calibrated"] == ("" if calibrated is None else str(calibrated))


def test_the_deployed_loss_is_calibrated_then_ablated_for_active_methods_and_live_for_filters():
    row = {"method": "sgtm", "forget_loss": 1.0, "forget_loss_ablated": 2.0, "forget_loss_ablated_calibrated": 1.5}
    assert deployed_loss(row, "forget") == (1.5, "calibrated")
    assert deployed_loss({**row, "forget_loss_ablated_calibrated": ""}, "forget") == (2.0, "ablated")
    assert deployed_loss({**row, "method": "strict_filter"}, "forget") == (1.0, "live")
    value, source = deployed_loss({**row, "forget_loss_ablated_calibrated": "", "forget_loss_ablated": ""}, "forget")
    assert math.isnan(value) and source == "ablated"


def test_report_of_a_grid_with_no_finished_run_is_a_user_error(finished, tmp_path, capsys):
    path, _ = finished
    empty = tmp_path / "empty.yaml"
    spec = yaml.safe_load(path.read_text())
    empty.write_text(yaml.safe_dump({**spec, "base": str(path.parent / "base.yaml"), "out": str(tmp_path / "none")}))
    assert main(["report", "--grid", str(empty)]) == 2
    assert "report: no run of empty has finished" in capsys.readouterr().err
