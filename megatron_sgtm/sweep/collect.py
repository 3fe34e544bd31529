"""`megatron-sgtm sweep collect`: every finished run's final metrics in one CSV, and the two plots
of a scaling study: forget vs retain loss per size, and forget loss vs undiscovered-forget rate.

For methods that localise the forget domain (strategy other than ``none``) the deployed model is the
ablated one, so the plots show its losses next to (vs retain) or instead of (vs rate) the live ones.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from megatron_sgtm.strategy import METHODS
from megatron_sgtm.sweep.grid import Grid, Run

LOSSES = ["forget_loss", "retain_loss", "adjacent_loss", "forget_loss_ablated", "retain_loss_ablated",
          "adjacent_loss_ablated"]
COLUMNS = ["run", "size", "params", "params_non_embedding", "method", "undiscovered_rate", "seed", "train_steps",
           "tokens", "step", *LOSSES, "time_s"]


@dataclass
class Collected:
    csv: Path
    plots: list[Path]
    rows: list[dict]
    missing: list[str]  # runs without a summary.json


def _row(run: Run) -> dict:
    summary = json.loads((run.run_dir / "summary.json").read_text())
    return {"run": run.name, "size": run.size, "params": run.params.total,
            "params_non_embedding": run.params.non_embedding, "method": run.method,
            "undiscovered_rate": "" if run.undiscovered_rate is None else run.undiscovered_rate, "seed": run.seed,
            "train_steps": run.train_steps, "tokens": run.tokens, "step": summary["step"],
            **{k: summary.get(k, "") for k in LOSSES}, "time_s": summary.get("time_s", "")}


def _ablates(method: str) -> bool:
    return METHODS[method].strategy.active


def _value(v) -> float:
    """A CSV cell as a number (a loss is empty where the held-out set lacked the category)."""
    return math.nan if v == "" else float(v)


def _mean(values: list) -> float:
    values = [_value(v) for v in values]
    return sum(values) / len(values) if values else math.nan


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
    plots = [_plot_forget_vs_retain(rows, out / "forget_vs_retain.png"),
             _plot_forget_vs_rate(rows, out / "forget_vs_undiscovered.png")] if rows else []
    return Collected(csv=path, plots=plots, rows=rows, missing=missing)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _axes(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4), squeeze=False)
    return plt, fig, dict(zip(sizes, axes[0]))


def _plot_forget_vs_retain(rows: list[dict], path: Path) -> Path:
    plt, fig, axes = _axes(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for size, ax in axes.items():
        mine = [r for r in rows if r["size"] == size]
        for method in methods:
            runs = [r for r in mine if r["method"] == method]
            if not runs:
                continue
            ax.scatter([_value(r["retain_loss"]) for r in runs], [_value(r["forget_loss"]) for r in runs],
                       color=colors[method], label=method)
            if _ablates(method):
                ax.scatter([_value(r["retain_loss_ablated"]) for r in runs],
                           [_value(r["forget_loss_ablated"]) for r in runs], color=colors[method], marker="*",
                           s=140, label=f"{method} (ablated)")
        _label(ax, f"{size} ({_params(mine[0]['params'])} params)", "retain loss (nats)")
    return _save(plt, fig, path)


def _plot_forget_vs_rate(rows: list[dict], path: Path) -> Path:
    """Mean over seeds; methods that ignore the labels are one horizontal line per size."""
    plt, fig, axes = _axes(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for size, ax in axes.items():
        for i, method in enumerate(methods):
            runs = [r for r in rows if r["size"] == size and r["method"] == method]
            key = "forget_loss_ablated" if _ablates(method) else "forget_loss"
            label = f"{method} (ablated)" if _ablates(method) else method
            if not runs:
                continue
            if runs[0]["undiscovered_rate"] == "":
                ax.axhline(_mean([r[key] for r in runs]), color=f"C{i}", linestyle="--", label=label)
                continue
            rates = sorted({r["undiscovered_rate"] for r in runs})
            ax.plot(rates, [_mean([r[key] for r in runs if r["undiscovered_rate"] == x]) for x in rates],
                    marker="o", color=f"C{i}", label=label)
        _label(ax, size, "undiscovered forget rate")
    return _save(plt, fig, path)


def _label(ax, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("forget loss (nats)")
    ax.legend(fontsize=7)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
