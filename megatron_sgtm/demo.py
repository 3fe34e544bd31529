"""`megatron-sgtm demo`: SGTM versus data filtering, end to end, on the embedded synthetic corpus.

1. generate the bilingual corpus (English retain, Spanish forget, Italian adjacent);
2. tokenize it into WebDataset shards, tag it with the trained linear classifier;
3. train the tiny model four ways at 20% undiscovered forget data: SGTM (a 2-process gloo run),
   weak filter, no filter, and the perfect-filter oracle, as many at once as the cores allow;
4. evaluate (live, ablated and calibrated), then `megatron-sgtm eval --grad-norms` on the SGTM checkpoint
   (bits per byte, per-token loss distributions, absorption), and write a Markdown report and a PNG of forget
   vs retain loss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_sgtm.core.strategy import METHODS, SGTM

RUNS = {  # name -> (method, processes)
    SGTM.name: (SGTM.name, 2),
    "weak_filter": ("weak_filter", 1),
    "no_filter": ("none", 1),
    "oracle": ("oracle", 1),
}
RECIPE = Path(__file__).resolve().parent.parent / "examples" / "tiny_cpu.yaml"
EVAL_BATCHES, GRAD_NORM_DOCS = 8, 16  # what `eval` measures of the SGTM model: bounded, to keep the demo short


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def _cli(*args: str, nproc: int | None = None) -> list[str]:
    if nproc is None:
        return [sys.executable, "-m", "megatron_sgtm.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_sgtm.cli", *args]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """One step's process, one thread per process (the demo's runs share the cores), output to `log`."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def _check(proc: subprocess.Popen, log: Path) -> None:
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"[demo] step failed (exit {proc.returncode}): {' '.join(proc.args)}\n{tail}\n(log: {log})")


def _run(cmd: list[str], log: Path) -> None:
    proc = _start(cmd, log)
    proc.wait()
    _check(proc, log)


def prepare_data(out: Path, num_docs: int, seed: int) -> Path:
    """Synthetic corpus -> shards -> tagged shards, each step skipped when its complete output is there (every
    step publishes its output only when complete, so a rerun after a failure continues where it stopped)."""
    tagged = out / "data" / "tagged"
    if (tagged / "manifest.json").is_file():
        return tagged
    raw, shards = out / "data" / "raw", out / "data" / "shards"
    raw.mkdir(parents=True, exist_ok=True)
    if not (raw / "synthetic.jsonl").is_file():
        _say(f"generating {num_docs} synthetic documents")
        _run(_cli("data", "synth", "--out", str(raw), "--num-docs", str(num_docs), "--seed", str(seed)),
             out / "synth.log")
    if not (shards / "manifest.json").is_file():
        _say("building shards with a 512-token BPE tokenizer")
        _run(_cli("data", "build", "--input", str(raw), "--train-tokenizer", "512", "--out", str(shards)),
             out / "build.log")
    truth = min(500, num_docs)
    _say(f"tagging with the linear classifier (trained on {truth} ground-truth documents)")
    _run(_cli("data", "tag", "--shards", str(shards), "--out", str(tagged), "--classifier", "linear",
              "--train-from-truth", str(truth), "--seed", str(seed)), out / "tag.log")
    return tagged


def train_runs(out: Path, data: Path, steps: int | None, cores: int | None = None) -> dict[str, dict]:
    """Train the runs that have no summary yet, as many at once as `cores` (default: this machine's) allow at
    one core per process: on 2 cores SGTM's 2-process run alone, the others two at a time. Each run is its own
    seeded process, so its result does not depend on what runs beside it."""
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    pending = [name for name in RUNS if not (out / "runs" / name / "summary.json").is_file()]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    try:
        while pending or running:
            free = cores - sum(RUNS[name][1] for name in running)
            name = next((n for n in pending if RUNS[n][1] <= free or not running), None)
            if name is not None:
                pending.remove(name)
                running[name] = (_start(_train_command(out, data, name, steps), out / f"train_{name}.log"),
                                 time.time())
                nproc = RUNS[name][1]
                _say(f"training {name} ({nproc} process{'es' if nproc > 1 else ''})")
                continue
            time.sleep(0.2)
            for name, (proc, start) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    _check(proc, out / f"train_{name}.log")
                    _say(f"  {name} done in {time.time() - start:.0f}s")
    finally:
        for proc, _ in running.values():  # a failed run stops the others
            proc.terminate()
            proc.wait()
    return {name: json.loads((out / "runs" / name / "summary.json").read_text()) for name in RUNS}


def _train_command(out: Path, data: Path, name: str, steps: int | None) -> list[str]:
    method, nproc = RUNS[name]
    run_dir = out / "runs" / name
    overrides = [f"--method={method}", f"--data.path={data}", f"--logging.run_dir={run_dir}",
                 "--train.calibrate_ablated=true"]
    if name == SGTM.name:  # kept for `megatron-sgtm eval`
        overrides.append(f"--checkpoint.dir={run_dir / 'checkpoints'}")
    if steps:
        overrides.append(f"--train.train_steps={steps}")
    return _cli("train", "--config", str(RECIPE), *overrides, nproc=nproc)


def evaluate_sgtm(out: Path, data: Path) -> dict:
    """`megatron-sgtm eval --grad-norms` on the SGTM run's final checkpoint; its eval.json."""
    from megatron_sgtm.training.checkpoint import complete_checkpoints

    evaluation = out / "eval_sgtm"
    if not (evaluation / "eval.json").is_file():
        checkpoint = complete_checkpoints(out / "runs" / SGTM.name / "checkpoints")[-1]
        _say(f"evaluating {checkpoint} (megatron-sgtm eval --grad-norms)")
        start = time.time()
        _run(_cli("eval", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(evaluation),
                  "--eval-batches", str(EVAL_BATCHES), "--grad-norms", "--grad-norm-docs", str(GRAD_NORM_DOCS)),
             out / "eval_sgtm.log")
        _say(f"  eval done in {time.time() - start:.0f}s")
    return json.loads((evaluation / "eval.json").read_text())


def _eval_section(evaluation: dict) -> list[str]:
    """The SGTM model's calibration effect and absorption, from `eval`'s eval.json."""
    lines = ["## SGTM model: `megatron-sgtm eval`", "",
             f"Full report: [eval_sgtm/report.md](eval_sgtm/report.md) ({evaluation['wall_time_s']:.0f} s).", "",
             "| category | live | ablated | calibrated ablated | bits per byte (calibrated ablated) |",
             "|---|---|---|---|---|"]
    for group, r in evaluation["categories"].items():
        lines.append(f"| {group} | {r['live']['loss']:.3f} | {r['ablated']['loss']:.3f} | "
                     f"{r['calibrated']['loss']:.3f} | {r['calibrated']['bits_per_byte']:.3f} |")
    lines += ["", "Absorption (median relative gradient norm of the live model per held-out document):", "",
              "| documents | ‖∇Θ_F‖/‖Θ_F‖ | ‖∇Θ_R‖/‖Θ_R‖ |", "|---|---|---|"]
    for group, a in evaluation["absorption"]["medians"].items():
        lines.append(f"| {group} | {a['forget']:.3e} | {a['retain']:.3e} |")
    return [*lines, ""]


def write_report(out: Path, results: dict[str, dict], evaluation: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["| run | forget loss | retain loss | adjacent loss | forget (ablated) | retain (ablated) | "
            "forget (calibrated ablated) | retain (calibrated ablated) |", "|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, r in results.items():
        rows.append(f"| {name} | {r['forget_loss']:.3f} | {r['retain_loss']:.3f} | {r['adjacent_loss']:.3f} | "
                    f"{r['forget_loss_ablated']:.3f} | {r['retain_loss_ablated']:.3f} | "
                    f"{_cell(r, 'forget_loss_ablated_calibrated')} | {_cell(r, 'retain_loss_ablated_calibrated')} |")
        ax.scatter(r["retain_loss"], r["forget_loss"], label=name, s=60)
        if METHODS[RUNS[name][0]].strategy.active:
            ax.scatter(r["retain_loss_ablated"], r["forget_loss_ablated"], label=f"{name} (ablated)", marker="*",
                       s=160)
    ax.set_xlabel("retain (English) loss, nats")
    ax.set_ylabel("forget (Spanish) loss, nats")
    ax.set_title("SGTM vs data filtering, 20% undiscovered forget data")
    ax.legend()
    fig.tight_layout()
    plot = out / "forget_vs_retain.png"
    fig.savefig(plot, dpi=120)
    s, weak, oracle = results[SGTM.name], results["weak_filter"], results["oracle"]
    checks = {
        "SGTM ablated forget loss >= weak filter's": s["forget_loss_ablated"] >= weak["forget_loss"],
        "SGTM ablation raises forget loss by >= 1.0 nat": s["forget_loss_ablated"] - s["forget_loss"] >= 1.0,
        "SGTM ablated retain loss within 0.15 nat of the oracle": s["retain_loss_ablated"] - oracle["retain_loss"]
        <= 0.15,
    }
    lines = ["# megatron-sgtm demo", "",
             "Tiny gpt2-style model on the synthetic bilingual corpus (English retain, Spanish forget, Italian "
             "adjacent), labels from the linear classifier with 20% of forget documents undiscovered.", "",
             *rows, "", "## The paper's effect", "",
             *[f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks.items()], "",
             f"![forget vs retain]({plot.name})", "", *(_eval_section(evaluation) if evaluation else [])]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps({"results": results, "checks": checks, "eval_sgtm": evaluation},
                                                indent=2))
    return report


def _cell(result: dict, key: str) -> str:
    return f"{result[key]:.3f}" if key in result else "-"


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = prepare_data(out, args.num_docs, args.seed)
    results = train_runs(out, data, args.steps)
    report = write_report(out, results, evaluate_sgtm(out, data))
    _say(f"finished in {time.time() - start:.0f}s; report: {report}")
    print(report)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="SGTM vs data filtering end to end on the synthetic corpus",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="working directory (data, runs, report)")
    p.add_argument("--num-docs", type=int, default=6000)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)
