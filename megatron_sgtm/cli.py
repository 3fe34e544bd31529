"""`megatron-sgtm [--debug] <subcommand>`: each feature module registers its own subcommands.

A user error (`megatron_sgtm.errors.UserError`, an OSError, or a type the subcommand declares as
``user_errors``) ends the command with one line, ``megatron-sgtm <command>: <message>``, on rank 0 only, and
exit status 2 (1 for CompatError: the environment, not the input). ``--debug`` or MEGATRON_SGTM_DEBUG=1 prints
the traceback instead, on every rank, and leaves third-party warnings on.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator

from megatron_sgtm.compat.known_warnings import filter_known_warnings
from megatron_sgtm.errors import DEBUG_ENV, UserError, debug_requested, report

# Modules exposing `register(subparsers)`; each adds its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES: list[str] = ["megatron_sgtm.data.cli", "megatron_sgtm.training.cli", "megatron_sgtm.export.cli",
                            "megatron_sgtm.demo", "megatron_sgtm.sweep.cli", "megatron_sgtm.evaluation.cli",
                            "megatron_sgtm.unlearning.cli", "megatron_sgtm.attack.cli"]


def _commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that run something (leaves of the subcommand tree, e.g. ``data synth``)."""
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not children:
        yield parser
    for action in children:
        for child in dict.fromkeys(action.choices.values()):
            yield from _commands(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-sgtm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help=f"tracebacks instead of one-line errors, all warnings shown (or {DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for command in _commands(parser):  # the name the error line gives, "data synth" for `data synth`
        command.set_defaults(command_name=command.prog.removeprefix(f"{parser.prog} "))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):  # only subcommands that take --section.key=value overrides
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    debug = debug_requested(args.debug)
    if not debug:
        filter_known_warnings()  # before any command imports megatron-core or DeepSpeed
    try:
        return int(args.func(args) or 0)
    except (UserError, OSError, *getattr(args, "user_errors", ())) as err:
        return report(err, args.command_name, debug)


if __name__ == "__main__":
    sys.exit(main())
