"""One process (a world of one): train a tiny no-filter model, unlearn it with RMU and CIR through the CLI,
and save what the tests check (losses, which tensors changed, determinism, error lines).

Usage: python unlearn.py OUT_DIR
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from megatron_sgtm.cli import main
from megatron_sgtm.data.build import build_shards
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tokenizer import train_bpe
from megatron_sgtm.export.native import load_native
from megatron_sgtm.training.checkpoint import load_model_only
from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.loop import train
from tests.support.train_fixtures import build_tiny_shards, tiny_config

# A 2-layer gpt2-style model trained long enough that English (retain) and Spanish (forget) are learned.
TRAIN_STEPS = 200
RMU = ["--steps", "150", "--lr", "1e-3", "--steering-coeff", "20", "--eval-batches", "6"]
CIR = ["--max-epochs", "6", "--unlearning-rate", "0.002", "--act-directions", "1", "--grad-directions", "1",
       "--eval-batches", "6"]


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(list(argv))
    sys.stderr.write(err.getvalue())
    return status, err.getvalue()


def _english_only(out: Path) -> Path:
    docs = [d for d in generate(60, seed=1) if d.category == "english"]
    build_shards(docs, train_bpe((d.text for d in docs), 300), out)
    return out


def _unlearned(source: dict[str, torch.Tensor], path: Path) -> dict:
    meta, state = load_model_only(path)
    return {"meta": meta, "differing": sorted(n for n in source if not torch.equal(source[n], state[n])),
            "names": sorted(state) == sorted(source), "state": state}


def run(out: Path) -> dict:
    data = build_tiny_shards(out / "data", num_docs=400)
    cfg = tiny_config(data, out / "run", method="none", model={"seq_length": 64},
                      optim={"lr": 3e-3, "min_lr": 3e-4, "global_batch_size": 8, "micro_batch_size": 4},
                      train={"train_steps": TRAIN_STEPS, "log_interval": 50, "eval_batches": 4},
                      checkpoint={"dir": str(out / "ckpt")})
    cfg["sgtm"] = {}
    train(from_dict(cfg))
    source_path = next((out / "ckpt").glob("iter_*"))
    source = {n: t.clone() for n, t in load_native(source_path).state.items()}
    results: dict = {"source": str(source_path)}
    for method, flags in (("rmu", RMU), ("cir", CIR)):
        status, _ = _cli("unlearn", method, "--checkpoint", str(source_path), "--out", str(out / method), *flags)
        assert status == 0, f"unlearn {method} exited {status}"
        results[method] = _unlearned(source, out / method)
    status, _ = _cli("unlearn", "rmu", "--checkpoint", str(source_path), "--out", str(out / "rmu_again"), *RMU)
    again = load_model_only(out / "rmu_again")[1]
    results["rmu_deterministic"] = status == 0 and all(torch.equal(again[n], t)
                                                       for n, t in results["rmu"]["state"].items())
    results["errors"] = {
        "layer": _cli("unlearn", "rmu", "--checkpoint", str(source_path), "--out", str(out / "bad1"), "--layer", "7"),
        "no_forget": _cli("unlearn", "cir", "--checkpoint", str(source_path), "--out", str(out / "bad2"),
                          "--data", str(_english_only(out / "english"))),
        "bad_outputs": sorted(p.name for p in out.iterdir() if p.name.startswith("bad")),
    }
    for method in ("rmu", "cir"):
        del results[method]["state"]
    return results


if __name__ == "__main__":
    target = Path(sys.argv[1])
    (target / "results.json").write_text(json.dumps(run(target), indent=1))
