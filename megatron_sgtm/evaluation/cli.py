"""`megatron-sgtm eval --checkpoint PATH --data SHARDS --out DIR`: the paper's measurements on any checkpoint.

PATH: a training checkpoint (either engine, any layout), a model-only checkpoint (`ablate`, `import-hf`) or an
HF directory `export-hf` wrote. The model runs in the megatron engine at the TP/PP the flags give, in one
process or under torchrun/srun. Per category of the held-out split (recomputed as training did) or of every
document of --eval-data: mean token loss and bits per byte of the live, ablated and calibrated model, per-token
loss quantiles and histograms; with --grad-norms the relative gradient norms of Θ_F and Θ_R per document; with
--lm-eval, lm-evaluation-harness tasks (generated from the same held-out documents, and the user's) on HF exports
of the live and ablated model. DIR (eval.json, report.md, PNGs) appears only when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megatron_sgtm.errors import UserError

if TYPE_CHECKING:
    from megatron_sgtm.evaluation.downstream import LmEvalSettings

CALIBRATION_FLAGS = {"calibration_steps": int, "calibration_alpha": float, "calibration_beta": float,
                     "calibration_lr": float}


def eval_config(source, args: argparse.Namespace, world: int, run_dir: Path):
    """The checkpoint's training config with this evaluation's data, layout and settings (train_steps 0)."""
    from megatron_sgtm.core.strategy import METHODS
    from megatron_sgtm.training.config import from_dict

    raw = copy.deepcopy(source.config)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    dp = max(world // (tp * pp), 1)
    raw["method"] = source.method if source.method in METHODS else "none"
    raw["data"] = {**raw.get("data", {}), "path": str(args.data)}
    raw["parallel"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    optim = raw.setdefault("optim", {})
    optim["global_batch_size"] = optim.get("micro_batch_size", 2) * dp
    train = raw.setdefault("train", {})
    train.update(train_steps=0, eval_interval=0, calibrate_ablated=True)
    if args.eval_batches is not None:
        train["eval_batches"] = args.eval_batches
    train.update({k: getattr(args, k) for k in CALIBRATION_FLAGS if getattr(args, k) is not None})
    raw["checkpoint"] = {}
    raw["logging"] = {**raw.get("logging", {}), "run_dir": str(run_dir), "wandb_mode": args.wandb_mode}
    return from_dict(raw, source=f"--checkpoint {source.path}")


def _evaluated_data(cfg, args: argparse.Namespace, data):
    """The documents measured: the held-out split of the training data, or every document of --eval-data."""
    from megatron_sgtm.data.corpus import load_corpus
    from megatron_sgtm.data.labeling import label_corpus
    from megatron_sgtm.training.run_data import RunData

    if not args.eval_data:
        return data
    corpus = load_corpus(Path(args.eval_data), require_scores=cfg.data.labeling.score_source == "tagged")
    return RunData(corpus, label_corpus(corpus, cfg.data.labeling), np.zeros(0, np.int64),
                   np.arange(corpus.num_docs))


def add_lm_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--lm-eval*`` flags."""
    from megatron_sgtm.evaluation.downstream import DEFAULT_ITEMS

    group = parser.add_argument_group("downstream tasks (lm-evaluation-harness, offline)")
    group.add_argument("--lm-eval", action="store_true",
                       help="also run lm-eval's hf backend on HF exports: cloze and perplexity tasks generated "
                            "from held-out documents of each category, plus any --lm-eval-tasks")
    group.add_argument("--lm-eval-tasks", nargs="+", type=Path, default=[], metavar="PATH",
                       help="local lm-eval task YAMLs or directories of them (their data files local too)")
    group.add_argument("--lm-eval-limit", type=int, default=None, metavar="N",
                       help="evaluate at most N items of each task (default: all)")
    group.add_argument("--lm-eval-items", type=int, default=DEFAULT_ITEMS, metavar="N",
                       help=f"documents per category in the generated tasks (default {DEFAULT_ITEMS})")
    group.add_argument("--lm-eval-batch-size", type=int, default=8, metavar="N", help="lm-eval batch size")
    group.add_argument("--lm-eval-device", default="cpu", help="torch device for lm-eval (default cpu)")


def lm_eval_settings(args: argparse.Namespace) -> LmEvalSettings | None:
    """The `downstream.LmEvalSettings` the --lm-eval* flags ask for; None without --lm-eval."""
    from megatron_sgtm.errors import check_positive
    from megatron_sgtm.evaluation.downstream import LmEvalSettings

    if not args.lm_eval:
        if args.lm_eval_tasks:
            raise UserError("--lm-eval-tasks needs --lm-eval")
        return None
    check_positive(args, ("lm_eval_limit", "lm_eval_items", "lm_eval_batch_size"))
    return LmEvalSettings(tasks=tuple(args.lm_eval_tasks), limit=args.lm_eval_limit, items=args.lm_eval_items,
                          batch_size=args.lm_eval_batch_size, device=args.lm_eval_device)


def _downstream(settings: LmEvalSettings, source, evaluated, tokenizer: Path, work: Path, cfg) -> dict:
    """--lm-eval: the live (and, with an active partition, ablated) model as HF exports, through lm-eval."""
    import tempfile

    from megatron_sgtm.evaluation import downstream, measure

    docs = downstream.heldout_by_category(evaluated.corpus, evaluated.heldout_docs)
    with tempfile.TemporaryDirectory(dir=work) as exports:
        if source.kind == "hf":
            hf_dirs = {"ablated" if source.ablated else "live": source.path}
        else:
            measure.say("exporting to Hugging Face format for lm-eval")
            hf_dirs = downstream.export_models(source.path, Path(exports) / "hf", tokenizer)
        return downstream.evaluate_exports(hf_dirs, evaluated.corpus, docs, tokenizer, work / "downstream", settings,
                                           seed=cfg.train.seed, context_length=cfg.model.seq_length)


def main(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_sgtm.atomic import building
    from megatron_sgtm.data.shards import Manifest
    from megatron_sgtm.evaluation import measure, report
    from megatron_sgtm.export.source import check_tokenizer, open_source
    from megatron_sgtm.training.config import validate
    from megatron_sgtm.training.distributed import init_distributed
    from megatron_sgtm.training.engine_megatron import MegatronEngine
    from megatron_sgtm.training.logging import RunLogger
    from megatron_sgtm.training.run_data import load_data

    start = time.time()
    out = Path(args.out)
    if out.exists():
        raise UserError(f"--out {out}: already exists (choose a new directory)")
    lm_eval = lm_eval_settings(args)
    rank, world, on_gpu = init_distributed()
    if args.lm_eval and world != 1:
        raise UserError("--lm-eval: run eval as a single process (lm-eval's hf backend evaluates HF exports in one "
                        "process); drop --lm-eval under torchrun/srun")
    source = open_source(Path(args.checkpoint), world)
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path and not (Path(path) / "manifest.json").is_file():
            raise UserError(f"{flag} {path}: no manifest.json there (not a shard directory)")
        if path:
            check_tokenizer(source, Path(path))
    with building(out) if rank == 0 else contextlib.nullcontext(out) as work:
        cfg = eval_config(source, args, world, work)
        validate(cfg, world)
        partition = cfg.sgtm.resolve(cfg.model.dims())
        active = partition is not None and partition.active
        if args.ablate and not active:
            raise UserError(f"--ablate: {source.path} has no active SGTM partition (method {cfg.method}), so "
                            "there is nothing to ablate")
        data = load_data(cfg)
        evaluated = _evaluated_data(cfg, args, data)
        categories = args.categories.split(",") if args.categories else None
        missing = [c for c in categories or [] if c not in evaluated.corpus.category_names]
        if missing:
            raise UserError(f"--categories: {missing} not among the categories of the evaluated data "
                            f"({evaluated.corpus.category_names})")
        weights = source.global_weights()
        if ps.model_parallel_is_initialized():  # a DeepSpeed checkpoint was read at TP=1, PP=1
            ps.destroy_model_parallel()
        engine = MegatronEngine(cfg, partition, on_gpu, weights=weights)
        if weights is None:
            engine.load_weights(str(source.path))
        log = RunLogger(cfg, rank, world)
        log.start_wandb()
        par = cfg.parallel
        measure.say(f"{source.kind} checkpoint {source.path} (method {cfg.method}) at TP="
                    f"{par.tensor_model_parallel_size} PP={par.pipeline_model_parallel_size} DP={engine.dp_size}")
        groups = measure.heldout_groups(cfg, engine, evaluated, categories)
        per_token_bytes = measure.token_bytes(Path(args.data) / Manifest.read(Path(args.data)).tokenizer)
        results, values, history = measure.losses(engine, cfg, data, groups, per_token_bytes, ablate=active,
                                                  calibrate=not args.no_calibration)
        result = {
            "checkpoint": str(source.path), "kind": source.kind, "method": cfg.method, "step": source.step,
            "already_ablated": source.ablated, "data": str(args.data), "eval_data": args.eval_data,
            "documents": "every document of --eval-data" if args.eval_data else
            f"held-out split ({cfg.data.heldout_fraction} of the data, seed {cfg.train.seed})",
            "layout": {"tp": cfg.parallel.tensor_model_parallel_size, "pp": cfg.parallel.pipeline_model_parallel_size,
                       "dp": engine.dp_size},
            "eval_batches": cfg.train.eval_batches, "categories": results,
        }
        if history:
            of = "ablated" if active else "live"
            result["calibration"] = {
                "of": of, "steps": cfg.train.calibration_steps, "lr": cfg.train.calibration_lr,
                "alpha": cfg.train.calibration_alpha, "beta": cfg.train.calibration_beta,
                "objective_start": history[0], "objective_end": history[-1],
                "effect": {g: {"before": r[of]["loss"], "after": r["calibrated"]["loss"],
                               "change": r["calibrated"]["loss"] - r[of]["loss"],
                               "bits_per_byte_change": r["calibrated"]["bits_per_byte"] - r[of]["bits_per_byte"]}
                           for g, r in results.items()},
            }
        absorption = None
        if args.grad_norms:
            absorption = measure.absorption(engine, cfg, evaluated, args.grad_norm_docs)
            result["absorption"] = {
                "per_document": absorption,
                "medians": {g: {"documents": len(v["forget"]), "forget": float(np.median(v["forget"])),
                                "retain": float(np.median(v["retain"]))} for g, v in absorption.items() if v["forget"]},
            }
        result["wall_time_s"] = time.time() - start
        log.evaluation(source.step or 0, {f"{g}/{m}_{k}": r[m][k] for g, r in results.items()
                                          for m in measure.MODELS if m in r for k in ("loss", "bits_per_byte")})
        log.close()
        engine.shutdown()
        tokenizer = Path(args.eval_data or args.data) / Manifest.read(Path(args.eval_data or args.data)).tokenizer
        if lm_eval is not None and rank == 0:
            result["lm_eval"] = _downstream(lm_eval, source, evaluated, tokenizer, work, cfg)
        if rank == 0:
            report.write(work, result, values, absorption)
        dist.barrier()
    measure.say(f"wrote {out} in {time.time() - start:.0f}s")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="per-category losses, calibration, loss distributions and absorption "
                              "of a checkpoint", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training, model-only or exported HF checkpoint")
    p.add_argument("--data", required=True, help="the training shard directory (its held-out split is evaluated; "
                   "calibration fits on its training split)")
    p.add_argument("--out", required=True, help="the new output directory")
    p.add_argument("--eval-data", help="evaluate every document of this shard directory instead")
    p.add_argument("--categories", help="comma-separated data categories to report besides forget/retain/adjacent "
                   "(default: every other category of the data)")
    p.add_argument("--eval-batches", type=int, help="micro-batches per category (as train.eval_batches; 0 = all)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--ablate", action="store_true",
                   help="require an ablated evaluation (an error without an active partition)")
    p.add_argument("--no-calibration", action="store_true", help="skip the calibrated model")
    for key, kind in CALIBRATION_FLAGS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=kind, help=f"train.{key} (default: the checkpoint's)")
    p.add_argument("--grad-norms", action="store_true", help="absorption: relative gradient norms per document")
    p.add_argument("--grad-norm-docs", type=int, default=32, help="documents per absorption group")
    p.add_argument("--wandb-mode", choices=("disabled", "offline", "online"), default="disabled")
    add_lm_eval_arguments(p)
    p.set_defaults(func=main, user_errors=(ValueError, KeyError))
