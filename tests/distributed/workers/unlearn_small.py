"""One process (a world of one): a 4-layer no-filter model, then CIR and RMU called directly (no CLI) with
small settings, to check CIR's budget stop and undo, its determinism, and which tensors each method moves.

Saves, per run, every parameter of the model after it, and the disruption (retain) losses of some of them
computed here with `F.cross_entropy` on the model's logits, not with the unlearning code's own loss.

Usage: python unlearn_small.py OUT_DIR
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.loop import train
from megatron_sgtm.unlearning import cir, rmu
from megatron_sgtm.unlearning.common import Unlearning, load_unlearning
from tests.support.train_fixtures import build_tiny_shards, tiny_config

NUM_LAYERS = 4  # CIR's default range 2..3 updates layers 0..2; RMU at layer 3 updates 1..3: neither is "all"
# CIR small enough for a second an epoch; a forget step large enough to cross the 0.1% budget after a few
# epochs (measured: epoch 2).
CIR = cir.CIRSettings(batch_size=2, forget_batches=2, disruption_batches=2, unlearning_rate=4.0, max_epochs=8)
# The paper's CIR (forget-PC collapse, randomised PCA, MLP breaking): what a missing seed would change.
CIR_PAPER = dataclasses.replace(CIR, collapse="forget", forget_loss="mlp-breaking", grad_directions=4,
                                disruption_mask=False, unlearning_rate=0.05, max_epochs=3)
RMU = rmu.RMUSettings(layer=3, steps=3, batch_size=2, lr=1e-2, log_interval=1)


def disruption_loss(source: Unlearning, settings: cir.CIRSettings) -> float:
    """The mean next-token cross-entropy over CIR's disruption batches (the retain stream's batches after the
    paired retain batches), from the logits with `F.cross_entropy`."""
    stream = source.stream(source.retain_docs, settings.batch_size, settings.seed + 1)
    batches = [next(stream) for _ in range(settings.forget_batches + settings.disruption_batches)]
    total, count = 0.0, 0.0
    with torch.no_grad():
        for mb in batches[settings.forget_batches:]:
            logits = source.forward(mb).float()
            ce = F.cross_entropy(logits.flatten(0, 1), mb["targets"].flatten().long(), reduction="none")
            total += float((ce * mb["loss_mask"].flatten()).sum())
            count += float(mb["loss_mask"].sum())
    return total / count


def main(out: Path) -> None:
    data = build_tiny_shards(out / "data", num_docs=200)
    cfg = tiny_config(data, out / "run", method="none", model={"num_layers": NUM_LAYERS},
                      train={"train_steps": 20, "log_interval": 10}, checkpoint={"dir": str(out / "ckpt")})
    cfg["sgtm"] = {}
    train(from_dict(cfg))
    source = load_unlearning(str(next((out / "ckpt").glob("iter_*"))), None)
    start = {n: p.detach().clone() for n, p in source.module.named_parameters()}
    results: dict = {"start": start, "start_loss": disruption_loss(source, CIR)}

    def run(name: str, method, settings) -> dict:
        with torch.no_grad():
            for n, p in source.module.named_parameters():
                p.copy_(start[n])
        resolved, _, _ = method.unlearn(source, settings)
        results[name] = {"params": {n: p.detach().clone() for n, p in source.module.named_parameters()},
                         "epochs": resolved.get("epochs", -1)}
        return results[name]

    crossed = run("cir", cir, CIR)["epochs"]  # the epoch that crossed the budget (undone), or max_epochs
    results["cir"]["disruption"] = disruption_loss(source, CIR)
    if 2 <= crossed < CIR.max_epochs:
        run("cir_until_crossing", cir, dataclasses.replace(CIR, max_epochs=crossed))  # epochs 0..crossed-1
        # the crossing epoch kept: the same run without a budget, one epoch longer
        run("cir_crossing_kept", cir, dataclasses.replace(CIR, max_epochs=crossed + 1, loss_budget=float("inf")))
        results["cir_crossing_kept"]["disruption"] = disruption_loss(source, CIR)
    run("cir_paper", cir, CIR_PAPER)
    run("cir_paper_again", cir, CIR_PAPER)
    run("rmu", rmu, RMU)
    torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
