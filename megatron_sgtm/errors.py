"""The errors `megatron-sgtm` reports as one line, ``megatron-sgtm <command>: <message>``, instead of a traceback.

`megatron_sgtm.cli.main` is the one place that prints them; modules only raise. Anything else that escapes a
command is our bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Iterable
from functools import cache
from pathlib import Path

DEBUG_ENV = "MEGATRON_SGTM_DEBUG"  # =1: tracebacks instead of the one-line report (as `megatron-sgtm --debug`)
# How long a rank other than 0 waits before exiting on a user error: torchrun stops every rank as soon as
# one exits, so a rank 1 that fails first would otherwise kill rank 0 before it prints the line.
OTHER_RANKS_WAIT_S = 10.0
# Under a process group (`training.distributed.init_distributed` sets it): claims the launch's one error report,
# True for the first rank that asks. An error met by one rank only (rank 0 may be waiting in a collective) is
# then printed by that rank, and an error every rank meets still once.
_claim_report: Callable[[], bool] | None = None


class UserError(Exception):
    """Bad input (a file, a flag, a config field) that the message names; exit status 2, as argparse's."""

    exit_status = 2


class StepGatingError(UserError, ValueError):
    """An optimizer or engine that step gating cannot gate; the message says what to use instead."""


def debug_requested(flag: bool) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def share_reports(claim: Callable[[], bool] | None) -> None:
    """Let the ranks of a launch agree through `claim` which one prints a user error (None: rank 0)."""
    global _claim_report
    _claim_report = claim


def _reports() -> bool:
    """Whether this process prints the error line: the first rank to claim it, else (no process group yet,
    when every rank checks the same input, or a claim that fails) rank 0."""
    if _claim_report is not None:
        try:
            return _claim_report()
        except Exception:  # the store is gone (its host exited): the plain rule
            pass
    return is_first_rank()


def is_first_rank() -> bool:
    """Rank 0 under torchrun (RANK) or srun (SLURM_PROCID), or a plain process: the one that reports.

    Every rank of a launch checks the same input and fails the same way; one copy of the line is enough."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def one_line(err: BaseException) -> str:
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__


def report(err: BaseException, command: str, debug: bool) -> int:
    """Print a user error (the traceback with `debug`, on every rank) and return the exit status."""
    if debug:
        traceback.print_exception(err)
    elif _reports():
        print(f"megatron-sgtm {command}: {one_line(err)}", file=sys.stderr, flush=True)
    else:
        time.sleep(OTHER_RANKS_WAIT_S)
    return getattr(err, "exit_status", UserError.exit_status)


def check_positive(args, names: Iterable[str]) -> None:
    """Counts and sizes given as flags: zero or negative is a user error, not "use the default"."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            kind = "integer" if isinstance(value, int) else "number"
            raise UserError(f"--{name.replace('_', '-')} must be a positive {kind}, got {value}")


def yaml_problem(err: Exception) -> str:
    """Where and what, on one line: "line 4, column 6: expected ',' or ']' (while parsing a flow sequence at
    line 3, column 16)"."""
    mark, context, context_mark = (getattr(err, k, None) for k in ("problem_mark", "context", "context_mark"))
    text = getattr(err, "problem", None) or one_line(err)
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return text if mark is None else f"line {mark.line + 1}, column {mark.column + 1}: {text}"


@cache
def _unique_key_loader():
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last one
    silently: a config or grid would run with a value other than the one its reader sees first)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # the safe loader's own error names it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def parse_yaml(text: str):
    """YAML text's content, duplicate keys refused: the one YAML reader of configs, grids and recipes."""
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader subclass


def load_yaml(path: Path, error: type[UserError] = UserError):
    """A YAML file's content; `error` naming the file (and the line) when it cannot be read or parsed, or
    gives a key twice."""
    import yaml

    try:
        return parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {yaml_problem(err)}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path} cannot be read ({err})") from err
