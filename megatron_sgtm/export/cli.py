"""`megatron-sgtm ablate | export-hf | inspect | import-hf`: native checkpoints and Hugging Face models.

- ``ablate --checkpoint IN --out OUT``: Θ_F zeroed, as a model-only checkpoint marked ablated.
- ``export-hf --checkpoint IN --out DIR [--ablate] [--prune] [--dtype bf16|fp32] [--release]``: an HF
  model directory; ``--release`` writes DIR/capable (as trained) and DIR/safe (ablated, or pruned with
  ``--prune``) with DIR/manifest.json saying what was removed.
- ``inspect --checkpoint IN``: layout, step, partition, ablated or not, parameter counts by region.
- ``import-hf --hf DIR --out OUT [--config cfg.yaml]``: an HF directory as a model-only checkpoint for
  ``train`` (``checkpoint.pretrained=OUT``); ``--config`` supplies the SGTM partition.
All run as one CPU process and read checkpoints of any engine and TP/PP/DP layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# What the checkpoint and HF readers raise for a bad input directory (besides CheckpointError and OSError).
READER_ERRORS = (ValueError, KeyError)


def _checkpoint(args: argparse.Namespace) -> Path:
    from megatron_sgtm.training.checkpoint import resolve_checkpoint

    return resolve_checkpoint(Path(args.checkpoint))


def export_hf(args: argparse.Namespace) -> None:
    from megatron_sgtm.export import writers

    writers.export_hf(_checkpoint(args), Path(args.out), ablate=args.ablate, prune=args.prune, dtype=args.dtype,
                      release=args.release, tokenizer=Path(args.tokenizer) if args.tokenizer else None)


def ablate(args: argparse.Namespace) -> None:
    from megatron_sgtm.export.native import load_native
    from megatron_sgtm.export.writers import ExportError, write_model_only_copy

    ckpt = load_native(_checkpoint(args))
    if ckpt.partition is None or not ckpt.partition.active:
        raise ExportError(f"{ckpt.path}: no active SGTM partition in its meta.json, so there is nothing to ablate")
    zeroed = write_model_only_copy(ckpt, Path(args.out), ablate=True)
    print(f"wrote {args.out} ({zeroed:,} forget parameters zeroed)", file=sys.stderr)


def inspect(args: argparse.Namespace) -> None:
    from megatron_sgtm.export.native import read_model_meta
    from megatron_sgtm.export.prune import summarize

    path = _checkpoint(args)
    meta, model, partition = read_model_meta(path)
    summary = summarize(model, partition)
    par = meta.get("config", {}).get("parallel", {})
    tp, pp = par.get("tensor_model_parallel_size", 1), par.get("pipeline_model_parallel_size", 1)
    world = meta.get("world_size")
    layout = {"engine": meta["engine"]}
    if meta["engine"] != "model-only":
        layout.update(tensor_model_parallel=tp, pipeline_model_parallel=pp, world_size=world,
                      data_parallel=world // (tp * pp) if world else None)
        if meta["engine"] == "deepspeed":
            layout["zero_stage"] = par.get("zero_stage")
    report = {"checkpoint": str(path), "layout": layout, "step": meta.get("step"), "method": meta.get("method"),
              "ablated": bool(meta.get("ablated", False)), "model": dataclasses.asdict(model), **summary}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    counts = summary["params"]
    lines = [
        f"checkpoint  {path}",
        "layout      " + " ".join(f"{k}={v}" for k, v in layout.items()),
        f"step        {report['step']}    method {report['method']}    ablated {'yes' if report['ablated'] else 'no'}",
        f"model       {model.arch}: {model.num_layers} layers, hidden {model.hidden_size}, "
        f"{model.num_attention_heads} heads / {model.num_query_groups} groups, ffn {model.ffn_hidden_size}, "
        f"vocab {model.vocab_size}",
    ]
    if partition is not None:
        lines.append(f"partition   {partition.strategy}: layers {list(partition.masked_layers)}, forget heads "
                     f"{list(partition.forget_heads)}, forget units {len(partition.forget_units)} "
                     f"({_ranges(partition.forget_units)}), mask_embeddings {partition.mask_embeddings}")
    lines.append(f"parameters  {counts['total']:,} total: forget {counts['forget']:,}, retain {counts['retain']:,}, "
                 f"joint {counts['joint']:,}")
    print("\n".join(lines))


def _ranges(indices) -> str:
    indices = sorted(indices)
    spans, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            spans.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(spans)


def import_hf(args: argparse.Namespace) -> None:
    from megatron_sgtm.export.hf import from_hf, read_hf_dir
    from megatron_sgtm.training.checkpoint import write_model_only

    config, hf_state = read_hf_dir(Path(args.hf))
    model, state = from_hf(hf_state, config)
    meta: dict = {"config": {"model": dataclasses.asdict(model)}, "partition": None, "method": "none", "step": 0,
                  "source": str(args.hf)}
    if args.config:
        from megatron_sgtm.training.config import load_config

        cfg = load_config(args.config, [])
        if cfg.model.dims() != model.dims() or cfg.model.vocab_size != model.vocab_size:
            raise ValueError(f"--config {args.config}: its model ({cfg.model}) is not the imported one ({model})")
        partition = cfg.sgtm.resolve(model.dims())
        meta.update(config={**cfg.to_dict(), "model": dataclasses.asdict(model)}, partition=partition.to_dict(),
                    method=cfg.method)
    files = [f for f in [Path(args.hf) / "tokenizer.json"] if f.is_file()]
    write_model_only(Path(args.out), state, meta, files)
    print(f"wrote {args.out}", file=sys.stderr)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ablate", help="zero the forget parameters of a checkpoint (model-only output)")
    p.add_argument("--checkpoint", required=True, help="a training or model-only checkpoint directory")
    p.add_argument("--out", required=True, help="the new model-only checkpoint directory")
    p.set_defaults(func=ablate, user_errors=READER_ERRORS)

    p = subparsers.add_parser("export-hf", help="write a Hugging Face model directory from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a training or model-only checkpoint directory")
    p.add_argument("--out", required=True, help="the new HF directory (appears only when complete)")
    p.add_argument("--ablate", action="store_true", help="zero the forget parameters first")
    p.add_argument("--prune", action="store_true", help="remove the forget heads and MLP units (a smaller model)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--release", action="store_true",
                   help="write OUT/capable and OUT/safe (ablated, or pruned with --prune) and OUT/manifest.json")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's, else its training data's)")
    p.set_defaults(func=export_hf, user_errors=READER_ERRORS)

    p = subparsers.add_parser("inspect", help="layout, step, partition and parameter counts of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=inspect, user_errors=READER_ERRORS)

    p = subparsers.add_parser("import-hf", help="an HF model directory as a model-only checkpoint")
    p.add_argument("--hf", required=True, help="a local HF directory (safetensors)")
    p.add_argument("--out", required=True, help="the new model-only checkpoint directory")
    p.add_argument("--config", help="a training config whose sgtm section gives the partition")
    p.set_defaults(func=import_hf, user_errors=READER_ERRORS)
