"""`megatron-sgtm train --config cfg.yaml [--section.key=value ...]` (under torchrun or srun)."""

from __future__ import annotations

import argparse
import json


def train(args: argparse.Namespace) -> int:
    from megatron_sgtm.training.config import load_config  # imports megatron: only when used

    cfg = load_config(args.config, args.overrides)
    from megatron_sgtm.training.loop import STOPPED_EXIT_STATUS
    from megatron_sgtm.training.loop import train as run

    final = run(cfg)
    if args.print_summary:
        print(json.dumps({k: v for k, v in final.items() if k != "train_losses"}))
    return STOPPED_EXIT_STATUS if "stopped" in final else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="pretrain with SGTM (or a baseline) on megatron-core or DeepSpeed",
                              description=__doc__)
    p.add_argument("--config", help="YAML config (see examples/)")
    p.add_argument("--print-summary", action="store_true", help="print the final metrics as JSON on stdout")
    p.add_argument("overrides", nargs="*", help="--section.key=value overrides")
    p.set_defaults(func=train)
