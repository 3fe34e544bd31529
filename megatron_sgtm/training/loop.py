"""The training loop, from config to a finished (and evaluated) run.

data (corpus -> labels -> filter -> sampler) -> engine (model, optimizer, gating) -> steps,
with evaluation of the live and ablated model, checkpoints and logging at their intervals.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_sgtm.core.labels import TokenLabel
from megatron_sgtm.data.corpus import Corpus, heldout_split, load_corpus
from megatron_sgtm.data.labeling import label_corpus
from megatron_sgtm.data.sampler import SGTMSampler, eval_batches, mixture_pools
from megatron_sgtm.errors import UserError
from megatron_sgtm.training import checkpoint
from megatron_sgtm.training.calibration import Settings, calibrated
from megatron_sgtm.training.config import ConfigError, TrainConfig, mixture_groups, validate
from megatron_sgtm.training.distributed import init_distributed, world_size_from_env
from megatron_sgtm.training.engine import Engine
from megatron_sgtm.training.logging import RunLogger

_KEEP_FORGET_SEED = 12  # the random stream of data.forget_keep_fraction (train.seed first)


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (a non-finite loss); one line naming the step, for the CLI to print."""

    exit_status = 1  # not bad input: the run itself failed


@dataclass
class RunData:
    corpus: Corpus
    doc_labels: np.ndarray
    train_docs: np.ndarray
    heldout_docs: np.ndarray


def load_data(cfg: TrainConfig) -> RunData:
    d = cfg.data
    corpus = load_corpus(Path(d.path), require_scores=d.labeling.score_source == "tagged",
                         skip_bad_shards=d.skip_bad_shards)
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's tokenizer "
                         f"({corpus.vocab_size} tokens, {d.path})")
    doc_labels = label_corpus(corpus, d.labeling)
    train_docs, heldout_docs = heldout_split(corpus, d.heldout_fraction, seed=cfg.train.seed)
    return RunData(corpus, doc_labels, _filter(cfg, corpus, doc_labels, train_docs), heldout_docs)


def _keep_forget(cfg: TrainConfig, corpus: Corpus, docs: np.ndarray) -> np.ndarray:
    """`docs` less a seeded share 1 - data.forget_keep_fraction of its ground-truth forget documents (all kept at
    1.0), in their order: the leakage grid varies how many forget tokens a run sees."""
    fraction = cfg.data.forget_keep_fraction
    if fraction >= 1.0:
        return docs
    forget = docs[corpus.category_mask(cfg.data.labeling.forget_categories)[docs]]
    order = np.random.default_rng([cfg.train.seed, _KEEP_FORGET_SEED]).permutation(len(forget))
    dropped = forget[order[round(len(forget) * fraction):]]
    return docs[~np.isin(docs, dropped)]


def _filter(cfg: TrainConfig, corpus: Corpus, doc_labels: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The training documents a run keeps: `data.forget_keep_fraction` of the forget ones, then each data-filtering
    baseline's choice."""
    docs = _keep_forget(cfg, corpus, docs)
    kind = cfg.data_filter
    if kind == "none":
        return docs
    if kind == "oracle":  # perfect filter: the ground truth, not the classifier
        drop = corpus.category_mask(cfg.data.labeling.forget_categories)
    else:
        drop = doc_labels == TokenLabel.FORGET
        if kind == "strict":
            drop = drop | corpus.category_mask(cfg.data.adjacent_categories)
    return docs[~drop[docs]]


TOKEN_GROUPS = ("forget", "forget_undiscovered", "forget_labelled", "retain", "adjacent", "total")


class TokenCounts:
    """Tokens the run trained on per document group (summary.json's ``train_tokens``), counted exactly: each step's
    loss-bearing positions (``loss_mask > 0``) by the document they belong to (``doc_ids``). ``forget`` is the
    ground-truth forget categories, ``forget_undiscovered`` / ``forget_labelled`` those of its documents labelled
    U / F; ``retain`` and ``adjacent`` their categories; ``total`` every one. Each rank counts the micro-batches it
    trains on; `totals` sums them over the data-parallel group (the other ranks of a DP rank hold the same ones)."""

    def __init__(self, cfg: TrainConfig, data: RunData, saved: dict | None = None):
        corpus, labels = data.corpus, data.doc_labels
        forget = corpus.category_mask(cfg.data.labeling.forget_categories)
        members = (forget, forget & (labels == TokenLabel.UNLABELED), forget & (labels == TokenLabel.FORGET),
                   corpus.category_mask(cfg.data.retain_categories), corpus.category_mask(cfg.data.adjacent_categories),
                   np.ones(corpus.num_docs, dtype=bool))
        self._flags = sum(m.astype(np.uint8) << i for i, m in enumerate(members))  # bit i: the document is in group i
        self._bits = np.uint8(1) << np.arange(len(TOKEN_GROUPS), dtype=np.uint8)
        self._saved = np.array([(saved or {}).get(g, 0) for g in TOKEN_GROUPS], dtype=np.int64)  # before a resume
        self._local = np.zeros(len(TOKEN_GROUPS), dtype=np.int64)

    def add(self, batches: list[dict]) -> None:
        for mb in batches:
            flags = self._flags[mb["doc_ids"][mb["loss_mask"] > 0].numpy()]
            self._local += ((flags[:, None] & self._bits) != 0).sum(0)

    def local(self) -> dict[str, int]:
        """This rank's counts since the run (or its resume) started."""
        return dict(zip(TOKEN_GROUPS, self._local.tolist()))

    def totals(self, engine: Engine) -> dict[str, int]:
        """Collective over the data-parallel group: the run's counts so far, checkpoints it resumed from included."""
        counts = torch.from_numpy(self._local.copy())
        dist.all_reduce(counts, group=engine.dp_group)
        return dict(zip(TOKEN_GROUPS, (self._saved + counts.numpy()).tolist()))


def _any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one: ranks take the same branch."""
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class _Signals:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask for a checkpoint and exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.requested = True

    def any_rank(self) -> bool:
        return _any_rank(self.requested)


def _non_finite(cfg: TrainConfig, metrics: dict) -> bool:
    """A NaN/inf loss, or grad norm (the engines compute it only when they clip: optim.clip_grad > 0)."""
    return not math.isfinite(metrics["loss"]) or (cfg.optim.clip_grad > 0 and not math.isfinite(metrics["grad_norm"]))


def _make_engine(cfg: TrainConfig, on_gpu: bool) -> Engine:
    partition = cfg.sgtm.resolve(cfg.model.dims())
    if cfg.parallel.engine == "deepspeed":
        from megatron_sgtm.training.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, partition, on_gpu)
    from megatron_sgtm.training.engine_megatron import MegatronEngine

    return MegatronEngine(cfg, partition, on_gpu)


def _batches(cfg: TrainConfig, engine: Engine, data: RunData, docs: np.ndarray) -> list[dict]:
    """This rank's share of the first `train.eval_batches` micro-batches over `docs` (the same
    sequences at every layout), the same count on every rank."""
    stream = eval_batches(data.corpus, docs, data.doc_labels, seq_length=cfg.model.seq_length,
                          micro_batch_size=cfg.optim.micro_batch_size, dp_rank=engine.dp_rank,
                          dp_size=engine.dp_size)
    per_rank = cfg.train.eval_batches // engine.dp_size if cfg.train.eval_batches else 10**9
    batches = [b for _, b in zip(range(per_rank), stream)]
    count = torch.tensor([len(batches)])
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    return batches[: int(count)]


def evaluation_groups(cfg: TrainConfig) -> dict[str, tuple[str, ...]]:
    """The categories of each reported group."""
    return {"forget": tuple(cfg.data.labeling.forget_categories), "retain": tuple(cfg.data.retain_categories),
            "adjacent": tuple(cfg.data.adjacent_categories)}


def calibration_batches(cfg: TrainConfig, engine: Engine, data: RunData) -> dict[str, list[dict]]:
    """This rank's share of `train.eval_batches` micro-batches of each group's training (not held-out)
    documents, before any data filter: what the calibration fits on, whatever the method trained on."""
    training = np.setdiff1d(np.arange(data.corpus.num_docs), data.heldout_docs)
    return {name: _batches(cfg, engine, data, training[data.corpus.category_mask(cats)[training]])
            for name, cats in evaluation_groups(cfg).items()}


def evaluate(engine: Engine, cfg: TrainConfig, data: RunData) -> dict[str, float]:
    """Per-category held-out loss of the live model and of its ablated copy (and, with
    `train.calibrate_ablated`, of the ablated copy with the paper's calibrated output bias; a method without
    a partition, a filter, calibrates its live model)."""
    held_out = {name: _batches(cfg, engine, data, data.heldout_docs[data.corpus.category_mask(c)[data.heldout_docs]])
                for name, c in evaluation_groups(cfg).items()}
    held_out = {name: batches for name, batches in held_out.items() if batches}
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


def _sampler(cfg: TrainConfig, data: RunData, dp_rank: int, dp_size: int) -> SGTMSampler:
    return SGTMSampler(
        data.corpus, data.doc_labels, seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.optim.micro_batch_size, global_batch_size=cfg.optim.global_batch_size,
        dp_rank=dp_rank, dp_size=dp_size, seed=cfg.train.seed, mode=cfg.data.mode, documents=data.train_docs,
        mixture=mixture_pools(data.corpus, data.train_docs, mixture_groups(cfg), cfg.data.mixture)
        if cfg.data.mixture else None,
    )


def check_resumable(cfg: TrainConfig, data: RunData, path: Path, world: int) -> None:
    """Refuse, before anything expensive is built, a checkpoint this run cannot continue: another global
    stream (global batch size, data, labels, seed) or, with DeepSpeed, another data-parallel layout.
    The megatron engine resumes at any TP x PP x DP (its distributed checkpoint reshards)."""
    meta = json.loads((path / checkpoint.META).read_text())
    par = cfg.parallel
    dp_size = world // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size)
    try:
        _sampler(cfg, data, 0, dp_size).check_resumable(meta["sampler"])
    except ValueError as err:
        raise checkpoint.CheckpointError(f"{path}: {err}") from None
    if par.engine == "deepspeed":
        from megatron_sgtm.training.engine_deepspeed import check_resume_layout

        check_resume_layout(path, meta, dp_size, par.tensor_model_parallel_size)


def train(cfg: TrainConfig) -> dict:
    """Run one training job (collective over the whole world); returns the final metrics."""
    validate(cfg, world_size_from_env())  # before any distributed work
    rank, world, on_gpu = init_distributed()
    torch.manual_seed(cfg.train.seed)
    data = load_data(cfg)
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, root)
    if resume_from is not None:
        check_resumable(cfg, data, resume_from, world)  # before the model is built
    engine = _make_engine(cfg, on_gpu)
    log = RunLogger(cfg, rank, world)
    sampler = _sampler(cfg, data, engine.dp_rank, engine.dp_size)
    step, gated, saved_tokens = 0, {"retain": 0, "forget": 0}, None
    identity = checkpoint.run_identity(cfg, engine.partition)  # what a resume of this run's checkpoints must share
    if resume_from is not None:
        meta = checkpoint.load(engine, resume_from, verify=cfg.checkpoint.verify, identity=identity)
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

    def save() -> None:
        meta = {"gated": gated, "sampler": sampler.state_dict(), "scheduler": engine.scheduler_state(),
                "partition": engine.partition.to_dict(), "method": cfg.method, "config": cfg.to_dict(),
                "engine": engine.name, "identity": identity, "train_tokens": tokens.totals(engine),
                checkpoint.WANDB_RUN_ID: log.wandb_id}
        path = checkpoint.save(engine, root, step, meta, cfg.checkpoint.keep_last)
        log.console(f"saved checkpoint {path}")

    losses: list[float] = []
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
        if signals.any_rank():
            if root and not bad_steps:
                save()
            log.console(f"stopping at step {step} on a signal")
            break
    final = {"step": step, "train_losses": losses, "gated": gated, "train_tokens": tokens.totals(engine)}
    if step >= total:
        if root and not bad_steps and not (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0):
            save()
        final.update(evaluate(engine, cfg, data))
        log.evaluation(step, evaluation_metrics(final))
        log.summary({k: v for k, v in final.items() if k != "train_losses"} | {
            "method": cfg.method, "time_s": time.time() - log.start})
    log.close()
    engine.shutdown()
    return final
