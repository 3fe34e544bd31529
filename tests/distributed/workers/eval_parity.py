"""Worker for the eval parity test. argv: OUT_DIR MODE.

MODE single (one process): train the tiny model a few steps with a checkpoint, `export-hf` it, then
`megatron-sgtm eval` the native checkpoint (with --lm-eval) and the HF export at TP=1 (OUT/native, OUT/hf); then,
outside eval, the ablated model's loss on the first calibration micro-batch of each group (OUT/first_losses.json:
what the fit's first objective is made of).
MODE tp2 (two ranks): `megatron-sgtm eval` the native checkpoint at TP=2 (OUT/tp2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_sgtm.training.distributed import init_distributed

if __name__ == "__main__":
    init_distributed()  # CPU shims before megatron modules are imported and built

from megatron_sgtm.cli import build_parser, main  # noqa: E402
from megatron_sgtm.evaluation.cli import eval_config  # noqa: E402
from megatron_sgtm.export.source import open_source  # noqa: E402
from megatron_sgtm.training.config import from_dict  # noqa: E402
from megatron_sgtm.training.engine_megatron import MegatronEngine  # noqa: E402
from megatron_sgtm.training.loop import train  # noqa: E402
from megatron_sgtm.training.run_data import calibration_batches, load_data  # noqa: E402
from tests.support.train_fixtures import build_tiny_shards, tiny_config  # noqa: E402

# Calibration flags away from the defaults (α = β = 100, lr 1e-2), α ≠ β: the test checks they reach the fit.
CALIBRATION = {"--calibration-steps": "10", "--calibration-alpha": "30", "--calibration-beta": "3",
               "--calibration-lr": "0.05"}
EVAL = ["--eval-batches", "2", *(item for flag_value in CALIBRATION.items() for item in flag_value)]
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
    (out / "first_losses.json").write_text(json.dumps(first_losses(out, shards)))


def first_losses(out: Path, shards: Path) -> dict[str, float]:
    """The ablated native model's mean token loss on each group's first calibration micro-batch, by a plain
    evaluation (no output bias) of the batches eval's calibration draws, at eval's settings."""
    args = build_parser().parse_args(["eval", "--checkpoint", str(checkpoint(out)), "--data", str(shards),
                                      "--out", str(out / "unused"), *EVAL])
    cfg = eval_config(open_source(checkpoint(out), 1), args, 1, out / "first_losses")
    engine = MegatronEngine(cfg, cfg.sgtm.resolve(cfg.model.dims()), on_gpu=False)
    engine.load_weights(str(checkpoint(out)))
    batches = calibration_batches(cfg, engine, load_data(cfg))
    losses = {g: engine.evaluate(b[:1], ablate=True) for g, b in batches.items() if b}
    engine.shutdown()
    return {g: loss / tokens for g, (loss, tokens) in losses.items()}


def tp2(out: Path) -> None:
    assert main(["eval", "--checkpoint", str(checkpoint(out)), "--data", str(out / "shards"), "--out",
                 str(out / "tp2"), "--tensor-model-parallel-size", "2", *EVAL]) == 0


if __name__ == "__main__":
    {"single": single, "tp2": tp2}[sys.argv[2]](Path(sys.argv[1]))
