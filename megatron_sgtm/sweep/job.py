"""The training step `slurm/launch.sh` starts on every task: `megatron-sgtm train` with
``checkpoint.resume=auto``, and a status line for the batch script.

Only the trainer knows whether it reached ``train.train_steps`` or stopped early on SIGUSR1/SIGTERM
(after saving a checkpoint), so rank 0 writes ``finished`` or ``stopped`` to ``$SGTM_STATUS_FILE``, and a
stopped run exits with status 75 (as `megatron-sgtm train`); the batch script requeues the job only for
``stopped``. A run whose ``summary.json`` exists is skipped, so a requeued or resubmitted finished run costs nothing.

    python -m megatron_sgtm.sweep.job CONFIG [--section.key=value ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_sgtm.compat.known_warnings import filter_known_warnings
from megatron_sgtm.errors import UserError, debug_requested, is_first_rank, report

STATUS_ENV = "SGTM_STATUS_FILE"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    debug = debug_requested(False)
    if not debug:
        filter_known_warnings()  # before megatron-core is imported
    from megatron_sgtm.training.config import ConfigError, load_config

    try:
        cfg = load_config(argv[0], [*argv[1:], "checkpoint.resume=auto"])
        if not cfg.checkpoint.dir:
            raise ConfigError("checkpoint.dir is required under SLURM: a preempted or requeued job resumes from it")
        from megatron_sgtm.training.loop import STOPPED_EXIT_STATUS, train

        if (Path(cfg.logging.run_dir) / "summary.json").is_file():
            print(f"[sgtm] {cfg.logging.run_dir} already finished; nothing to do", file=sys.stderr)
            stopped = False
        else:
            stopped = "stopped" in train(cfg)
    except (UserError, OSError) as err:  # as `megatron-sgtm train` reports them
        return report(err, "train", debug)
    status = os.environ.get(STATUS_ENV)
    if status and is_first_rank():
        Path(status).write_text("stopped\n" if stopped else "finished\n")
    return STOPPED_EXIT_STATUS if stopped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
