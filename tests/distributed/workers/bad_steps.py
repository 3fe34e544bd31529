"""One process (a world of one): `train` with a non-finite value injected at chosen steps, to check the NaN
stop's two triggers and `train.max_bad_steps`. Saves each run's error line and per-step records.

- ``grad``: +inf added to one parameter's gradient (a tensor hook, so megatron DDP accumulates it) at
  step 3; the loss stays finite, only the clipped step's grad norm is not (`train.max_bad_steps` 1).
- ``loss``: +inf added to the model's per-token losses at steps 2, 4 and 5; the gradient of a sum does not
  depend on the summands' values, so the gradients and the weights stay finite and training recovers after
  step 2 (`train.max_bad_steps` 2, a checkpoint every step).

Usage: python bad_steps.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron.core import parallel_state as ps

from megatron_sgtm.training import engine_megatron, loop
from megatron_sgtm.training.config import from_dict
from tests.support.train_fixtures import build_tiny_shards, tiny_config

GRAD_STEPS, LOSS_STEPS = {3}, {2, 4, 5}
HOOKED = "decoder.final_layernorm.weight"


def injecting(kind: str) -> type:
    """The megatron engine, counting its steps and adding +inf where `kind` says."""

    class Injecting(engine_megatron.MegatronEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps = 0
            if kind == "grad":
                param = dict(self.model.named_parameters())[HOOKED]
                param.register_hook(lambda g: g + float("inf") if self.steps in GRAD_STEPS else g)
            else:
                self.model.register_forward_hook(
                    lambda module, _inputs, out: out + float("inf") if module.training and self.steps in LOSS_STEPS
                    else out)

        def train_step(self, batches: list[dict]) -> dict:
            self.steps += 1
            return super().train_step(batches)

    return Injecting


def run(out: Path, data: Path, kind: str, max_bad_steps: int) -> dict:
    cfg = tiny_config(data, out / kind, method="none", train={"train_steps": 8, "max_bad_steps": max_bad_steps},
                      checkpoint={"dir": str(out / kind / "ckpt"), "save_interval": 1, "keep_last": 10})
    cfg["sgtm"] = {}
    original, engine_megatron.MegatronEngine = engine_megatron.MegatronEngine, injecting(kind)  # what train builds
    error = None
    try:
        loop.train(from_dict(cfg))
    except loop.TrainingError as err:
        error = str(err)
        ps.destroy_model_parallel()  # the loop leaves the engine up when it raises
    finally:
        engine_megatron.MegatronEngine = original
    records = [json.loads(line) for line in (out / kind / "metrics.jsonl").read_text().splitlines()]
    return {"error": error, "train": [r for r in records if r["kind"] == "train"],
            "checkpoints": sorted(p.name for p in (out / kind / "ckpt").glob("iter_???????"))}


def main(out: Path) -> None:
    data = build_tiny_shards(out / "data", num_docs=120)
    results = {"grad": run(out, data, "grad", 1), "loss": run(out, data, "loss", 2)}
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
