"""One process (a world of one): train a tiny SGTM model that saves at steps 2 and 4 into a checkpoint root, leave a
crashed save (iter_0000006.partial) beside them, then run every command that takes --checkpoint on the root through
the CLI, and save what each read and said.

Usage: python checkpoint_root.py OUT_DIR
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from megatron_sgtm.cli import main
from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.loop import train
from tests.support.train_fixtures import build_tiny_shards, tiny_config

TRAINED_STEPS = 4


def _cli(*argv: str) -> dict:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        status = main(list(argv))
    sys.stderr.write(err.getvalue())
    return {"status": status, "stderr": err.getvalue().splitlines(), "stdout": out.getvalue()}


def _meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def run(out: Path) -> dict:
    data = build_tiny_shards(out / "data", num_docs=120)
    root = out / "ckpt"
    cfg = tiny_config(data, out / "run", train={"train_steps": TRAINED_STEPS, "log_interval": 2, "eval_batches": 1},
                      checkpoint={"dir": str(root), "save_interval": 2})
    train(from_dict(cfg))
    (root / "iter_0000006.partial").mkdir()  # a save that did not finish: not a checkpoint to read
    results: dict = {"root": str(root), "iterations": sorted(p.name for p in root.iterdir())}
    ckpt = ("--checkpoint", str(root))

    results["inspect"] = _cli("inspect", *ckpt, "--json")
    results["ablate"] = _cli("ablate", *ckpt, "--out", str(out / "ablated"))
    results["ablate"]["meta"] = _meta(out / "ablated")
    results["export-hf"] = _cli("export-hf", *ckpt, "--out", str(out / "hf"))
    results["export-hf"]["manifest"] = json.loads((out / "hf" / "sgtm_manifest.json").read_text())
    results["eval"] = _cli("eval", *ckpt, "--data", str(data), "--out", str(out / "eval"), "--eval-batches", "1",
                           "--no-calibration", "--categories", "english")
    results["eval"]["result"] = json.loads((out / "eval" / "eval.json").read_text())
    for method, flags in (("rmu", ["--steps", "1"]), ("cir", ["--max-epochs", "1", "--forget-batches", "1"])):
        name = f"unlearn {method}"
        results[name] = _cli("unlearn", method, *ckpt, "--out", str(out / method), "--eval-batches", "1", *flags)
        results[name]["meta"] = _meta(out / method)
    results["attack finetune"] = _cli("attack", "finetune", *ckpt, "--out", str(out / "attack"),
                                      "--train.train_steps=1", "--train.eval_interval=1", "--train.eval_batches=1")
    results["attack finetune"]["result"] = json.loads((out / "attack" / "attack.json").read_text())

    unfinished = out / "unfinished"  # a root whose only save crashed
    (unfinished / "iter_0000002.partial").mkdir(parents=True)
    (unfinished / "latest.json").write_text('{"step": 2, "path": "iter_0000002"}')
    results["unfinished"] = _cli("inspect", "--checkpoint", str(unfinished))
    return results


if __name__ == "__main__":
    target = Path(sys.argv[1])
    (target / "results.json").write_text(json.dumps(run(target), indent=1))
