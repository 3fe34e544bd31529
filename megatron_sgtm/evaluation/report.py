"""eval.json, report.md and the PNGs of `megatron-sgtm eval` (written by rank 0 into the output being built)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_sgtm.evaluation.measure import MODELS

HISTOGRAM_BINS = 60


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _file_name(group: str) -> str:
    return group.replace(":", "_")


def histogram_data(values: dict) -> dict[str, dict]:
    """Per group: 60 bins from 0 to the largest 99.5th percentile of its models' per-token losses (shared by its
    models) and each model's density (`np.histogram`), as eval.json records them and the PNGs draw them."""
    data: dict[str, dict] = {}
    for group in dict.fromkeys(g for g, _ in values):
        found = {m: values[(group, m)] for m in MODELS if (group, m) in values and len(values[(group, m)])}
        if not found:
            continue
        top = max(float(np.quantile(v, 0.995)) for v in found.values())
        edges = np.histogram_bin_edges([], bins=HISTOGRAM_BINS, range=(0.0, top))
        data[group] = {"edges": edges.tolist(),
                       "density": {m: np.histogram(v, bins=edges, density=True)[0].tolist() for m, v in found.items()}}
    return data


def histograms(out: Path, data: dict[str, dict]) -> list[str]:
    """One PNG per group: the per-token loss distributions of the live, ablated and calibrated model."""
    plt = _plt()
    written = []
    for group, h in data.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, density in h["density"].items():
            ax.stairs(density, h["edges"], label=model)
        ax.set_xlabel("per-token loss, nats")
        ax.set_ylabel("density")
        ax.set_title(f"{group}: per-token losses")
        ax.legend()
        fig.tight_layout()
        name = f"token_losses_{_file_name(group)}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def absorption_plot(out: Path, absorption: dict) -> str:
    """Relative gradient norms of Θ_F and Θ_R per document group (the paper's Fig. 4b), as box plots."""
    plt = _plt()
    names = [n for n, v in absorption.items() if v["forget"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, part in zip(axes, ("forget", "retain")):
        ax.boxplot([absorption[n][part] for n in names], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
        ax.set_title(f"‖∇Θ_{part[0].upper()}‖ / ‖Θ_{part[0].upper()}‖")
    fig.tight_layout()
    fig.savefig(out / "absorption.png", dpi=110)
    plt.close(fig)
    return "absorption.png"


def markdown(result: dict, images: list[str]) -> str:
    lines = [f"# megatron-sgtm eval: {result['checkpoint']}", "",
             f"{result['kind']} checkpoint, method {result['method']}, step {result['step']}; data {result['data']}: "
             f"{result['documents']}; {result['wall_time_s']:.0f} s at TP={result['layout']['tp']} "
             f"PP={result['layout']['pp']} DP={result['layout']['dp']}.", "",
             "## Per-category loss (nats per token) and bits per byte", "",
             "| category | docs | tokens | " + " | ".join(f"{m} loss | {m} bpb" for m in MODELS) + " |",
             "|---|---|---|" + "---|---|" * len(MODELS)]
    for group, r in result["categories"].items():
        cells = [f"{r[m]['loss']:.4f} | {r[m]['bits_per_byte']:.4f}" if m in r else "- | -" for m in MODELS]
        lines.append(f"| {group} | {r['documents']} | {r['tokens']} | " + " | ".join(cells) + " |")
    cal = result.get("calibration")
    if cal:
        lines += ["", f"## Calibration ({cal['of']} model + output bias)", "",
                  f"AdamW, {cal['steps']} steps, lr {cal['lr']} -> {cal['lr'] / 10:g}, alpha {cal['alpha']}, beta "
                  f"{cal['beta']}; objective {cal['objective_start']:.4f} -> {cal['objective_end']:.4f}.", "",
                  "| category | loss before | loss after | change |", "|---|---|---|---|"]
        for group, change in cal["effect"].items():
            lines.append(f"| {group} | {change['before']:.4f} | {change['after']:.4f} | {change['change']:+.4f} |")
    lines += ["", "## Per-token loss quantiles (p05 / p25 / p50 / p75 / p95)", "",
              "| category | model | quantiles |", "|---|---|---|"]
    for group, r in result["categories"].items():
        for m in MODELS:
            if m in r:
                lines.append(f"| {group} | {m} | " + " / ".join(f"{v:.3f}" for v in r[m]["quantiles"].values()) + " |")
    if "absorption" in result:
        lines += ["", "## Absorption: median relative gradient norm per document", "",
                  "| documents | n | ‖∇Θ_F‖/‖Θ_F‖ | ‖∇Θ_R‖/‖Θ_R‖ |", "|---|---|---|---|"]
        for group, a in result["absorption"]["medians"].items():
            lines.append(f"| {group} | {a['documents']} | {a['forget']:.3e} | {a['retain']:.3e} |")
    if "lm_eval" in result:
        from megatron_sgtm.evaluation.downstream import markdown_table

        lines += ["", "## Downstream tasks (lm-evaluation-harness, offline)", "", markdown_table(result["lm_eval"])]
    lines += ["", *[f"![{name}]({name})" for name in images], ""]
    return "\n".join(lines)


def write(out: Path, result: dict, values: dict, absorption: dict | None) -> None:
    result = {**result, "histograms": histogram_data(values)}
    images = histograms(out, result["histograms"])
    if absorption:
        images.append(absorption_plot(out, absorption))
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(markdown(result, images))
