"""Disk space for checkpoints: how much one needs at least, and whether a failed save ran out of it.

A save that fills the disk does not always say so: megatron's distributed checkpoint writes through torch's
zip writer, whose error is "unexpected pos 704 vs 598", the ENOSPC lost on the way. So a failed save is
called disk full when an ENOSPC/EDQUOT is in its exception chain or when the filesystem it wrote to has
(nearly) nothing left.
"""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_sgtm.model import ModelConfig

# The fewest bytes a checkpoint holds per parameter, whatever the engine: the weights (fp32, or bf16 with fp32
# master weights) and Adam's two fp32 moments. Measured: 22 bytes per parameter for the megatron engine in fp32.
MIN_CHECKPOINT_BYTES_PER_PARAM = 12
# A write failed with less than this free on its filesystem: the disk filled up (a write fails only when the
# space is gone, so what is left is at most a block or two).
FULL_BELOW_BYTES = 1 << 20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (statvfs f_bavail)."""
    return shutil.disk_usage(path).free


def checkpoint_bytes(model: ModelConfig) -> int:
    """A lower bound on one training checkpoint's size (all ranks' shards together)."""
    from megatron_sgtm.sweep.sizes import count_parameters

    return MIN_CHECKPOINT_BYTES_PER_PARAM * count_parameters(model).total


def _chain(err: BaseException):
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_full(err: BaseException, directory: Path) -> bool:
    """Whether a write to `directory` that raised `err` failed for want of space."""
    if any(isinstance(e, OSError) and e.errno in _FULL_ERRNOS for e in _chain(err)):
        return True
    try:
        return free_bytes(directory) < FULL_BELOW_BYTES
    except OSError:
        return False


def human(num_bytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(max(num_bytes, 1), 1024)), len(units) - 1)
    return f"{num_bytes:.0f} B" if power == 0 else f"{num_bytes / 1024**power:.1f} {units[power]}"
