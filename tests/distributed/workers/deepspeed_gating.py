"""2-rank worker: the deepspeed engine at ZeRO 1, 2, 3 (DP=2) and ZeRO-1 at TP=2.

For each layout it trains on hand-built global batches (3 mixed-label steps, then an all-F step,
then an all-R step), and records on rank 0, in global (TP=1) model space: losses, the fp32
parameters and Adam moments around the gated steps, the region masks, a check of the engine's
flat-partition layout against DeepSpeed's own gather helpers, live/ablated eval losses, and the
losses of steps 4-5 replayed after `load()` of a checkpoint saved at step 3. Then, at ZeRO-2 and
ZeRO-3, steps whose two DP ranks hold different labels (`RANK_MIXES`). `BF16_LAYOUTS` run the same schedule
in bf16 (DeepSpeed's bf16 section: bf16 params, fp32 partitions), also recording the bf16 model params. The pytest side
(tests/test_engine_deepspeed.py) does the comparisons.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sgtm.training.distributed import init_distributed

if __name__ == "__main__":  # the tests import this module's constants without starting a process group
    init_distributed()  # CPU shims before megatron modules are imported and built

from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from megatron_sgtm.compat.deepspeed import layout_partitions  # noqa: E402
from megatron_sgtm.core.labels import TokenLabel, token_labels  # noqa: E402
from megatron_sgtm.core.partition import SGTMConfig  # noqa: E402
from megatron_sgtm.core.regions import param_regions  # noqa: E402
from megatron_sgtm.layout import gather_global  # noqa: E402
from megatron_sgtm.model import ModelConfig  # noqa: E402
from megatron_sgtm.training.batch_geometry import model_inputs  # noqa: E402
from megatron_sgtm.training.config import (  # noqa: E402
    DataConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainLoopConfig,
)
from megatron_sgtm.training.engine_deepspeed import DeepSpeedEngine  # noqa: E402
from megatron_sgtm.training.engine_megatron import MegatronEngine  # noqa: E402

UNLABELED, RETAIN, FORGET = TokenLabel

MODEL = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=16,
                    ffn_hidden_size=64)
MBS, GBS = 2, 8
# ZeRO-3 would keep these tiny parameters whole: partition them for real.
Z3 = {"stage3_param_persistence_threshold": 0}
# (key, zero stage, TP, cpu offload, the DeepSpeed JSON's zero_optimization section)
LAYOUTS = [
    ("zero1", 1, 1, False, {}),
    ("zero2", 2, 1, False, {}),
    ("zero3", 3, 1, False, Z3),
    ("zero1_tp2", 1, 2, False, {}),
    ("zero2_offload", 2, 1, True, {}),
    # several fp32 sub-groups per param group (DeepSpeed steps each separately), optimizer offload
    ("zero3_subgroups_offload", 3, 1, True, {**Z3, "sub_group_size": 1500}),
]
BF16_LAYOUTS = [("zero2_bf16", 2, 1, False, {})]
SCHEDULE = ["mixed", "mixed", "mixed", "forget", "retain"]
# Layouts whose logged step losses are checked against `recomputed_loss` (as is the megatron engine's).
RECOMPUTED = ("zero1", "zero1_tp2")
# Steps whose DP ranks hold different labels, after one mixed step: (rank 0's label, rank 1's label).
RANK_MIXES = {"F_U": (FORGET, UNLABELED), "F_F": (FORGET, FORGET), "R_F": (RETAIN, FORGET)}
MIX_LAYOUTS = [("mix_zero2", 2, {}), ("mix_zero3", 3, Z3)]  # (key, zero stage, zero_optimization section)


def global_batch(step: int, kind: str) -> list[dict]:
    """GBS / MBS micro-batches of packed documents; the same for every layout."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(GBS // MBS):
        s = MODEL.seq_length
        tokens = torch.randint(0, MODEL.vocab_size, (MBS, s + 1), generator=g)
        cut = torch.randint(3, s - 3, (MBS,), generator=g)
        pos = torch.arange(s).expand(MBS, s).clone()
        for b in range(MBS):
            pos[b, cut[b]:] -= cut[b]
        if kind == "mixed":
            labels = torch.randint(0, 3, (MBS, s), generator=g).to(torch.uint8)
        else:
            labels = torch.full((MBS, s), FORGET if kind == "forget" else RETAIN, dtype=torch.uint8)
        mask = (torch.rand(MBS, s, generator=g) > 0.1).float()
        out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "token_labels": labels,
                    "loss_mask": mask, "position_ids": pos})
    return out


def make_cfg(stage: int, tp: int, ds_json: str, offload: bool = False, bf16: bool = False) -> TrainConfig:
    cfg = TrainConfig(
        model=MODEL,
        method="sgtm",
        sgtm=SGTMConfig(forget_heads=1, forget_mlp_units=8),
        data=DataConfig(document_attention=True),
        parallel=ParallelConfig(engine="deepspeed", tensor_model_parallel_size=tp, zero_stage=stage,
                                deepspeed_config=ds_json, cpu_offload=offload),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, weight_decay=0.1, clip_grad=1.0,
                          global_batch_size=GBS, micro_batch_size=MBS),
        train=TrainLoopConfig(train_steps=10, seed=1234, bf16=bf16),
    )
    cfg.sgtm.strategy = cfg.strategy
    return cfg


def build_engine(out_dir: str, key: str, stage: int, tp: int, zero: dict, offload: bool = False,
                 bf16: bool = False) -> DeepSpeedEngine:
    ds_json = Path(out_dir) / f"ds_{key}.json"
    if dist.get_rank() == 0:
        ds_json.write_text(json.dumps({"zero_optimization": zero}))
    dist.barrier()
    torch.manual_seed(1234)
    cfg = make_cfg(stage, tp, str(ds_json), offload, bf16)
    return DeepSpeedEngine(cfg, cfg.sgtm.resolve(MODEL.dims()), on_gpu=False)


def region_masks(engine: DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """Global (TP=1) region masks: 2 forget, 1 retain, 0 joint."""
    regions = param_regions(engine.model)
    masks = {}
    for name in engine.named:
        probe = torch.empty(engine.model_shape[name])
        masks[name] = regions[name].forget_mask(probe).float() * 2 + regions[name].retain_mask(probe).float()
    return gather_global(engine.model, masks)


def rank_mixes(out_dir: str, results: dict) -> None:
    """One mixed step, then one step per `RANK_MIXES` entry, each DP rank's micro-batches all of its label;
    records the global fp32 params and Adam moments around each such step."""
    for key, stage, zero in MIX_LAYOUTS:
        engine = build_engine(out_dir, key, stage, 1, zero)
        results[f"{key}/regions"] = region_masks(engine)
        per_rank = GBS // MBS // engine.dp_size
        mine = slice(engine.dp_rank * per_rank, (engine.dp_rank + 1) * per_rank)
        engine.train_step(global_batch(1, "mixed")[mine])
        for step, (case, labels) in enumerate(RANK_MIXES.items(), start=2):
            batch = global_batch(step, "mixed")[mine]
            for mb in batch:
                mb["token_labels"].fill_(labels[engine.dp_rank])
            before = full_state(engine)
            metrics = engine.train_step(batch)
            results[f"{key}/{case}/gated"] = torch.tensor([metrics["gated_retain"], metrics["gated_forget"]])
            for when, state in (("before", before), ("after", full_state(engine))):
                for kind, tensors in state.items():
                    for name, value in tensors.items():
                        results[f"{key}/{case}/{when}/{kind}/{name}"] = value
        engine.shutdown()
        dist.barrier()


@torch.no_grad()
def recomputed_loss(engine, batch: list[dict], global_loss_mask: float) -> float:
    """The step's loss as the engines logged it while they read every micro-batch's loss on the host: each
    micro-batch of this rank through the model before the step (with its labels), its masked fp32 loss sum
    read as a float, summed in float64 over the micro-batches and then over the DP ranks, divided by the
    global batch's loss-mask sum."""
    local = 0.0
    for mb in batch:
        inputs, attention = model_inputs(mb, True, engine.packs_sequences)
        with token_labels(inputs["token_labels"]):
            per_token = engine.model(inputs["tokens"], inputs["position_ids"], labels=inputs["targets"], **attention)
        local += float((per_token.reshape(mb["tokens"].shape).float() * mb["loss_mask"]).sum())
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (engine.dp_rank, ps.get_tensor_model_parallel_rank(), local))
    per_dp = {dp: value for dp, tp, value in shares if tp == 0}
    return sum(per_dp[r] for r in range(engine.dp_size)) / global_loss_mask


def full_state(engine: DeepSpeedEngine) -> dict[str, dict[str, torch.Tensor]]:
    """fp32 params and Adam moments in global space, through DeepSpeed's gather helpers (and, in bf16, the
    model's bf16 params as `model`)."""
    out = {"model": gather_global(engine.model)} if engine.cfg.train.bf16 else {}
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        local = {}
        for name, param in engine.named.items():
            full = safe_get_full_fp32_param(param) if kind == "param" else safe_get_full_optimizer_state(param, kind)
            local[name] = full.detach().reshape(engine.model_shape[name]).clone()
        out[kind] = gather_global(engine.model, local)
    return out


def check_layout(engine: DeepSpeedEngine) -> float:
    """Max |local flat partition - DeepSpeed's full tensors laid out by the engine's mapping|."""
    worst = 0.0
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        def values(param, numel, kind=kind):
            if kind == "param":
                return safe_get_full_fp32_param(param).reshape(-1)
            return safe_get_full_optimizer_state(param, kind).reshape(-1)

        valid = layout_partitions(engine.engine, lambda p, n: torch.ones(n), torch.bool, fill=False)
        for (fp32, laid), (_, ok) in zip(layout_partitions(engine.engine, values, torch.float32), valid):
            actual = fp32.detach() if kind == "param" else engine.optimizer.state[fp32][kind]
            diff = (actual.float().cpu()[ok] - laid[ok]).abs()
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
            if not bool(ok.any()):
                raise AssertionError("a partition with no parameter elements")
    return worst


def load_recording(engine: DeepSpeedEngine, path: Path) -> list[bool]:
    """engine.load(path), recording the weights_only flag of every torch.load it makes."""
    flags: list[bool] = []
    torch_load = torch.load

    def recording_load(*args, **kwargs):
        flags.append(bool(kwargs.get("weights_only", False)))
        return torch_load(*args, **kwargs)

    torch.load = recording_load
    try:
        engine.load(str(path))
    finally:
        torch.load = torch_load
    return flags


def main(out_dir: str) -> None:
    rank = dist.get_rank()
    results: dict = {}
    for key, stage, tp, offload, zero in LAYOUTS + BF16_LAYOUTS:
        start = time.time()
        bf16 = any(key == layout[0] for layout in BF16_LAYOUTS)
        engine = build_engine(out_dir, key, stage, tp, zero, offload, bf16)
        results[f"{key}/regions"] = region_masks(engine)
        results[f"{key}/model_bf16"] = torch.tensor(all(p.dtype == torch.bfloat16 for p in engine.model.parameters()))
        dp_rank, dp_size = engine.dp_rank, engine.dp_size
        losses, norms, states, recomputed = [], [], {}, []
        ckpt = Path(out_dir) / f"ckpt_{key}"
        for step, kind in enumerate(SCHEDULE, start=1):
            batch = global_batch(step, kind)
            per_rank = len(batch) // dp_size
            if step == 4:
                states["before_forget"] = full_state(engine)
                engine.save(str(ckpt))
                sched = engine.scheduler_state()
            if step == 5:
                states["before_retain"] = full_state(engine)
            mine = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
            if key in RECOMPUTED:
                recomputed.append(recomputed_loss(engine, mine, sum(float(mb["loss_mask"].sum()) for mb in batch)))
            metrics = engine.train_step(mine)
            losses.append(metrics["loss"])
            norms.append(metrics["grad_norm"])
            results[f"{key}/gated/{step}"] = torch.tensor([metrics["gated_retain"], metrics["gated_forget"]])
            if step == 1:
                results[f"{key}/layout_err"] = torch.tensor(check_layout(engine))
        states["after_retain"] = full_state(engine)
        results[f"{key}/layout_err_end"] = torch.tensor(check_layout(engine))
        results[f"{key}/sgtm_steps"] = torch.tensor([g["sgtm_steps"] for g in engine.optimizer.param_groups])
        results[f"{key}/gated_elements"] = torch.tensor(engine.optimizer.gated_elements)
        results[f"{key}/losses"] = torch.tensor(losses, dtype=torch.float64)
        results[f"{key}/grad_norms"] = torch.tensor(norms, dtype=torch.float64)
        if key in RECOMPUTED:
            results[f"{key}/recomputed_losses"] = torch.tensor(recomputed, dtype=torch.float64)
        # evaluation of the live and ablated model; the live model must come back intact
        eval_batch = global_batch(99, "mixed")
        per_rank = len(eval_batch) // dp_size
        mine = eval_batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        live = engine.evaluate(mine, ablate=False)
        abl = engine.evaluate(mine, ablate=True)
        again = engine.evaluate(mine, ablate=False)
        results[f"{key}/eval"] = torch.tensor([live[0] / live[1], abl[0] / abl[1], again[0] / again[1]],
                                              dtype=torch.float64)
        # resume: load the step-3 checkpoint into this engine and replay steps 4-5
        results[f"{key}/weights_only_loads"] = torch.tensor(load_recording(engine, ckpt), dtype=torch.bool)
        engine.load_scheduler_state(sched)
        replay = []
        for step in (4, 5):
            batch = global_batch(step, SCHEDULE[step - 1])
            per_rank = len(batch) // dp_size
            replay.append(engine.train_step(batch[dp_rank * per_rank:(dp_rank + 1) * per_rank])["loss"])
        results[f"{key}/replay_losses"] = torch.tensor(replay, dtype=torch.float64)
        replayed = full_state(engine)
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            for name, value in states["after_retain"][kind].items():
                results[f"{key}/replay_diff/{kind}/{name}"] = (replayed[kind][name] - value).abs().max()
        for when, state in states.items():
            for kind, tensors in state.items():
                for name, value in tensors.items():
                    results[f"{key}/{when}/{kind}/{name}"] = value
        partitions = layout_partitions(engine.engine, lambda p, n: torch.ones(n), torch.bool)
        results[f"{key}/fp32_partitions"] = torch.tensor(len(partitions))
        results[f"{key}/time_s"] = torch.tensor(time.time() - start)
        engine.shutdown()
        dist.barrier()
    rank_mixes(out_dir, results)
    # the megatron engine (DistributedOptimizer) on the same batches, for cross-engine agreement
    torch.manual_seed(1234)
    cfg = make_cfg(1, 1, None)
    cfg.parallel.engine = "megatron"
    engine = MegatronEngine(cfg, cfg.sgtm.resolve(MODEL.dims()), on_gpu=False)
    losses, norms, recomputed = [], [], []
    for step, kind in enumerate(SCHEDULE, start=1):
        batch = global_batch(step, kind)
        per_rank = len(batch) // engine.dp_size
        mine = batch[engine.dp_rank * per_rank:(engine.dp_rank + 1) * per_rank]
        recomputed.append(recomputed_loss(engine, mine, sum(float(mb["loss_mask"].sum()) for mb in batch)))
        metrics = engine.train_step(mine)
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    results["megatron/losses"] = torch.tensor(losses, dtype=torch.float64)
    results["megatron/recomputed_losses"] = torch.tensor(recomputed, dtype=torch.float64)
    results["megatron/grad_norms"] = torch.tensor(norms, dtype=torch.float64)
    for name, value in gather_global(engine.model).items():
        results[f"megatron/after_retain/param/{name}"] = value
    engine.shutdown()
    if rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
