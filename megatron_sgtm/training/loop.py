"""The training loop, from config to a finished (and evaluated) run.

data (`run_data`: corpus -> labels -> filter -> sampler) -> engine (model, optimizer, gating) -> steps,
with evaluation of the live and ablated model, checkpoints and logging at their intervals.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sgtm.core.collectives import all_reduce_host
from megatron_sgtm.errors import UserError
from megatron_sgtm.training import checkpoint
from megatron_sgtm.training.calibration import Settings, calibrated
from megatron_sgtm.training.config import TrainConfig, validate
from megatron_sgtm.training.distributed import init_distributed, world_size_from_env
from megatron_sgtm.training.engine import Engine
from megatron_sgtm.training.logging import RunLogger
from megatron_sgtm.training.preflight import preflight
from megatron_sgtm.training.run_data import (
    RunData,
    TokenCounts,
    calibration_batches,
    heldout_batches,
    load_data,
    training_sampler,
)


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (a non-finite loss); one line naming the step, for the CLI to print."""

    exit_status = 1  # not bad input: the run itself failed


def _any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one: ranks take the same branch."""
    return bool(all_reduce_host(torch.tensor([1.0 if flag else 0.0]), op=dist.ReduceOp.MAX).item())


# The exit status of a run stopped by a signal after saving: sysexits.h's EX_TEMPFAIL ("temporary failure, try
# again later"), so a launcher or workflow engine sees an unfinished run (not success) that a restart continues.
STOPPED_EXIT_STATUS = 75


class _Signals:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask for a checkpoint and exit."""

    def __init__(self):
        self.received = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = signum

    def any_rank(self) -> str | None:
        """The name of a signal one of the ranks received (the same on every rank), or None."""
        value = all_reduce_host(torch.tensor([float(self.received)]), op=dist.ReduceOp.MAX)
        return signal.Signals(int(value.item())).name if value.item() else None


def _non_finite(cfg: TrainConfig, metrics: dict) -> bool:
    """A NaN/inf loss, or grad norm (the engines compute it only when they clip: optim.clip_grad > 0)."""
    return not math.isfinite(metrics["loss"]) or (cfg.optim.clip_grad > 0 and not math.isfinite(metrics["grad_norm"]))


def make_engine(cfg: TrainConfig, on_gpu: bool) -> Engine:
    """The engine `cfg.parallel.engine` names, over the partition of `cfg.sgtm` (tools/bench_train.py builds two)."""
    partition = cfg.sgtm.resolve(cfg.model.dims())
    if cfg.parallel.engine == "deepspeed":
        from megatron_sgtm.training.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, partition, on_gpu)
    from megatron_sgtm.training.engine_megatron import MegatronEngine

    return MegatronEngine(cfg, partition, on_gpu)


def evaluate(engine: Engine, cfg: TrainConfig, data: RunData) -> dict[str, float]:
    """Per-category held-out loss of the live model and of its ablated copy (and, with
    `train.calibrate_ablated`, of the ablated copy with the paper's calibrated output bias; a method without
    a partition, a filter, calibrates its live model)."""
    held_out = heldout_batches(cfg, engine, data)
    results: dict[str, float] = {}
    for name, batches in held_out.items():
        for ablate in (False, True):
            loss, tokens = engine.evaluate(batches, ablate=ablate)
            results[f"{name}_loss{'_ablated' if ablate else ''}"] = loss / max(tokens, 1.0)
    if cfg.train.calibrate_ablated:
        ablate = engine.partition is not None and engine.partition.active
        with calibrated(engine, calibration_batches(cfg, engine, data), Settings.of(cfg), ablate=ablate):
            for name, batches in held_out.items():
                loss, tokens = engine.evaluate(batches, ablate=ablate)
                results[f"{name}_loss_ablated_calibrated"] = loss / max(tokens, 1.0)
    return results


def evaluation_metrics(final: dict) -> dict[str, float]:
    """The evaluation entries (losses) of `train`'s final metrics."""
    return {k: v for k, v in final.items() if k.endswith(("_loss", "_ablated", "_calibrated", "_gap"))}


def check_resumable(cfg: TrainConfig, data: RunData, path: Path, world: int) -> None:
    """Refuse, before anything expensive is built, a checkpoint this run cannot continue: another run (method,
    engine, model, partition, tokenizer, data: `checkpoint.run_identity`, named field by field), another global
    stream (global batch size, labels, seed) or, with DeepSpeed, another data-parallel layout. The megatron
    engine resumes at any TP x PP x DP (its distributed checkpoint reshards)."""
    meta = checkpoint.read_meta(path, verify=cfg.checkpoint.verify, files=False)  # its files: resolve_resume's
    checkpoint.check_identity(path, meta, checkpoint.run_identity(cfg, cfg.sgtm.resolve(cfg.model.dims())))
    if missing := [key for key in ("step", "sampler", "scheduler", "gated") if key not in meta]:
        raise checkpoint.CheckpointError(f"{path / checkpoint.META}: no {', '.join(missing)} (not a training "
                                         "checkpoint's meta.json)")
    par = cfg.parallel
    dp_size = world // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size)
    try:
        training_sampler(cfg, data, 0, dp_size).check_resumable(meta["sampler"])
    except ValueError as err:
        raise checkpoint.CheckpointError(f"{path}: {err}") from None
    if par.engine == "deepspeed":
        from megatron_sgtm.training.engine_deepspeed import check_resume_layout

        check_resume_layout(path, meta, dp_size, par.tensor_model_parallel_size)


def train(cfg: TrainConfig) -> dict:
    """Run one training job (collective over the whole world); returns the final metrics."""
    validate(cfg, world_size_from_env())  # before any distributed work
    preflight(cfg)  # output directories, free space, data: before hours of training depend on them
    rank, world, on_gpu = init_distributed()
    torch.manual_seed(cfg.train.seed)
    data = load_data(cfg)
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, root, verify=cfg.checkpoint.verify,
                                            collective=True)
    if resume_from is not None:
        check_resumable(cfg, data, resume_from, world)  # before the model is built
    engine = make_engine(cfg, on_gpu)
    log = RunLogger(cfg, rank, world)
    sampler = training_sampler(cfg, data, engine.dp_rank, engine.dp_size)
    step, gated, saved_tokens = 0, {"retain": 0, "forget": 0}, None
    identity = checkpoint.run_identity(cfg, engine.partition)  # what a resume of this run's checkpoints must share
    if resume_from is not None:
        meta = checkpoint.load(engine, resume_from, verify=cfg.checkpoint.verify)
        step, gated, saved_tokens = meta["step"], meta["gated"], meta.get("train_tokens")  # older: none counted
        sampler.load_state_dict(meta["sampler"])
        engine.load_scheduler_state(meta["scheduler"])
        log.console(f"resumed from {resume_from} at step {step}")
        if ignored := checkpoint.ignored_changes(meta, cfg):
            log.console(f"changed since the checkpoint, ignored (the checkpoint's schedule and optimizer settings "
                        f"continue; start a new run to change them): {', '.join(ignored)}")
    elif cfg.checkpoint.resume == "auto" and (unfinished := checkpoint.incomplete_checkpoints(root)):
        log.console(f"checkpoint.resume=auto: {root} holds only incomplete checkpoints "
                    f"({', '.join(p.name for p in unfinished)}); starting from step 0")
    log.rewind(step)
    log.start_wandb(meta.get(checkpoint.WANDB_RUN_ID) if resume_from is not None else None)
    tokens = TokenCounts(cfg, data, saved_tokens)
    signals = _Signals()
    total = cfg.train.train_steps
    log.console(f"training {cfg.method} ({cfg.parallel.engine} engine, world {world}) for {total} steps")
    log.status({"state": "running", "step": step})

    def save() -> Path:
        meta = {"gated": gated, "sampler": sampler.state_dict(), "scheduler": engine.scheduler_state(),
                "partition": engine.partition.to_dict(), "method": cfg.method, "config": cfg.to_dict(),
                "engine": engine.name, "identity": identity, "train_tokens": tokens.totals(engine),
                checkpoint.WANDB_RUN_ID: log.wandb_id}
        path = checkpoint.save(engine, root, step, meta, cfg.checkpoint.keep_last)
        log.console(f"saved checkpoint {path}")
        return path

    losses: list[float] = []
    stopped: dict | None = None  # the signal and step of a stop before train.train_steps
    bad_steps = 0  # consecutive steps with a non-finite loss or grad norm: no checkpoint of such a state
    while step < total:
        batches = [next(sampler) for _ in range(sampler.num_micro_batches)]
        tokens.add(batches)
        metrics = engine.train_step(batches)
        step += 1
        gated["retain"] += int(metrics["gated_retain"])
        gated["forget"] += int(metrics["gated_forget"])
        losses.append(metrics["loss"])
        log.train_step(step, total, metrics, gated)
        bad_steps = bad_steps + 1 if _any_rank(_non_finite(cfg, metrics)) else 0
        if bad_steps >= cfg.train.max_bad_steps:
            log.close()
            raise TrainingError(
                f"step {step}: loss is {metrics['loss']} (grad norm {metrics['grad_norm']}) on {bad_steps} "
                f"consecutive step(s), train.max_bad_steps={cfg.train.max_bad_steps}; stopped without saving this "
                "state (lower optim.lr, or resume from the last checkpoint)")
        if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < total:
            log.evaluation(step, evaluate(engine, cfg, data))
        if root and not bad_steps and cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
            save()
        if step < total and (received := signals.any_rank()):  # at the last step the run finishes (exit 0)
            saved = save() if root and not bad_steps else None
            stopped = {"signal": received, "step": step, "checkpoint": str(saved) if saved else None}
            log.console(f"stopping at step {step} on a signal ({received}); exit status {STOPPED_EXIT_STATUS}")
            break
    final = {"step": step, "train_losses": losses, "gated": gated, "train_tokens": tokens.totals(engine)}
    if step >= total:
        if root and not bad_steps and not (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0):
            save()
        final.update(evaluate(engine, cfg, data))
        log.evaluation(step, evaluation_metrics(final))
        log.summary({k: v for k, v in final.items() if k != "train_losses"} | {
            "method": cfg.method, "time_s": time.time() - log.start})
        log.status({"state": "finished", "step": step})
    if stopped is not None:
        final["stopped"] = stopped
        log.status({"state": "stopped", **stopped})
    log.close()
    dist.barrier()  # no rank exits before all are done: a stopped rank's non-zero exit makes srun/torchrun end the rest
    engine.shutdown()
    return final
