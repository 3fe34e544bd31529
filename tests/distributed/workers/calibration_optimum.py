"""Worker for the calibration test: the output bias `training.calibration.calibrated` fits on an ablated model at
TP=1 (PP=2), TP=2 (both DP=1) and DP=2, with distinct α and β, on several micro-batches per group with partial loss
masks; the test recomputes the fit independently (tests/support/reference_gpt.py's logits, a plain Adam).

argv: OUT_DIR. Two ranks. Saves results.pt: the global micro-batches of each group, the model's global (live)
weights, and per layout and settings the fitted bias (full vocabulary), the objective per step and the calibrated
loss of each group through the engine's evaluation; at DP=2 the largest difference between the ranks' biases.
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

from megatron_sgtm.layout import gather_global  # noqa: E402
from megatron_sgtm.training.calibration import Settings, calibrated  # noqa: E402
from megatron_sgtm.training.config import from_dict  # noqa: E402
from megatron_sgtm.training.engine_megatron import MegatronEngine  # noqa: E402
from tests.support.train_fixtures import tiny_config  # noqa: E402

# Distinct α (retain) and β (adjacent), and the same with them swapped (the test checks the direction).
SETTINGS = {"fit": Settings(steps=300, alpha=30.0, beta=3.0, lr=0.1),
            "swapped": Settings(steps=300, alpha=3.0, beta=30.0, lr=0.1)}
LAYOUTS = {"tp1pp2": {"pipeline_model_parallel_size": 2}, "tp2": {"tensor_model_parallel_size": 2}, "dp2": {}}
MBS = 4
MICRO_BATCHES = {"forget": 4, "adjacent": 4, "retain": 2}  # global micro-batches per group (even, for DP=2)
EMPTY = ("adjacent", 1)  # a micro-batch without loss-bearing tokens: left out of the fit
MASKED_TARGET = 5  # the target at every loss_mask-0 position (a fit that counted them would favour it)


def global_batches(seq: int, vocab: int) -> dict[str, list[dict]]:
    """Each group's micro-batches in global order: ~70% of positions loss-bearing; their targets skewed to the
    group's own quarter of the vocabulary, with every token among them once somewhere (a finite optimum)."""
    gen = torch.Generator().manual_seed(7)
    masks = {g: (torch.rand(n, MBS, seq, generator=gen) < 0.7).float() for g, n in MICRO_BATCHES.items()}
    masks[EMPTY[0]][EMPTY[1]] = 0.0
    quarter = vocab // 4
    targets = {g: torch.randint(k * quarter, (k + 1) * quarter, (n, MBS, seq), generator=gen)
               for k, (g, n) in enumerate(MICRO_BATCHES.items())}
    flat_targets = torch.cat([t.reshape(-1) for t in targets.values()])
    kept = torch.cat([m.reshape(-1) for m in masks.values()]).nonzero().squeeze(1)
    flat_targets[kept[torch.randperm(kept.numel(), generator=gen)[:vocab]]] = torch.randperm(vocab, generator=gen)
    flat_mask = torch.cat([m.reshape(-1) for m in masks.values()])
    flat_targets[flat_mask == 0] = MASKED_TARGET
    out, start = {}, 0
    for g, n in MICRO_BATCHES.items():
        size = n * MBS * seq
        group_targets = flat_targets[start:start + size].view(n, MBS, seq)
        group_masks = flat_mask[start:start + size].view(n, MBS, seq)
        start += size
        out[g] = [{"tokens": torch.randint(0, vocab, (MBS, seq), generator=gen), "targets": group_targets[i].clone(),
                   "token_labels": torch.zeros(MBS, seq, dtype=torch.uint8), "loss_mask": group_masks[i].clone(),
                   "position_ids": torch.arange(seq).expand(MBS, seq).clone()} for i in range(n)]
    return out


def run(out: Path, name: str, parallel: dict) -> dict:
    raw = tiny_config(out, out / "run", method="sgtm", parallel=parallel,
                      optim={"micro_batch_size": MBS, "global_batch_size": 2 * MBS})
    cfg = from_dict(raw)
    engine = MegatronEngine(cfg, cfg.sgtm.resolve(cfg.model.dims()), on_gpu=False)
    batches = global_batches(cfg.model.seq_length, cfg.model.vocab_size)
    mine = {g: b[engine.dp_rank::engine.dp_size] for g, b in batches.items()}  # global i·DP + r on DP rank r
    found: dict = {}
    if name == "dp2":  # TP=PP=1: every rank holds the whole model
        found["weights"] = gather_global(engine.model)
        found["batches"] = batches
    for key, settings in SETTINGS.items() if name == "dp2" else [("fit", SETTINGS["fit"])]:
        with calibrated(engine, mine, settings, ablate=True) as cal:
            evaluated = {g: engine.evaluate(b, ablate=True) for g, b in mine.items()}
            found[f"{key}/evaluated"] = {g: loss / tokens for g, (loss, tokens) in evaluated.items()}
            if cal.bias.layer is not None:
                tp = ps.get_tensor_model_parallel_group()
                pieces = [torch.empty_like(cal.bias.value) for _ in range(ps.get_tensor_model_parallel_world_size())]
                dist.all_gather(pieces, cal.bias.value, group=tp)
                found[f"{key}/fitted"] = torch.cat(pieces)
                found[f"{key}/history"] = torch.tensor(cal.history)
                if engine.dp_size > 1:
                    spread = torch.stack([found[f"{key}/fitted"], -found[f"{key}/fitted"]])
                    dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=engine.dp_group)
                    found[f"{key}/dp_spread"] = (spread[0] + spread[1]).max()
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, found)
    engine.shutdown()
    return {k: v for share in shares for k, v in share.items()}


def main(out: Path) -> None:
    results = {}
    for name, parallel in LAYOUTS.items():
        results.update({f"{name}/{k}": v for k, v in run(out, name, parallel).items()})
    if dist.get_rank() == 0:
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
