"""Checkpoint directories: atomic, complete-or-absent, newest found by ``--resume auto``.

Layout: ``<dir>/iter_0000100/`` holds the engine's sharded state (megatron distributed checkpoint
or DeepSpeed's), ``rng/rank_XXXXX.pt`` per rank, and ``meta.json`` (step, scheduler, sampler, SGTM
partition, config). Everything is written into ``iter_0000100.partial`` first; rank 0 renames it
after all ranks finished and then rewrites ``latest`` atomically, so a crash at any point leaves
the previous checkpoint as the newest complete one. ``meta.json`` is the completeness marker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron_sgtm.errors import UserError

_ITER = re.compile(r"^iter_(\d{7})$")
META = "meta.json"
MODEL_FILE = "model.safetensors"  # model-only checkpoints: the global (TP=1, PP=1) weights


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not match this run; names the path."""


def iteration_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (partial directories are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _ITER.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(resume: str | None, root: Path | None) -> Path | None:
    """The checkpoint to resume from: None, the newest complete one ('auto'), or an explicit path."""
    if resume is None:
        return None
    if resume == "auto":
        if root is None:
            raise CheckpointError("checkpoint.resume=auto needs checkpoint.dir")
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META).is_file():
        raise CheckpointError(f"checkpoint.resume={resume}: not a complete checkpoint (no {META} there)")
    return path


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def rng_state() -> dict:
    """Torch RNG (dropout, init); the data order is a pure function of the sampler state."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, step: int, meta: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final = iteration_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    engine.save(str(partial))
    (partial / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), partial / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        _write_json_atomic(partial / META, {**meta, "step": step, "world_size": dist.get_world_size()})
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_json_atomic(root / "latest.json", {"step": step, "path": final.name})
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(engine, path: Path) -> dict:
    """Collective. Loads the engine state and this rank's RNG (`restore_rng`)."""
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {META})")
    meta = json.loads(meta_file.read_text())
    engine.load(str(path))
    restore_rng(path)
    return meta


def restore_rng(path: Path) -> None:
    """Rank r restores ``rng/rank_r.pt`` when the checkpoint has it, else rank 0's (a resume at a larger
    world). The torch RNG draws only dropout and init, and the data order does not use it, so a
    resume at another layout continues the same run (bit-exact where dropout is 0, as in our configs)."""
    rng = path / "rng"
    own = rng / f"rank_{dist.get_rank():05d}.pt"
    for file in (own, rng / "rank_00000.pt"):
        if file.is_file():
            set_rng_state(torch.load(file, weights_only=True))
            return


def model_only_meta(path: Path) -> dict:
    """meta.json of a model-only checkpoint (`megatron-sgtm ablate` / `import-hf`); refuses anything else."""
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: incomplete or not a checkpoint (no {META})")
    meta = json.loads(meta_file.read_text())
    if meta.get("engine") != "model-only":
        raise CheckpointError(f"{path}: a {meta.get('engine')} training checkpoint, not a model-only one (resume "
                              "it with checkpoint.resume, or write one with `megatron-sgtm ablate`)")
    return meta


def load_model_only(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, global fp32 weights) of a model-only checkpoint."""
    meta, weights = model_only_meta(path), path / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (a model-only checkpoint keeps its weights there)")
    try:
        return meta, {k: v.float() for k, v in load_file(str(weights)).items()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({err})") from err


def write_model_only(out: Path, state: dict[str, torch.Tensor], meta: dict, files: list[Path] = ()) -> Path:
    """A model-only checkpoint at `out` (with copies of `files`, e.g. the tokenizer), which appears only
    when complete (written beside, then renamed)."""
    if out.exists():
        raise CheckpointError(f"{out}: already exists (choose a new output directory)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial / MODEL_FILE))
        for file in files:
            shutil.copyfile(file, partial / file.name)
        _write_json_atomic(partial / META, {**meta, "engine": "model-only"})
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def init_weights(model: torch.nn.Module, cfg) -> None:
    """Layout-invariant random weights, or `checkpoint.pretrained`'s (Megatron-LM's
    --pretrained-checkpoint: weights only, a fresh optimizer from step 0)."""
    from megatron_sgtm.layout import init_layout_invariant, load_global

    init_layout_invariant(model, cfg.train.seed, cfg.model.init_method_std, cfg.model.num_layers)
    if cfg.checkpoint.pretrained:
        load_global(model, load_model_only(Path(cfg.checkpoint.pretrained))[1])
