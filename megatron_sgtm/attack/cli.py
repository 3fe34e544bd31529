"""`megatron-sgtm attack finetune | robustness`: the fine-tuning attack on a released model, and the
robustness experiment that runs it on every method's release."""

from __future__ import annotations

import argparse

from megatron_sgtm.attack import finetune as finetune_module  # its docstring only; megatron loads on use


def _finetune(args: argparse.Namespace) -> int:
    from megatron_sgtm.attack.finetune import finetune

    return finetune(args)


def _robustness(args: argparse.Namespace) -> int:
    from megatron_sgtm.attack.robustness import run

    return run(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    attack = subparsers.add_parser("attack", help="fine-tuning attacks on released models")
    commands = attack.add_subparsers(dest="attack_command", required=True)

    p = commands.add_parser(
        "finetune", help="fine-tune a released model on forget/retain data; steps until its forget loss is back",
        description=finetune_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a training checkpoint (either engine, any layout; ablated first if it has an active "
                        "partition) or a model-only one (ablate / import-hf / unlearn output)")
    p.add_argument("--out", required=True, help="new directory: attack.json, attack_curve.png, the run directories")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-loss", type=float, help="the forget loss to reach")
    target.add_argument("--target-run", help="a run directory: reach its final forget loss (summary.json or "
                                             "eval.json), e.g. the no-filter model's")
    p.add_argument("--forget-fraction", type=float, default=0.5, help="forget share of the fine-tuning tokens")
    p.add_argument("--data", help="shard directory (default: the checkpoint's training data)")
    p.add_argument("overrides", nargs="*", help="--section.key=value overrides of the fine-tuning config "
                                                "(e.g. --train.train_steps=200 --parallel.engine=deepspeed)")
    p.set_defaults(func=_finetune)

    p = commands.add_parser("robustness", help="pretrain every method, attack every release, write report.md")
    p.add_argument("--config", required=True, help="experiment YAML (see examples/robustness_tiny.yaml)")
    p.add_argument("--out", required=True, help="the experiment directory (reruns skip finished parts)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    p.add_argument("--data", help="override the config's shard directory")
    p.set_defaults(func=_robustness)
