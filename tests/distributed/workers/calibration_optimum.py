"""Worker for the calibration test: the output bias `training.calibration.calibrated` fits on an ablated model at
TP=1 (PP=2) and at TP=2, with the full-vocabulary logits of its cached hidden states, so the test can find the
optimum of the same objective independently.

argv: OUT_DIR. Two ranks. Saves results.pt: per layout, the fitted bias (full vocabulary), the objective per
step, the calibrated loss of each group through the engine's evaluation and through the cache, and (at TP=2)
the cached logits and targets of each group.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sgtm.training.distributed import init_distributed

if __name__ == "__main__":
    init_distributed()  # CPU shims before megatron modules are imported and built

from megatron.core import parallel_state as ps  # noqa: E402

from megatron_sgtm.training.calibration import GROUPS, Settings, calibrated  # noqa: E402
from megatron_sgtm.training.config import from_dict  # noqa: E402
from megatron_sgtm.training.engine_megatron import MegatronEngine  # noqa: E402
from tests.support.train_fixtures import tiny_config  # noqa: E402

SETTINGS = Settings(steps=400, alpha=100.0, beta=100.0, lr=0.1)
LAYOUTS = {"tp1pp2": {"pipeline_model_parallel_size": 2}, "tp2": {"tensor_model_parallel_size": 2}}


def batch(gen: torch.Generator, mbs: int, seq: int, vocab: int) -> dict:
    """Targets covering every token (so the optimum is finite), with uneven frequencies."""
    targets = torch.cat([torch.randperm(vocab, generator=gen),
                         torch.randint(0, vocab // 4, (mbs * seq - vocab,), generator=gen)])
    targets = targets[torch.randperm(targets.numel(), generator=gen)].reshape(mbs, seq)
    tokens = torch.randint(0, vocab, (mbs, seq), generator=gen)
    return {"tokens": tokens, "targets": targets, "token_labels": torch.zeros(mbs, seq, dtype=torch.uint8),
            "loss_mask": torch.ones(mbs, seq), "position_ids": torch.arange(seq).expand(mbs, seq).clone()}


def run(out: Path, parallel: dict) -> dict:
    raw = tiny_config(out, out / "run", method="sgtm", parallel=parallel, optim={"micro_batch_size": 16,
                                                                                 "global_batch_size": 16})
    cfg = from_dict(raw)
    engine = MegatronEngine(cfg, cfg.sgtm.resolve(cfg.model.dims()), on_gpu=False)
    gen = torch.Generator().manual_seed(7)
    batches = {g: [batch(gen, 16, cfg.model.seq_length, cfg.model.vocab_size)] for g in GROUPS}
    found: dict = {}
    with calibrated(engine, batches, SETTINGS, ablate=True) as cal:
        evaluated = {g: engine.evaluate(b, ablate=True) for g, b in batches.items()}
        found["evaluated"] = torch.tensor([evaluated[g][0] / evaluated[g][1] for g in GROUPS])
        if cal.bias.layer is not None:
            tp = ps.get_tensor_model_parallel_group()
            pieces = [torch.empty_like(cal.bias.value) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(pieces, cal.bias.value, group=tp)
            found["fitted"] = torch.cat(pieces)
            found["history"] = torch.tensor(cal.history)
            logits = {}
            for g, cache in cal.caches.items():
                local = cache.hidden[0] @ cache.weight.t()
                parts = [torch.empty_like(local) for _ in pieces]
                dist.all_gather(parts, local.contiguous(), group=tp)
                logits[g] = torch.cat(parts, dim=-1).double()
                found[f"targets/{g}"] = cache.targets[0]
            found.update({f"logits/{g}": v for g, v in logits.items()})
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, found)
    engine.shutdown()
    return {k: v for share in shares for k, v in share.items() if k != "evaluated"} | {"evaluated": found["evaluated"]}


def main(out: Path) -> None:
    results = {}
    for name, parallel in LAYOUTS.items():
        results.update({f"{name}/{k}": v for k, v in run(out, parallel).items()})
    if dist.get_rank() == 0:
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
