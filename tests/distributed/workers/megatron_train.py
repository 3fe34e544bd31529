"""Worker for the megatron-engine training tests: step gating and full `train()` runs.

argv: OUT_DIR SPEC_JSON. The spec holds ``gating`` (a config for the DP=2 step-gating check, or null;
``gating_bf16`` the same check of a bf16 config, its results under ``bf16/``),
``runs`` (name -> config dict for `megatron_sgtm.training.loop.train`) and ``record_docs`` (record the
documents each run's sampler delivers, as ``<name>/docs``; each run's losses, evaluation and `train_tokens` (in
`TOKEN_GROUPS` order) are saved too). Rank 0 saves results.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sgtm.training.distributed import init_distributed

if __name__ == "__main__":  # megatron's checkpoint writer spawns a process that re-imports this file
    init_distributed()  # CPU shims before megatron modules are imported and built

from megatron_sgtm.core.labels import TokenLabel  # noqa: E402
from megatron_sgtm.core.strategy import Region  # noqa: E402
from megatron_sgtm.data.sampler import SGTMSampler  # noqa: E402
from megatron_sgtm.layout import gather_global  # noqa: E402
from megatron_sgtm.training.config import from_dict  # noqa: E402
from megatron_sgtm.training.engine_megatron import MegatronEngine  # noqa: E402
from megatron_sgtm.training.loop import evaluation_metrics, train  # noqa: E402
from megatron_sgtm.training.run_data import TOKEN_GROUPS  # noqa: E402

UNLABELED, RETAIN, FORGET = TokenLabel


def hand_batches(cfg, step: int, labels: list[int], padded: bool = False) -> list[dict]:
    """This DP rank's micro-batches of one step; `labels` gives one label per sequence, in order. `padded`: each
    sequence ends in U-labelled padding at loss_mask 0 (1 to seq/2 positions; one sequence all padding)."""
    mbs, seq = cfg.optim.micro_batch_size, cfg.model.seq_length
    gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    batches = []
    for i in range(0, len(labels), mbs):
        tokens = torch.randint(0, cfg.model.vocab_size, (mbs, seq + 1), generator=gen)
        token_labels = torch.tensor(labels[i:i + mbs], dtype=torch.uint8)[:, None].expand(mbs, seq).clone()
        loss_mask = torch.ones(mbs, seq)
        if padded:
            for row in range(mbs):
                start = 0 if i == row == 0 else seq - int(torch.randint(1, seq // 2 + 1, (), generator=gen))
                token_labels[row, start:], loss_mask[row, start:] = UNLABELED, 0.0
        batches.append({
            "tokens": tokens[:, :-1], "targets": tokens[:, 1:], "token_labels": token_labels,
            "loss_mask": loss_mask, "position_ids": torch.arange(seq).expand(mbs, seq).clone(),
        })
    return batches


def shard_states(engine) -> list[tuple[torch.Tensor, dict, torch.Tensor | None]]:
    """(param shard, its Adam state, region codes) for every shard this rank's optimizer updates."""
    out = []
    for opt in engine.inner_optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                out.append((p.detach().clone(), {k: v.clone() for k, v in state.items() if torch.is_tensor(v)},
                            opt.codes_of(p)))
    return out


# Steps whose DP ranks hold different labels: (rank 0's label, rank 1's label). The gate must read the
# global batch's counts (all-reduced over DP): U trains both regions, so only F+F freezes one (Θ_R).
RANK_MIXES = {"ranks_F_U": (FORGET, UNLABELED), "ranks_F_F": (FORGET, FORGET), "ranks_R_F": (RETAIN, FORGET)}
# The same with U padding at loss_mask 0 on rank 0 (its loss-bearing tokens all F, resp. all R): padding is not
# loss-bearing, so the step is still all-F (all-R) and freezes Θ_R (Θ_F).
PADDED_MIXES = {"ranks_Fpad_F": (FORGET, FORGET), "ranks_Rpad_R": (RETAIN, RETAIN)}


def region_counts(before: list, after: list) -> torch.Tensor:
    """[[same, total, changed] for Θ_R, for Θ_F] over this rank's shard params and Adam moments, summed
    over ranks."""
    counts = torch.zeros(2, 3, dtype=torch.float64)
    for (p0, s0, codes), (p1, s1, _) in zip(before, after):
        if codes is None:
            continue
        for a, b in [(p0, p1), (s0["exp_avg"], s1["exp_avg"]), (s0["exp_avg_sq"], s1["exp_avg_sq"])]:
            for row, region in enumerate((Region.RETAIN, Region.FORGET)):
                sel = codes == region
                counts[row] += torch.tensor([int((a[sel] == b[sel]).sum()), int(sel.sum()),
                                             int((a[sel] != b[sel]).sum())], dtype=torch.float64)
    dist.all_reduce(counts)
    return counts


def gating(raw: dict, prefix: str = "") -> dict:
    """Invariant 3 of docs/design.md (step gating) under the DistributedOptimizer at DP=2. In bf16 the shards
    are the fp32 main params (and their Adam moments) and `engine.model` holds the bf16 params."""
    cfg = from_dict(raw)
    engine = MegatronEngine(cfg, cfg.sgtm.resolve(cfg.model.dims()), on_gpu=False)
    per_rank = cfg.optim.global_batch_size // engine.dp_size
    mixed = [RETAIN, FORGET, UNLABELED, RETAIN, FORGET, UNLABELED, RETAIN, FORGET][:per_rank]
    results: dict = {"shards_fp32": torch.tensor(all(p.dtype == torch.float32 for p, _, _ in shard_states(engine))),
                     "model_bf16": torch.tensor(all(p.dtype == torch.bfloat16 for p in engine.model.parameters()))}
    for step in range(3):
        engine.train_step(hand_batches(cfg, step, mixed))
    for name, label in (("all_forget", FORGET), ("all_retain", RETAIN)):
        before_params = gather_global(engine.model)
        before_shards = shard_states(engine)
        metrics = engine.train_step(hand_batches(cfg, 10 + label, [label] * per_rank))
        after_params = gather_global(engine.model)
        counts = region_counts(before_shards, shard_states(engine))
        frozen, moved = (0, 1) if label == FORGET else (1, 0)  # rows of `counts`: Θ_R, Θ_F
        results[f"{name}/shard_counts"] = torch.stack([counts[frozen, 0], counts[frozen, 1], counts[moved, 2]])
        results[f"{name}/gated"] = torch.tensor([metrics["gated_retain"], metrics["gated_forget"]])
        for key in before_params:
            results[f"{name}/before/{key}"] = before_params[key]
            results[f"{name}/after/{key}"] = after_params[key]
    for step, (name, labels) in enumerate({**RANK_MIXES, **PADDED_MIXES}.items(), start=20):
        before_shards = shard_states(engine)
        padded = name in PADDED_MIXES and engine.dp_rank == 0
        metrics = engine.train_step(hand_batches(cfg, step, [labels[engine.dp_rank]] * per_rank, padded))
        results[f"{name}/region_counts"] = region_counts(before_shards, shard_states(engine))
        results[f"{name}/gated"] = torch.tensor([metrics["gated_retain"], metrics["gated_forget"]])
    engine.shutdown()
    return {prefix + key: value for key, value in results.items()}


@contextlib.contextmanager
def recorded_docs(enabled: bool) -> Iterator[list[torch.Tensor]]:
    """While open, every micro-batch a `SGTMSampler` iterates adds its input tokens' (global step, document,
    offset) rows, gathered from all ranks, to the yielded list (on every rank; padding left out)."""
    rows: list[torch.Tensor] = []
    if not enabled:
        yield rows
        return
    original = SGTMSampler.__next__

    def recording(self):
        step = self.step
        batch = original(self)
        valid = batch["doc_ids"] >= 0
        mine = torch.stack([torch.full_like(batch["doc_ids"][valid], step), batch["doc_ids"][valid],
                            batch["doc_offsets"][valid]], dim=1)
        rows.append(mine)
        return batch

    SGTMSampler.__next__ = recording
    try:
        yield rows
    finally:
        SGTMSampler.__next__ = original
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.int64))
    rows[:] = gathered


def main(out_dir: str, spec_json: str) -> None:
    spec = json.loads(Path(spec_json).read_text())
    results: dict = {}
    if spec.get("gating"):
        results.update(gating(spec["gating"]))
    if spec.get("gating_bf16"):
        results.update(gating(spec["gating_bf16"], "bf16/"))
    for name, raw in spec.get("runs", {}).items():
        with recorded_docs(spec.get("record_docs", False)) as docs:
            final = train(from_dict(raw))
        if docs:
            results[f"{name}/docs"] = torch.cat(docs)
        results[f"{name}/losses"] = torch.tensor(final["train_losses"], dtype=torch.float64)
        results[f"{name}/train_tokens"] = torch.tensor([final["train_tokens"][g] for g in TOKEN_GROUPS])
        for key, value in evaluation_metrics(final).items():
            results[f"{name}/{key}"] = torch.tensor(value, dtype=torch.float64)
    if dist.get_rank() == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
