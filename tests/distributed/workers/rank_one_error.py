"""`megatron-sgtm <args>` under torchrun where rank 1 alone meets bad input after the process group exists: its
data loading raises a `ShardError` (a shard its node cannot read), while rank 0 goes on into the model build's
collectives and waits there. The fault is injected here; the reporting and the exit are the CLI's own."""

from __future__ import annotations

import os
import sys

from megatron_sgtm.cli import main
from megatron_sgtm.data.shards import ShardError
from megatron_sgtm.training import loop


def _unreadable(cfg):
    raise ShardError(f"shard {cfg.data.path}/shard-000000.tar: cannot be read (Input/output error on rank 1)")


if __name__ == "__main__":
    if os.environ["RANK"] == "1":
        loop.load_data = _unreadable
    sys.exit(main(sys.argv[1:]))
