"""Worker for the eval parity test. argv: OUT_DIR MODE.

MODE single (one process): train the tiny model a few steps with a checkpoint, `export-hf` it, then
`megatron-sgtm eval` the native checkpoint (with --lm-eval) and the HF export at TP=1 (OUT/native, OUT/hf).
MODE tp2 (two ranks): `megatron-sgtm eval` the native checkpoint at TP=2 (OUT/tp2).
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_sgtm.training.distributed import init_distributed

if __name__ == "__main__":
    init_distributed()  # CPU shims before megatron modules are imported and built

from megatron_sgtm.cli import main  # noqa: E402
from megatron_sgtm.training.config import from_dict  # noqa: E402
from megatron_sgtm.training.loop import train  # noqa: E402
from tests.support.train_fixtures import build_tiny_shards, tiny_config  # noqa: E402

EVAL = ["--eval-batches", "2", "--calibration-steps", "10"]
LM_EVAL = ["--lm-eval", "--lm-eval-items", "4"]


def checkpoint(out: Path) -> Path:
    return out / "ckpt" / "iter_0000003"


def single(out: Path) -> None:
    shards = build_tiny_shards(out / "shards", num_docs=200)
    train(from_dict(tiny_config(shards, out / "run", checkpoint={"dir": str(out / "ckpt")},
                                train={"train_steps": 3, "log_interval": 1, "eval_interval": 0})))
    assert main(["export-hf", "--checkpoint", str(checkpoint(out)), "--out", str(out / "hf_export")]) == 0
    for name, path, extra in (("native", checkpoint(out), LM_EVAL), ("hf", out / "hf_export", [])):
        assert main(["eval", "--checkpoint", str(path), "--data", str(shards), "--out", str(out / name), *EVAL,
                     *extra]) == 0


def tp2(out: Path) -> None:
    assert main(["eval", "--checkpoint", str(checkpoint(out)), "--data", str(out / "shards"), "--out",
                 str(out / "tp2"), "--tensor-model-parallel-size", "2", *EVAL]) == 0


if __name__ == "__main__":
    {"single": single, "tp2": tp2}[sys.argv[2]](Path(sys.argv[1]))
