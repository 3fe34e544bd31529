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

# A 2-layer gpt2-style model (width 64) trained long enough that English (retain) and Spanish (forget) differ.
TRAIN_STEPS = 300
RMU = ["--steps", "150", "--lr", "3e-3", "--steering-coeff", "50", "--alpha", "10", "--eval-batches", "6"]
CIR = ["--unlearning-rate", "0.3", "--max-epochs", "15", "--eval-batches", "6"]
# The paper's first CIR (forget-PC collapse, MLP breaking, no mask): a few epochs, for its budget and subset.
CIR_PAPER = ["--collapse", "forget", "--forget-loss", "mlp-breaking", "--grad-directions", "36",
             "--no-disruption-mask", "--unlearning-rate", "0.002", "--max-epochs", "4", "--eval-batches", "6"]


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
    cfg = tiny_config(data, out / "run", method="none", model={"seq_length": 64, "hidden_size": 64,
                                                                "ffn_hidden_size": 256},
                      optim={"lr": 3e-3, "min_lr": 3e-4, "global_batch_size": 8, "micro_batch_size": 4},
                      train={"train_steps": TRAIN_STEPS, "log_interval": 50, "eval_batches": 4},
                      checkpoint={"dir": str(out / "ckpt")})
    cfg["sgtm"] = {}
    train(from_dict(cfg))
    source_path = next((out / "ckpt").glob("iter_*"))
    source = {n: t.clone() for n, t in load_native(source_path).state.items()}
    results: dict = {"source": str(source_path)}
    for name, method, flags in (("rmu", "rmu", RMU), ("cir", "cir", CIR), ("cir_paper", "cir", CIR_PAPER)):
        status, _ = _cli("unlearn", method, "--checkpoint", str(source_path), "--out", str(out / name), *flags)
        assert status == 0, f"unlearn {name} exited {status}"
        results[name] = _unlearned(source, out / name)
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
    for name in ("rmu", "cir", "cir_paper"):
        del results[name]["state"]
    return results


if __name__ == "__main__":
    target = Path(sys.argv[1])
    (target / "results.json").write_text(json.dumps(run(target), indent=1))
