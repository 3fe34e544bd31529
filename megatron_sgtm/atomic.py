"""Outputs that appear only when complete: built in ``OUT.partial``, then renamed to ``OUT`` in one step.

A failed run leaves at most ``OUT.partial``, which nothing mistakes for a finished output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_dir(out: Path) -> Path:
    out = Path(out).resolve()
    return out.with_name(out.name + ".partial")


def write_text(path: Path, text: str) -> None:
    """`text` at `path`, replacing it in one step: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    """`data` as JSON at `path`, replaced in one step (`write_text`)."""
    write_text(path, json.dumps(data, indent=2, default=str))


def publish(work: Path, out: Path) -> None:
    """Rename the finished `work` to `out`. An existing non-empty `out` is swapped out only once the new one
    is in place (and restored if that fails), so `out` always holds a complete output."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(work, out)
        return
    old = out.with_name(out.name + ".replaced")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        work.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A fresh ``OUT.partial`` directory (an interrupted run's is removed) that is published as `out` when
    the block completes, and removed if it raises."""
    work = partial_dir(out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
        publish(work, Path(out).resolve())
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
