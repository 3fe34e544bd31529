"""`megatron-sgtm sweep collect`: every finished run's final metrics in one CSV, and the plots of a
scaling study: the forget/retain trade-off per size (the paper's Figs. 3 and 5), forget loss vs
undiscovered-forget rate, and, when a method has several variants, the trade-off across variants.

A method's point is the model it deploys: for methods that localise the forget domain (strategy
other than ``none``) the ablated model, with the calibrated losses where the run has them (the
legend says "uncalibrated" otherwise); for the others (filters, ``none``, ``oracle``) the live one.
Points are means over seeds with the seeds' sample standard deviation as error bars.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from megatron_sgtm.core.strategy import METHODS
from megatron_sgtm.sweep.analysis import mean_std
from megatron_sgtm.sweep.grid import Grid, Run

CATEGORIES = ("forget", "retain", "adjacent")
LOSSES = [f"{c}_loss{kind}" for kind in ("", "_ablated", "_ablated_calibrated") for c in CATEGORIES]
TOKEN_GROUPS = ("forget", "forget_undiscovered", "forget_labelled", "retain", "adjacent", "total")
COLUMNS = ["run", "size", "params", "params_non_embedding", "method", "variant", "undiscovered_rate",
           "forget_keep_fraction", "seed", "train_steps", "tokens", "step", *LOSSES,
           *(f"train_tokens_{g}" for g in TOKEN_GROUPS), "time_s"]


@dataclass
class Collected:
    csv: Path
    plots: list[Path]
    rows: list[dict]
    missing: list[str]  # runs without a summary.json


def _blank(v) -> object:
    return "" if v is None else v


def _row(run: Run) -> dict:
    summary = json.loads((run.run_dir / "summary.json").read_text())
    tokens = summary.get("train_tokens") or {}
    return {"run": run.name, "size": run.size, "params": run.params.total,
            "params_non_embedding": run.params.non_embedding, "method": run.method, "variant": _blank(run.variant),
            "undiscovered_rate": _blank(run.undiscovered_rate),
            "forget_keep_fraction": _blank(run.forget_keep_fraction), "seed": run.seed,
            "train_steps": run.train_steps, "tokens": run.tokens, "step": summary["step"],
            **{k: summary.get(k, "") for k in LOSSES},
            **{f"train_tokens_{g}": tokens.get(g, "") for g in TOKEN_GROUPS}, "time_s": summary.get("time_s", "")}


def ablates(method: str) -> bool:
    return METHODS[method].strategy.active


def value(v) -> float:
    """A CSV cell as a number (a loss is empty where the held-out set lacked the category)."""
    return math.nan if v == "" else float(v)


def deployed_loss(row: dict, category: str) -> tuple[float, str]:
    """The `category` loss of the model the run's method deploys, and which loss it is: "calibrated"
    (ablated, output bias fitted), "ablated" (uncalibrated) or "live"."""
    if not ablates(row["method"]):
        return value(row[f"{category}_loss"]), "live"
    calibrated = value(row[f"{category}_loss_ablated_calibrated"])
    if math.isfinite(calibrated):
        return calibrated, "calibrated"
    return value(row[f"{category}_loss_ablated"]), "ablated"


def series(row: dict) -> str:
    """The curve a row is a point of: its method and variant (the capped-forget `none` runs are one curve)."""
    return row["method"] + (f" [{row['variant']}]" if row["variant"] else "")


def group(rows: list[dict], key: Callable[[dict], Hashable]) -> dict[Hashable, list[dict]]:
    """Rows by `key`, in first-seen order."""
    groups: dict[Hashable, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def collect(grid: Grid, out: Path | None = None) -> Collected:
    out = Path(out) if out is not None else grid.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [_row(r) for r in grid.runs if r.finished]
    missing = [r.name for r in grid.runs if not r.finished]
    path = out / "results.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plots = []
    if rows:
        plots = [_plot_tradeoff(rows, out / "forget_vs_retain.png"),
                 _plot_forget_vs_rate(rows, out / "forget_vs_undiscovered.png")]
        if any(len({r["variant"] for r in runs}) > 1 for runs in group(rows, lambda r: r["method"]).values()):
            plots.append(_plot_tradeoff_by_variant(rows, out / "tradeoff_by_variant.png"))
    return Collected(csv=path, plots=plots, rows=rows, missing=missing)


def params_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def figure(nrows: int, ncols: int):
    """(pyplot, figure, axes[row][col]) on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 4 * nrows), squeeze=False)
    return plt, fig, axes


def _size_axes(rows: list[dict]):
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    plt, fig, axes = figure(1, len(sizes))
    return plt, fig, dict(zip(sizes, axes[0]))


def _colors(rows: list[dict]) -> dict[str, str]:
    return {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(series(r) for r in rows))}


def _source_note(rows: list[dict]) -> str:
    sources = {deployed_loss(r, c)[1] for r in rows for c in ("forget", "retain")}
    if sources == {"live"}:
        return ""
    if sources == {"calibrated"}:
        return " (ablated, calibrated)"
    return " (ablated, uncalibrated)" if sources == {"ablated"} else " (ablated, partly calibrated)"


def _draw(ax, label: str, color: str, points: list[tuple[str, list[dict]]], marker: str = "o") -> None:
    """One curve: each point the mean over its rows (seeds) of the deployed retain (x) and forget (y)
    losses with the seeds' standard deviations as error bars, annotated with its text."""
    stats = [(text, mean_std(deployed_loss(r, "retain")[0] for r in runs),
              mean_std(deployed_loss(r, "forget")[0] for r in runs)) for text, runs in points]
    stats = [(text, x, y) for text, x, y in stats if x[2] and y[2]]
    if not stats:
        return
    ax.errorbar([x[0] for _, x, _ in stats], [y[0] for _, _, y in stats], xerr=[x[1] for _, x, _ in stats],
                yerr=[y[1] for _, _, y in stats], color=color, marker=marker, capsize=2, linewidth=1,
                label=label + _source_note([r for _, runs in points for r in runs]))
    for text, x, y in stats:
        if text:
            ax.annotate(text, (x[0], y[0]), textcoords="offset points", xytext=(4, 3), fontsize=6, color=color)


def _curve_position(row: dict) -> tuple[float, str]:
    """Where a run sits on its method's curve: its undiscovered rate, or for `none` the share of forget
    documents it kept (1: all); and the text that labels the point."""
    if row["undiscovered_rate"] != "":
        return float(row["undiscovered_rate"]), f"u{row['undiscovered_rate']:g}"
    if row["method"] == "none":
        fraction = 1.0 if row["forget_keep_fraction"] == "" else float(row["forget_keep_fraction"])
        return fraction, f"f{fraction:g}"
    return 0.0, ""


def _curve_points(runs: list[dict]) -> list[tuple[str, list[dict]]]:
    by_position = group(runs, _curve_position)
    return [(position[1], by_position[position]) for position in sorted(by_position)]


def _plot_tradeoff(rows: list[dict], path: Path) -> Path:
    """Forget vs retain loss of each method's deployed model, one panel per size; the points of a
    method (and variant) are its undiscovered rates, those of `none` its shares of forget documents."""
    plt, fig, axes = _size_axes(rows)
    colors = _colors(rows)
    for size, ax in axes.items():
        mine = [r for r in rows if r["size"] == size]
        for name, runs in group(mine, series).items():
            _draw(ax, name, colors[name], _curve_points(runs))
        _label(ax, f"{size} ({params_text(mine[0]['params'])} params)", "retain loss (nats)")
    return save_figure(plt, fig, path)


def _plot_tradeoff_by_variant(rows: list[dict], path: Path) -> Path:
    """The same trade-off with a method's variants (partition sizes, partition variants, thresholds)
    as the points of its curve: one panel per size and undiscovered rate; the rate-free methods'
    plain runs are reference points in every panel."""
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    rates = sorted({r["undiscovered_rate"] for r in rows} - {""}) or [""]  # [""]: only rate-free methods
    plt, fig, axes = figure(len(sizes), len(rates))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, size in enumerate(sizes):
        mine = [r for r in rows if r["size"] == size]
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            for k, method in enumerate(methods):
                runs = [r for r in mine if r["method"] == method and r["undiscovered_rate"] in (rate, "")
                        and r["forget_keep_fraction"] == ""]
                if runs:
                    points = list(group(runs, lambda r: r["variant"]).items())
                    _draw(ax, method, f"C{k % 10}", points, marker="o" if runs[0]["undiscovered_rate"] != "" else "s")
            _label(ax, size + ("" if rate == "" else f", undiscovered {rate:g}"), "retain loss (nats)")
    return save_figure(plt, fig, path)


def _plot_forget_vs_rate(rows: list[dict], path: Path) -> Path:
    """Mean over seeds of the deployed forget loss; methods that ignore the labels are one horizontal
    line per size (the capped-forget `none` runs are left out)."""
    plt, fig, axes = _size_axes(rows)
    colors = _colors(rows)
    for size, ax in axes.items():
        mine = [r for r in rows if r["size"] == size and r["forget_keep_fraction"] == ""]
        for name, runs in group(mine, series).items():
            label = name + _source_note(runs)
            if runs[0]["undiscovered_rate"] == "":
                ax.axhline(mean_std(deployed_loss(r, "forget")[0] for r in runs)[0], color=colors[name],
                           linestyle="--", label=label)
                continue
            by_rate = group(runs, lambda r: r["undiscovered_rate"])
            rates = sorted(by_rate)
            stats = [mean_std(deployed_loss(r, "forget")[0] for r in by_rate[x]) for x in rates]
            ax.errorbar(rates, [m for m, _, _ in stats], yerr=[s for _, s, _ in stats], marker="o", capsize=2,
                        color=colors[name], label=label)
        _label(ax, size, "undiscovered forget rate")
    return save_figure(plt, fig, path)


def _label(ax, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("forget loss (nats)")
    ax.legend(fontsize=7)


def save_figure(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

