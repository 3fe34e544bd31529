"""The robustness experiment (`megatron-sgtm attack robustness --config examples/robustness_tiny.yaml`).

Per seed: pretrain every method of ``methods`` (SGTM and the data filters, at the config's undiscovered
rate), unlearn the target method's model (no filter) with each command of ``unlearn`` (`megatron-sgtm
unlearn rmu|cir`; skipped, with a message, where this installation has no such command), then attack every
released model with `megatron-sgtm attack finetune` until its forget loss reaches the target model's final
forget loss. Writes ``report.md`` (steps and tokens to the target and retain loss before the attack, per
seed and mean), ``report.json`` and ``attack_curves.png`` (forget loss vs attack step, every method).
Every step is a CLI command in its own process, logged under ``logs/``; a rerun skips what is finished.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sgtm.errors import UserError, load_yaml


class RobustnessError(UserError, ValueError):
    """A bad experiment config, or a step of the experiment that failed (its log named)."""


@dataclass
class Experiment:
    base: Path  # the training recipe every pretraining starts from
    data: str
    methods: list[str]
    target: str = "none"  # whose final forget loss the attacks must reach; unlearning starts from it
    unlearn: list[str] = field(default_factory=lambda: ["rmu", "cir"])
    unlearn_args: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    nproc: int = 1
    forget_fraction: float = 0.5
    pretrain: dict[str, object] = field(default_factory=dict)  # section.key: value overrides
    attack: dict[str, object] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Experiment:
        from megatron_sgtm.core.strategy import METHODS

        raw = load_yaml(path, RobustnessError) if path.is_file() else None
        if not isinstance(raw, dict):
            raise RobustnessError(f"--config {path}: not a YAML mapping (see examples/robustness_tiny.yaml)")
        known = {f for f in cls.__dataclass_fields__}
        if unknown := sorted(set(raw) - known):
            raise RobustnessError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
        if missing := sorted({"base", "data", "methods"} - set(raw)):
            raise RobustnessError(f"{path}: missing key(s) {missing}")
        exp = cls(**raw)
        exp.base = (path.parent / exp.base).resolve()
        if not exp.base.is_file():
            raise RobustnessError(f"{path}: base={raw['base']}: no such training config ({exp.base})")
        bad = [m for m in exp.methods if m not in METHODS]
        if bad:
            raise RobustnessError(f"{path}: methods {bad} are not training methods (known: {sorted(METHODS)})")
        if exp.target not in exp.methods:
            raise RobustnessError(f"{path}: target={exp.target!r} must be one of methods {exp.methods}")
        return exp


def _cli(*args: str, nproc: int = 1) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "megatron_sgtm.cli", *args]
    return [sys.executable, "-m", "megatron_sgtm.cli", *args]


def _say(text: str) -> None:
    print(f"[robustness] {text}", file=sys.stderr, flush=True)


def _run(command: list[str], log: Path, what: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("w") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RobustnessError(f"{what} failed (exit {proc.returncode}; log {log}): {tail[0]}")
    _say(f"  {what} done in {time.time() - start:.0f}s")


def _overrides(values: dict[str, object]) -> list[str]:
    return [f"--{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in values.items()]


def has_command(name: str) -> bool:
    from megatron_sgtm.cli import build_parser

    commands = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return any(name in action.choices for action in commands)


def pretrain(exp: Experiment, out: Path, seed: int, method: str) -> Path:
    """The method's run directory (summary.json) and its last checkpoint."""
    from megatron_sgtm.training.checkpoint import complete_checkpoints

    run_dir, ckpt_dir = out / "pretrain" / method, out / "ckpt" / method
    if not (run_dir / "summary.json").is_file():
        _say(f"seed {seed}: pretraining {method}")
        overrides = _overrides({**exp.pretrain, "method": method, "data.path": exp.data, "train.seed": seed,
                                "logging.run_dir": str(run_dir), "checkpoint.dir": str(ckpt_dir),
                                "checkpoint.resume": "auto"})
        _run(_cli("train", "--config", str(exp.base), *overrides, nproc=exp.nproc),
             out / "logs" / f"pretrain_{method}.log", f"pretraining {method} (seed {seed})")
    return complete_checkpoints(ckpt_dir)[-1]


def unlearn(exp: Experiment, out: Path, seed: int, name: str, checkpoint: Path) -> Path | None:
    """The unlearned model-only checkpoint, or None when `megatron-sgtm unlearn` is absent here."""
    result = out / "unlearn" / name
    if (result / "meta.json").is_file():
        return result
    if not has_command("unlearn"):
        _say(f"seed {seed}: skipping {name}: this installation has no `megatron-sgtm unlearn` command")
        return None
    shutil.rmtree(result, ignore_errors=True)
    _say(f"seed {seed}: unlearning the {exp.target} model with {name}")
    _run(_cli("unlearn", name, "--checkpoint", str(checkpoint), "--out", str(result),
              *exp.unlearn_args.get(name, [])), out / "logs" / f"unlearn_{name}.log", f"{name} (seed {seed})")
    return result


def attack(exp: Experiment, out: Path, seed: int, name: str, checkpoint: Path, target_run: Path) -> dict:
    result = out / "attack" / name
    if not (result / "attack.json").is_file():
        shutil.rmtree(result, ignore_errors=True)  # an attack that did not finish: start it again
        _say(f"seed {seed}: attacking {name}")
        _run(_cli("attack", "finetune", "--checkpoint", str(checkpoint), "--out", str(result), "--target-run",
                  str(target_run), "--forget-fraction", str(exp.forget_fraction), *_overrides(exp.attack),
                  nproc=exp.nproc), out / "logs" / f"attack_{name}.log", f"attack on {name} (seed {seed})")
    return json.loads((result / "attack.json").read_text())


def run_seed(exp: Experiment, out: Path, seed: int) -> dict[str, dict]:
    checkpoints = {method: pretrain(exp, out, seed, method) for method in exp.methods}
    for name in exp.unlearn:
        if (unlearned := unlearn(exp, out, seed, name, checkpoints[exp.target])) is not None:
            checkpoints[name] = unlearned
    target_run = out / "pretrain" / exp.target
    return {name: attack(exp, out, seed, name, ckpt, target_run) for name, ckpt in checkpoints.items()}


def _fmt(value: float | None, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def write_report(out: Path, exp: Experiment, results: dict[int, dict[str, dict]]) -> Path:
    """report.md (per-seed and mean table), report.json and attack_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for per_seed in results.values() for n in per_seed))
    rows = ["| method | seed | steps to target | tokens to target | forget loss before | retain loss before | "
            "forget loss after |", "|---|---|---|---|---|---|---|"]
    means = ["| method | mean steps | mean tokens | reached | mean forget loss before | mean retain loss before |",
             "|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for name in names:
        runs = [(seed, per_seed[name]) for seed, per_seed in results.items() if name in per_seed]
        for seed, r in runs:
            rows.append(f"| {name} | {seed} | {_fmt(r['reached_step'], 'd')} | {_fmt(r['reached_tokens'], ',d')} | "
                        f"{r['before']['forget_loss']:.3f} | {r['before']['retain_loss']:.3f} | "
                        f"{r['curve'][-1]['forget_loss']:.3f} |")
            curve = [(p["step"], p["forget_loss"]) for p in r["curve"]]
            ax.plot(*zip(*curve), color=colors[name], marker=".", label=name if seed == runs[0][0] else None)
        reached = [r for _, r in runs if r["reached"]]
        steps = statistics.mean(r["reached_step"] for r in reached) if len(reached) == len(runs) else None
        tokens = statistics.mean(r["reached_tokens"] for r in reached) if len(reached) == len(runs) else None
        limit = max(r["train_steps"] for _, r in runs)
        means.append(f"| {name} | {_fmt(steps, '.0f') if steps is not None else f'> {limit}'} | "
                     f"{_fmt(tokens, ',.0f') if tokens is not None else '-'} | {len(reached)}/{len(runs)} | "
                     f"{statistics.mean(r['before']['forget_loss'] for _, r in runs):.3f} | "
                     f"{statistics.mean(r['before']['retain_loss'] for _, r in runs):.3f} |")
    targets = [r["target_loss"] for per_seed in results.values() for r in per_seed.values()]
    ax.axhline(statistics.mean(targets), color="grey", linestyle="--", label=f"{exp.target} forget loss (target)")
    ax.set(xlabel="attack step", ylabel="held-out forget loss (nats)", title="fine-tuning attack on each release")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot = out / "attack_curves.png"
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    attack_cfg = " ".join(_overrides(exp.attack)) or "the attack's defaults"
    applied = [n for n in exp.unlearn if n in names]
    skipped = [n for n in exp.unlearn if n not in names]
    unlearned = (f"{', '.join(applied)} applied to the {exp.target} model" if applied else "no unlearning") + (
        f"; {', '.join(skipped)} skipped: no `megatron-sgtm unlearn` here" if skipped else "")
    lines = ["# Robustness to fine-tuning", "",
             f"Every method pretrained on {exp.data} ({exp.base.name}, {' '.join(_overrides(exp.pretrain))}), "
             f"seeds {list(results)}; the released model (SGTM ablated; {unlearned}) fine-tuned on "
             f"{exp.forget_fraction:.0%} forget / "
             f"{1 - exp.forget_fraction:.0%} retain tokens ({attack_cfg}) until its held-out forget loss reaches "
             f"the {exp.target} model's, {statistics.mean(targets):.3f} (uncalibrated losses, evaluated every "
             "train.eval_interval steps; 'after': at the attack's last step).", "",
             "## Mean over seeds", "", *means, "", "## Per seed", "", *rows, "",
             f"![forget loss vs attack step]({plot.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps({str(s): r for s, r in results.items()}, indent=2))
    return report


def run(args: argparse.Namespace) -> int:
    exp = Experiment.read(Path(args.config))
    if args.seeds:
        exp.seeds = list(args.seeds)
    if args.data:
        exp.data = args.data
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = {seed: run_seed(exp, out / f"seed{seed}", seed) for seed in exp.seeds}
    report = write_report(out, exp, results)
    _say(f"done in {time.time() - start:.0f}s: {report}")
    print(report)
    return 0
