"""`megatron-sgtm train --config cfg.yaml [--section.key=value ...]` (under torchrun or srun)."""

from __future__ import annotations

import argparse
import json
import sys


def train(args: argparse.Namespace) -> int:
    from megatron_sgtm.training.config import ConfigError, load_config  # imports megatron: only when used

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"megatron-sgtm train: {err}", file=sys.stderr)
        return 2
    from megatron_sgtm.training.checkpoint import CheckpointError
    from megatron_sgtm.training.loop import TrainingError
    from megatron_sgtm.training.loop import train as run

    try:
        final = run(cfg)
    except ConfigError as err:
        print(f"megatron-sgtm train: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingError) as err:
        print(f"megatron-sgtm train: {err}", file=sys.stderr)
        return 1
    if args.print_summary:
        print(json.dumps({k: v for k, v in final.items() if k != "train_losses"}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="pretrain with SGTM (or a baseline) on megatron-core or DeepSpeed",
                              description=__doc__)
    p.add_argument("--config", help="YAML config (see examples/)")
    p.add_argument("--print-summary", action="store_true", help="print the final metrics as JSON on stdout")
    p.add_argument("overrides", nargs="*", help="--section.key=value overrides")
    p.set_defaults(func=train)
