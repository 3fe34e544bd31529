"""Worker for tests/distributed/test_eval_values.py (two ranks). argv: DIR, holding `shards` (training data),
`eval_shards` (another shard directory of the same tokenizer) and `ckpt` (a model-only checkpoint).

One launch, four evaluations of the checkpoint (DIR/<name>/eval.json): every document of `eval_shards` with all
their micro-batches, no calibration and absorption, at DP=2, TP=2 (with --categories) and PP=2; and the held-out
split of `shards` with calibration at DP=2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_sgtm.training.distributed import init_distributed

if __name__ == "__main__":
    init_distributed()  # CPU shims before megatron modules are imported and built

from megatron_sgtm.cli import main  # noqa: E402

GRAD_NORM_DOCS = 2
RUNS = {
    "dp2": [],
    "tp2": ["--tensor-model-parallel-size", "2", "--categories", "poetry"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}


def run(out: Path) -> None:
    base = ["eval", "--checkpoint", str(out / "ckpt"), "--data", str(out / "shards")]
    for name, extra in RUNS.items():
        assert main([*base, "--out", str(out / name), "--eval-data", str(out / "eval_shards"), "--eval-batches", "0",
                     "--no-calibration", "--grad-norms", "--grad-norm-docs", str(GRAD_NORM_DOCS), *extra]) == 0
    assert main([*base, "--out", str(out / "heldout"), "--eval-batches", "2", "--calibration-steps", "2"]) == 0


if __name__ == "__main__":
    run(Path(sys.argv[1]))
