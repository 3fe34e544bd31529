"""`megatron-sgtm report --grid GRID [--out DIR]`: one Markdown report of a finished sweep.

It holds the losses (mean ± sample std over seeds per size, method, variant and undiscovered rate:
live, ablated and calibrated), the compute penalty per method and category (paper App. B), the
leakage per size (paper §4.3, App. G) with its plot, the trade-off figures of `sweep collect`, and
the names of the runs that have not finished. The definitions are in `megatron_sgtm.sweep.analysis`;
this module only picks the runs and losses each one is applied to, and says which in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sgtm.errors import UserError
from megatron_sgtm.sweep.analysis import (
    AnalysisError,
    Bounded,
    PowerLaw,
    compute_penalty,
    fit_power_law,
    leakage,
    mean_std,
    reading_band,
    training_compute,
    unresolved_segments,
)
from megatron_sgtm.sweep.collect import (
    CATEGORIES,
    ablates,
    collect,
    deployed_loss,
    figure,
    group,
    params_text,
    save_figure,
    series,
    value,
)
from megatron_sgtm.sweep.grid import RATE_FREE, Grid

KINDS = {"live": "", "ablated": "_ablated", "calibrated": "_ablated_calibrated"}
PARAMS = {"total": "params", "non_embedding": "params_non_embedding"}


def _cell(values) -> str:
    mean, std, n = mean_std(values)
    if not n:
        return "–"
    return f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {std:.4f}"


def _table(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows)


def _setting(row: dict) -> str:
    """The undiscovered rate, or for a capped-forget `none` run the share of forget documents it kept."""
    if row["forget_keep_fraction"] != "":
        return f"forget kept {row['forget_keep_fraction']:g}"
    return "–" if row["undiscovered_rate"] == "" else f"{row['undiscovered_rate']:g}"


def _key(row: dict) -> tuple:
    return row["size"], row["method"], row["variant"], _setting(row)


def _losses(rows: list[dict]) -> str:
    header = ["size", "method", "variant", "undiscovered", "seeds",
              *(f"{c} {kind}" for c in CATEGORIES for kind in KINDS)]
    lines = [[*key[:2], key[2] or "–", key[3], str(len(runs)),
              *(_cell(value(r[f"{c}_loss{suffix}"]) for r in runs) for c in CATEGORIES for suffix in KINDS.values())]
             for key, runs in group(rows, _key).items()]
    return ("## Losses\n\nFinal held-out losses (nats per token), mean ± sample standard deviation over seeds. "
            "*ablated*: forget partition zeroed; *calibrated*: ablated, after fitting an output bias "
            "(`train.calibrate_ablated`).\n\n" + _table(header, lines))


def _standard(row: dict) -> bool:
    """A standard model: `none` or `oracle` without a variant (a variant would mix other settings in)."""
    return row["method"] in RATE_FREE and row["variant"] == ""


def _baseline(row: dict) -> bool:
    """A standard `none` run on all forget documents: the model of the compute fit."""
    return _standard(row) and row["method"] == "none" and row["forget_keep_fraction"] == ""


def _compute(row: dict, params: str) -> float:
    return training_compute(float(row[PARAMS[params]]), float(row["tokens"]))


def _penalties(rows: list[dict], params: str) -> str:
    text = ["## Compute penalty",
            f"Fit of loss = a·C^(−b) per category to the `none` runs on all forget documents and without a "
            f"variant (every seed, least squares in log space), C = 6·N·D with N the "
            f"{params.replace('_', '-')} parameter count and D the tokens the run trained on (steps × global "
            f"batch × context). A run's penalty is (C_base − C_eq)/C_base, C_base = 6·N·D of the run itself and "
            f"C_eq = (loss/a)^(−1/b) the compute a standard model needs for the run's loss: positive = the method "
            f"costs compute. The loss is the deployed model's: calibrated ablated for methods with an active "
            f"strategy (uncalibrated ablated where a run has no calibrated losses), live for the others."]
    laws: dict[str, PowerLaw] = {}
    fits = []
    base = [r for r in rows if _baseline(r)]
    for category in CATEGORIES:
        try:
            laws[category] = fit_power_law([_compute(r, params) for r in base],
                                           [value(r[f"{category}_loss"]) for r in base])
            law = laws[category]
            fits.append([category, f"{law.a:.4g}", f"{law.b:.4g}", str(law.points)])
        except AnalysisError as err:
            fits.append([category, "–", "–", f"no fit: {err}"])
    text.append(_table(["category", "a", "b", "points"], fits))
    if laws:
        lines = []
        for key, runs in group([r for r in rows if r["forget_keep_fraction"] == ""], _key).items():
            cells = [_cell(compute_penalty(laws[c], deployed_loss(r, c)[0], _compute(r, params)) for r in runs)
                     if c in laws else "–" for c in CATEGORIES]
            sources = sorted({deployed_loss(r, c)[1] for r in runs for c in laws})
            lines.append([*key[:2], key[2] or "–", key[3], *cells, ", ".join(sources)])
        text.append(_table(["size", "method", "variant", "undiscovered", *CATEGORIES, "loss"], lines))
    return "\n\n".join(text)


def leakage_curves(rows: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """Per size: (forget tokens trained on, live forget loss, its standard error), each the mean over the seeds
    of one setting of the standard models (standard error NaN for a single seed: unknown; the resolution check
    names the segments next to it, the band takes it as 0)."""
    curves = {}
    for size, runs in group([r for r in rows if _standard(r) and r["train_tokens_forget"] != ""],
                            lambda r: r["size"]).items():
        points = []
        for same in group(runs, lambda r: (r["method"], r["forget_keep_fraction"])).values():
            loss, std, n = mean_std(value(r["forget_loss"]) for r in same)
            points.append((mean_std(value(r["train_tokens_forget"]) for r in same)[0], loss,
                           std / math.sqrt(n) if n > 1 else math.nan))
        curves[size] = sorted(p for p in points if all(math.isfinite(v) for v in p[:2]))
    return curves


def _leakage_loss(row: dict) -> float:
    """Uncalibrated forget loss of the deployed model (the paper reads the curve uncalibrated)."""
    return value(row["forget_loss_ablated" if ablates(row["method"]) else "forget_loss"])


@dataclass
class Leakages:
    """Per (series, undiscovered rate, size): each seed's leakage on the mean curve, and the band of the seeds'
    mean loss over their mean undiscovered tokens on that curve moved by its standard errors."""

    seeds: list[Bounded] = field(default_factory=list)
    band: tuple[Bounded, Bounded] | None = None


def run_leakage(rows: list[dict]) -> tuple[dict[str, list[tuple[float, float, float]]], dict[tuple, Leakages],
                                          dict[str, list[str]]]:
    """(curves, the leakages per (series, undiscovered rate, size), problem -> the runs it stopped), read in log
    tokens. Runs at undiscovered rate 0 saw no undiscovered forget tokens: they have no leakage."""
    curves = leakage_curves(rows)
    results: dict[tuple, Leakages] = {}
    read: dict[tuple, list[dict]] = {}
    problems: dict[str, list[str]] = {}
    for row in rows:
        if row["method"] in RATE_FREE or not row["undiscovered_rate"]:
            continue
        curve = [(t, v) for t, v, _ in curves.get(row["size"], [])]
        try:
            if row["train_tokens_forget_undiscovered"] == "":
                raise AnalysisError("no train_tokens in summary.json")
            result = leakage(curve, _leakage_loss(row), value(row["train_tokens_forget_undiscovered"]),
                             log_tokens=True)
        except AnalysisError as err:
            problems.setdefault(f"{row['size']}: {err}", []).append(row["run"])
            continue
        key = (series(row), row["undiscovered_rate"], row["size"])
        results.setdefault(key, Leakages()).seeds.append(result)
        read.setdefault(key, []).append(row)
    for key, same in read.items():
        loss = mean_std(_leakage_loss(r) for r in same)[0]
        undiscovered = mean_std(value(r["train_tokens_forget_undiscovered"]) for r in same)[0]
        known = [(t, v, e if math.isfinite(e) else 0.0) for t, v, e in curves[key[2]]]
        low, high = reading_band(known, loss, log_tokens=True)
        results[key].band = (low.scaled(1 / undiscovered), high.scaled(1 / undiscovered))
    return curves, results, problems


def _leakage_cell(result: Leakages | None) -> str:
    if result is None or not result.seeds:
        return "–"
    values = result.seeds
    if any(v.bound for v in values):
        text = ", ".join(str(v) for v in values)
    else:
        mean, std, n = mean_std(v.value for v in values)
        text = f"{mean:.3g}" if n == 1 else f"{mean:.3g} ± {std:.2g}"
    return text + (f" [{result.band[0]}, {result.band[1]}]" if result.band else "")


def _leakage(rows: list[dict], out: Path) -> str:
    curves, results, problems = run_leakage(rows)
    text = ["## Leakage",
            "Equivalent forget tokens per undiscovered forget token the run trained on (forget documents the "
            "labels missed: U, or R where the classifier scored them retain). The curve of each size: the standard "
            "models (`none` on all or a capped share of the forget documents, `oracle` at zero forget tokens; runs "
            "without a variant), forget tokens trained on vs live forget loss, means over seeds with their standard "
            "errors. A run's uncalibrated forget loss (ablated for methods with an active strategy, live for "
            "filters) is read off the curve between the two points around it, linearly in log tokens (linearly "
            "in tokens from the point at zero). `<x`/`>x`: the loss lies outside the curve, so only a bound is "
            "known. Cells: mean ± std over seeds, then in brackets the reading of the seeds' mean loss on the "
            "curve moved down and up by its standard errors (the range the curve's own noise allows). A filter's "
            "leakage is 1 by definition; its measured value checks the instrument."]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    curve_lines = [[size, f"{tokens:,.0f}", f"{loss:.4f}", f"{sem:.4f}" if math.isfinite(sem) else "– (1 seed)"]
                   for size in sizes for tokens, loss, sem in curves.get(size, [])]
    text.append(_table(["size", "forget tokens", "forget loss", "std error"], curve_lines) if curve_lines else
                "No leakage curve: no `none`/`oracle` run without a variant has `train_tokens` in summary.json.")
    for size in sizes:
        flat = unresolved_segments(curves.get(size, []))
        if flat:
            text.append(f"**{size}: the curve does not resolve** " + ", ".join(
                f"{t0:,.0f}–{t1:,.0f}" for t0, t1 in flat) + " forget tokens (the loss falls by no more than the "
                "two points' standard errors together, or a point has one seed): readings there say little; more "
                "seeds or a larger budget.")
    if results:
        keys = list(dict.fromkeys(key[:2] for key in results))
        lines = [[name, f"{rate:g}", *(_leakage_cell(results.get((name, rate, size))) for size in sizes)]
                 for name, rate in keys]
        text.append(_table(["method", "undiscovered", *sizes], lines))
        plot = _plot_leakage(rows, {key: r.seeds for key, r in results.items()}, keys, sizes,
                             out / "leakage_vs_size.png")
        text.append(f"![leakage vs size]({plot.name})")
    for problem, runs in problems.items():
        text.append(f"Not computed ({problem}): " + ", ".join(f"`{r}`" for r in runs))
    return "\n\n".join(text)


def _plot_leakage(rows: list[dict], results: dict, keys: list[tuple], sizes: list[str], path: Path) -> Path:
    """Leakage vs parameter count (log axes where every exact value is positive); a seed whose loss lies
    outside the curve is a triangle at its bound (pointing the way the true value lies)."""
    params = {r["size"]: float(r["params"]) for r in rows}
    exact = {key: mean_std(v.value for v in values) for key, values in results.items()
             if not any(v.bound for v in values)}
    log = all(m > 0 for m, _, _ in exact.values())
    plt, fig, axes = figure(1, 1)
    ax = axes[0][0]
    for i, (name, rate) in enumerate(keys):
        color, label = f"C{i % 10}", f"{name}, undiscovered {rate:g}"
        mine = [(params[s], exact[(name, rate, s)]) for s in sizes if (name, rate, s) in exact]
        if mine:
            ax.errorbar([x for x, _ in mine], [m for _, (m, _, _) in mine], yerr=[sd for _, (_, sd, _) in mine],
                        marker="o", capsize=2, color=color, label=label)
            label = None
        bounds = [(params[s], v) for s in sizes for v in results.get((name, rate, s), [])
                  if v.bound and (v.value > 0 or not log)]
        for x, v in bounds:
            ax.scatter([x], [v.value], marker="v" if v.bound == "<" else "^", color=color, label=label)
            label = None
    ax.set_xscale("log")
    if log and exact:
        ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("leakage (equivalent / undiscovered forget tokens)")
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


def write_report(grid: Grid, out: Path, params: str = "total") -> tuple[Path, list[str]]:
    """Collect the grid's runs into `out` and write `out`/report.md; returns its path and the names of
    the runs that have not finished."""
    result = collect(grid, out)
    if not result.rows:
        raise UserError(f"report: no run of {grid.name} has finished (no summary.json under {grid.out})")
    rows = result.rows
    sizes = ", ".join(f"{size} ({params_text(runs[0]['params'])} params)"
                      for size, runs in group(rows, lambda r: r["size"]).items())
    parts = [f"# Sweep {grid.name}",
             f"Grid `{grid.path}`: {len(rows)} of {len(grid.runs)} runs finished; sizes {sizes}. "
             f"Per-run numbers: [{result.csv.name}]({result.csv.name})."]
    if result.missing:
        parts.append(f"**Not finished ({len(result.missing)}):** " + ", ".join(f"`{m}`" for m in result.missing))
    parts += [_losses(rows), _penalties(rows, params), _leakage(rows, out), "## Trade-off",
              "Forget vs retain loss of the deployed models (means over seeds, error bars the seeds' standard "
              "deviations): ablated and calibrated for methods with an active strategy, live for the others.",
              *(f"![{plot.stem}]({plot.name})" for plot in result.plots)]
    path = Path(out) / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path, result.missing
