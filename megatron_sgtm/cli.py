"""`megatron-sgtm <subcommand>`: each feature module registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

from megatron_sgtm.compat import CompatError

# Modules exposing `register(subparsers)`; each adds its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES: list[str] = ["megatron_sgtm.data.cli", "megatron_sgtm.training.cli", "megatron_sgtm.export.cli",
                            "megatron_sgtm.demo", "megatron_sgtm.sweep.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-sgtm", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):  # only subcommands that take --section.key=value overrides
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except CompatError as err:  # an installed version our patches were not written for: one line, no traceback
        print(f"megatron-sgtm {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
