"""What the exporters write from a native checkpoint (any engine and layout, read in one CPU process): HF model
directories (one, or a release's capable and safe pair) and model-only copies, ablated or not.

`export-hf` and `ablate` (export/cli.py), `eval --lm-eval` (evaluation/downstream.py) and the attack's
released model (attack/release.py) all write through these functions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_sgtm.atomic import building
from megatron_sgtm.data.shards import TOKENIZER_FILE
from megatron_sgtm.errors import UserError
from megatron_sgtm.export.hf import DTYPES, to_hf, write_hf_dir
from megatron_sgtm.export.native import NativeCheckpoint, load_native, read_model_meta


class ExportError(UserError, ValueError):
    """An export the checkpoint cannot give (nothing to ablate, no tokenizer, an existing output)."""


def find_tokenizer(checkpoint: Path, meta: dict, given: Path | None = None) -> Path:
    """`given`, else the checkpoint's copy, else its training data's tokenizer."""
    candidates = [given] if given else [
        checkpoint / TOKENIZER_FILE,
        Path(meta.get("config", {}).get("data", {}).get("path") or "/nonexistent") / TOKENIZER_FILE,
    ]
    for path in candidates:
        if path.exists():
            return path
    raise ExportError(f"no tokenizer found (looked at {', '.join(map(str, candidates))}); pass --tokenizer "
                      "PATH (a tokenizer.json or a directory holding one)")


def _write_hf(checkpoint: Path, out: Path, ablate: bool, prune: bool, dtype: str, tokenizer: Path,
              manifest: str | None = None) -> None:
    """One HF directory from a fresh read of the checkpoint, converted in place: about one model of memory."""
    from megatron_sgtm.core.regions import ablate as ablate_model
    from megatron_sgtm.export.prune import prune as prune_hf

    ckpt = load_native(checkpoint)
    if (ablate or prune) and (ckpt.partition is None or not ckpt.partition.active):
        raise ExportError(f"{ckpt.path}: no active SGTM partition in its meta.json, so there is nothing to "
                          f"{'prune' if prune else 'ablate'}")
    if ablate:
        ablate_model(ckpt.module)  # in place: the state's tensors are the module's
    state, model, partition = ckpt.state, ckpt.model, ckpt.partition
    ckpt.module = ckpt.state = None  # `state` is now the only reference, and to_hf empties it
    config, hf_state = to_hf(state, model, consume=True)
    if prune:
        config, hf_state = prune_hf(config, hf_state, partition, consume=True)
    hf_state = {k: hf_state.pop(k).to(DTYPES[dtype]) for k in list(hf_state)}  # cast one tensor at a time
    extra = {"sgtm_manifest.json": manifest} if manifest else None
    write_hf_dir(out, config, hf_state, dtype, tokenizer, extra_files=extra)
    print(f"wrote {out}", file=sys.stderr)


def _manifest(checkpoint: Path, meta: dict, model, partition, dtype: str, prune: bool, **entries) -> str:
    from megatron_sgtm.export.prune import summarize

    return json.dumps({"source": str(checkpoint), "step": meta.get("step"), "method": meta.get("method"),
                       "source_ablated": bool(meta.get("ablated", False)), "dtype": dtype, **entries,
                       **summarize(model, partition, pruned=prune)}, indent=2) + "\n"


def export_hf(checkpoint: Path, out: Path, *, ablate: bool = False, prune: bool = False, dtype: str = "fp32",
              release: bool = False, tokenizer: Path | None = None) -> None:
    """`checkpoint` as an HF directory at `out` (Θ_F zeroed with `ablate`, removed with `prune`), with the
    `sgtm_manifest.json` `eval` reads; with `release`, out/capable (as trained) and out/safe (ablated, or
    pruned) and out/manifest.json, appearing together."""
    if out.exists():
        raise ExportError(f"--out {out}: already exists (choose a new directory)")
    meta, model, partition = read_model_meta(checkpoint)
    tokenizer = find_tokenizer(checkpoint, meta, tokenizer)
    if not release:
        safe = ablate or prune or bool(meta.get("ablated", False))
        manifest = _manifest(checkpoint, meta, model, partition, dtype, prune, ablated=safe, pruned=prune)
        _write_hf(checkpoint, out, ablate, prune, dtype, tokenizer, manifest)
        return
    if meta.get("ablated", False):
        raise ExportError(f"{checkpoint}: already ablated, so --release has no capable model to write; export "
                          "the training checkpoint it came from")
    with building(out) as partial:  # the release appears only when both models are written
        _write_hf(checkpoint, partial / "capable", False, False, dtype, tokenizer)
        _write_hf(checkpoint, partial / "safe", True, prune, dtype, tokenizer)
        manifest = _manifest(checkpoint, meta, model, partition, dtype, prune, capable="capable", safe="safe",
                             pruned=prune)
        (partial / "manifest.json").write_text(manifest)


def write_model_only_copy(ckpt: NativeCheckpoint, out: Path, ablate: bool) -> int:
    """A read checkpoint (`native.load_native`) as a model-only checkpoint at `out`, with Θ_F zeroed when
    `ablate`; returns the number of parameters zeroed."""
    from megatron_sgtm.core.regions import ablate as ablate_model
    from megatron_sgtm.training.checkpoint import write_model_only

    zeroed = ablate_model(ckpt.module) if ablate else 0  # in place: the state's tensors are the module's
    keep = ("config", "partition", "method", "step", "ablated")
    meta = {**{k: ckpt.meta[k] for k in keep if k in ckpt.meta}, "source": ckpt.meta.get("source", str(ckpt.path))}
    if ablate:
        meta.update(ablated=True, ablated_params=zeroed)
    files = [f for f in [ckpt.path / TOKENIZER_FILE] if f.is_file()]
    write_model_only(out, ckpt.state, meta, files)
    return zeroed
