"""Checkpoint directories: atomic, complete-or-absent, newest found by ``--resume auto``.

Layout: ``<dir>/iter_0000100/`` holds the engine's sharded state (megatron distributed checkpoint
or DeepSpeed's), ``rng/rank_XXXXX.pt`` per rank, and ``meta.json`` (step, scheduler, sampler, SGTM
partition, config, the run's identity and the SHA-256 of every other file). Everything is written
into ``iter_0000100.partial`` first; rank 0 renames it after all ranks finished and then rewrites
``latest`` atomically, so a crash at any point leaves the previous checkpoint as the newest complete
one. ``meta.json`` is the completeness marker; its checksums catch a file corrupted or changed
afterwards (``checkpoint.verify``), ``meta.sha256`` (the SHA-256 of meta.json) catches meta.json itself
corrupted or edited, and its identity refuses a resume by a different run. `read_meta` is the one reader
of both kinds of checkpoint (training and model-only): every command checks a checkpoint through it before
it reads anything else of it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from megatron_sgtm.atomic import building, partial_dir, publish, write_json, write_text
from megatron_sgtm.data.shards import Manifest, sha256_file
from megatron_sgtm.errors import UserError, is_first_rank
from megatron_sgtm.training.disk import disk_full, free_bytes, human

_ITER = re.compile(r"^iter_(\d{7})$")
META = "meta.json"
LATEST = "latest.json"  # in a checkpoint root: the step and directory of the newest checkpoint saved
# meta.json's key for the wandb run of the job that saved it (rank 0's id; None without wandb): a resume continues it
WANDB_RUN_ID = "wandb_run_id"
CHECKSUMS = "sha256"  # meta.json's key: {relative path: SHA-256} of every other file of the checkpoint
META_DIGEST = "meta.sha256"  # the SHA-256 of meta.json's bytes, beside it: meta.json is covered too
DIGESTED = "meta_digest"  # meta.json's key naming its digest file: without that file it is refused
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


def incomplete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories a crash left unfinished (``.partial``, or without meta.json), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_") and not (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def _say(line: str) -> None:
    if is_first_rank():
        print(line, file=sys.stderr, flush=True)


def resolve_checkpoint(path: Path, flag: str = "--checkpoint", *, verify: bool = True,
                       collective: bool = False) -> Path:
    """The checkpoint a command reads for `path`: `path` itself when it is one (an iteration or a model-only
    checkpoint); for a checkpoint root (a run's ``checkpoint.dir``, what Megatron-LM's ``--load`` takes) the
    newest complete iteration that passes `read_meta`'s checks (`newest_verified`), said on stderr.
    Anything else is returned as given, for the reader to refuse."""
    if (path / META).is_file() or not path.is_dir():
        return path
    if not (path / LATEST).is_file() and not any(p.name.startswith("iter_") for p in path.iterdir()):
        return path
    newest = newest_verified(path, flag, verify=verify, collective=collective)
    if newest is None:
        unfinished = ", ".join(p.name for p in incomplete_checkpoints(path)) or "none"
        raise CheckpointError(f"{flag} {path}: a checkpoint directory without a complete checkpoint (incomplete "
                              f"ones: {unfinished})")
    _say(f"{flag} {path}: using {newest.name}, its newest complete checkpoint")
    return newest


def newest_verified(root: Path, flag: str, *, verify: bool = True, collective: bool = False) -> Path | None:
    """The newest complete checkpoint under `root` whose meta.json and files pass their checks (None when there
    is no complete one). A newer one that fails is skipped with one line on stderr saying which and why; when
    every one fails, the newest's error is raised (a run must not silently start over)."""
    found = complete_checkpoints(root)
    for older, path in enumerate(reversed(found)):
        try:
            read_meta(path, verify=verify, collective=collective)
        except CheckpointError as err:
            if older == len(found) - 1:
                skipped = "" if older == 0 else f"; {older} newer one(s) failed too"
                raise CheckpointError(f"{flag} {root}: no complete checkpoint passes its checks ({err}{skipped})") \
                    from err
            _say(f"{flag} {root}: skipping {path.name}, it fails its checks: {err}")
            continue
        return path
    return None


def resolve_resume(resume: str | None, root: Path | None, *, verify: bool = True,
                   collective: bool = False) -> Path | None:
    """The checkpoint to resume from: None, the newest verified one ('auto', `newest_verified`), or an explicit
    path (a checkpoint root: its newest verified one), checked by `read_meta`."""
    if resume is None:
        return None
    if resume == "auto":
        if root is None:
            raise CheckpointError("checkpoint.resume=auto needs checkpoint.dir")
        return newest_verified(root, "checkpoint.resume=auto", verify=verify, collective=collective)
    path = resolve_checkpoint(Path(resume), "checkpoint.resume", verify=verify, collective=collective)
    if not (path / META).is_file():
        raise CheckpointError(f"checkpoint.resume={resume}: not a complete checkpoint (no {META} there)")
    read_meta(path, verify=verify, collective=collective)
    return path


def _write_meta(directory: Path, meta: dict) -> None:
    """meta.json and its digest (``meta.sha256``), each written atomically."""
    text = json.dumps({**meta, DIGESTED: META_DIGEST}, indent=2, default=str)
    write_text(directory / META_DIGEST, hashlib.sha256(text.encode()).hexdigest() + "\n")
    write_text(directory / META, text)


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


def _files(directory: Path) -> list[str]:
    """Every file of a checkpoint but meta.json and its digest, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() not in (META, META_DIGEST))


def _hash(directory: Path, files: list[str]) -> dict[str, str | None]:
    """SHA-256 of `files` (None where missing)."""
    return {f: sha256_file(directory / f) if (directory / f).is_file() else None for f in files}


def _checksums(directory: Path, files: list[str]) -> dict[str, str | None]:
    """`_hash` as a collective: each rank hashes its share of the files."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = _hash(directory, files[rank::world])
    shares: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(shares, mine)
    return {f: digest for share in shares for f, digest in share.items()}


def check_checksums(directory: Path, meta: dict, found: dict[str, str | None]) -> None:
    """Refuse a checkpoint whose files differ from the checksums its meta.json recorded."""
    for name, digest in sorted(meta[CHECKSUMS].items()):
        if found.get(name) is None:
            raise CheckpointError(f"checkpoint {directory}: {name} is missing (its SHA-256 is in {META})")
        if found[name] != digest:
            raise CheckpointError(f"checkpoint {directory}: {name} does not match its SHA-256 in {META} "
                                  "(corrupt or modified)")


def save(engine, root: Path, step: int, meta: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final = iteration_dir(root, step)
    partial = partial_dir(final)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    try:
        engine.save(str(partial))
        (partial / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), partial / "rng" / f"rank_{rank:05d}.pt")
        dist.barrier()
        files = [_files(partial) if rank == 0 else None]
        dist.broadcast_object_list(files, src=0)  # one listing: a shared filesystem may show ranks different ones
        checksums = _checksums(partial, files[0])
        if rank == 0:
            _write_meta(partial, {**meta, "step": step, "world_size": dist.get_world_size(), CHECKSUMS: checksums})
            publish(partial, final)
            write_json(root / LATEST, {"step": step, "path": final.name})
    except (Exception, CheckpointException) as err:  # torch's CheckpointException (a BaseException) wraps the rest
        if disk_full(err, partial):
            kept = complete_checkpoints(root)
            raise CheckpointError(
                f"disk full: saving {final} failed with {human(free_bytes(root))} free in {root}; "
                f"{kept[-1].name if kept else 'no checkpoint'} is the newest complete one there (free space, remove "
                f"{partial.name}, then continue with checkpoint.resume=auto)") from err
        raise
    if rank == 0:
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


# Checkpoints whose files passed their checksums in this process, with the (size, mtime, inode) of each file
# then: a command reads a checkpoint in several steps (its description, then its weights), and hashing a large
# one once is enough unless a file has changed since.
_VERIFIED: dict[Path, tuple] = {}


def _stats(path: Path, names: list[str]) -> tuple | None:
    """(size, mtime, inode) of meta.json and `names`; None when one is missing."""
    try:
        stats = [(path / n).stat() for n in (META, *names)]
    except FileNotFoundError:
        return None
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)


def read_meta(path: Path, *, verify: bool = True, files: bool = True, collective: bool = False) -> dict:
    """meta.json of a complete checkpoint (training or model-only), checked before anything of it is read:
    meta.json against ``meta.sha256`` and, with `files`, every other file against the SHA-256 meta.json
    records (`collective`: every rank calls this, and each hashes its share of the files). `verify=False`
    skips both (``checkpoint.verify: false``). A checkpoint written before these checks is read with what it
    has: without a digest its meta.json unchecked, without checksums its files too."""
    meta_file, digest_file = path / META, path / META_DIGEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: incomplete or not a checkpoint (no {META}; a .partial directory is "
                              "a save that did not finish)")
    raw = meta_file.read_bytes()
    if verify and digest_file.is_file() and \
            hashlib.sha256(raw).hexdigest().encode() != digest_file.read_bytes().strip():  # bytes: garbage too
        raise CheckpointError(f"checkpoint {path}: {META} does not match its SHA-256 in {META_DIGEST} (corrupt or "
                              "edited; a checkpoint's meta.json is not to be changed by hand)")
    try:
        meta = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_file}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: not a checkpoint's meta.json (a JSON {type(meta).__name__}, not an "
                              "object)")
    if not verify:
        return meta
    if DIGESTED in meta and not digest_file.is_file():
        raise CheckpointError(f"checkpoint {path}: {META_DIGEST} is missing (the SHA-256 of its {META}, which "
                              "names it)")
    names = sorted(meta.get(CHECKSUMS, {}))
    if not files or not names:
        return meta
    stats = _stats(path, names)
    unverified = stats is None or _VERIFIED.get(path.resolve()) != stats
    if collective:  # every rank hashes, or none: each takes part in the collective (an object: NCCL or gloo)
        flags: list = [None] * dist.get_world_size()
        dist.all_gather_object(flags, unverified)
        unverified = any(flags)
    if unverified:
        check_checksums(path, meta, _checksums(path, names) if collective else _hash(path, names))
        _VERIFIED[path.resolve()] = stats
    return meta


def run_identity(cfg, partition) -> dict:
    """What a resumed run must share with the checkpoint it continues, by the name an error gives it."""
    model = {f"model.{k}": v for k, v in asdict(cfg.model).items() if k != "init_method_std"}  # init: no shape
    identity = {"method": cfg.method, "parallel.engine": cfg.parallel.engine, **model,
                **{f"partition.{k}": v for k, v in partition.to_dict().items()}}
    if cfg.data.indexed_prefix:
        from megatron_sgtm.data.indexed import read_labels

        header = read_labels(cfg.data.indexed_prefix, cfg.data.indexed_labels).header
        return {**identity, "tokenizer": f"eod_id={cfg.data.eod_id}",
                "data": f"{header['idx_sha256']}:{header['npz_sha256']}"}  # the index and its sidecar
    data = Path(cfg.data.path)
    manifest = Manifest.read(data)
    tokenizer = data / manifest.tokenizer
    shards = json.dumps([[s.name, s.sha256] for s in manifest.shards])
    return {
        **identity,
        "tokenizer": sha256_file(tokenizer) if tokenizer.is_file() else
        f"vocab_size={manifest.vocab_size}, eod_id={manifest.eod_id}",
        "data": hashlib.sha256(shards.encode()).hexdigest(),  # the shards' checksums, wherever they live
    }


def check_identity(path: Path, meta: dict, identity: dict) -> None:
    """Refuse to continue a checkpoint of another method, engine, model, partition, tokenizer or data (an older
    checkpoint's identity lacks the engine: its meta.json's ``engine`` stands in)."""
    engine = {"parallel.engine": meta["engine"]} if "engine" in meta else {}
    saved = json.loads(json.dumps({**engine, **meta.get("identity", {})}))  # JSON both sides: tuples, lists compare
    mine = json.loads(json.dumps(identity))
    for name, value in mine.items():
        if name in saved and saved[name] != value:
            raise CheckpointError(f"checkpoint {path}: {name} is {saved[name]!r} there but {value!r} in this run "
                                  "(resume only the run that wrote it, or start a new checkpoint.dir)")


# Settings the checkpoint's scheduler (lr, warmup, weight decay) and optimizer state (Adam's betas, eps)
# carry: on resume the saved ones continue, whatever the config says now.
_RESTORED = ("lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "eps")


def ignored_changes(meta: dict, cfg) -> list[str]:
    """'optim.key old -> new' of the settings a resume cannot change (see `_RESTORED`), and a new
    train.train_steps, which the run does reach but whose LR decay keeps the checkpoint's length."""
    saved, now = meta.get("config", {}), cfg.to_dict()
    old = saved.get("optim", {})
    found = [f"optim.{key} {old[key]} -> {now['optim'][key]}"
             for key in _RESTORED if key in old and old[key] != now["optim"][key]]
    steps = saved.get("train", {}).get("train_steps", cfg.train.train_steps)
    if steps != cfg.train.train_steps:
        found.append(f"train.train_steps {steps} -> {cfg.train.train_steps} for the LR decay (the run trains to step "
                     f"{cfg.train.train_steps}, its LR decays over the checkpoint's {steps} steps)")
    return found


def load(engine, path: Path, *, verify: bool = True) -> dict:
    """Collective. Checks the checkpoint (`read_meta`; `resolve_resume` has, so its files are not hashed
    again), then loads the engine state and this rank's RNG (`restore_rng`)."""
    meta = read_meta(path, verify=verify, collective=True)
    engine.load(str(path), meta)
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


def model_only_meta(path: Path, verify: bool = True) -> dict:
    """meta.json of a model-only checkpoint (`megatron-sgtm ablate` / `import-hf`), checked (`read_meta`);
    refuses anything else."""
    meta = read_meta(path, verify=verify)
    if meta.get("engine") != "model-only":
        raise CheckpointError(f"{path}: a {meta.get('engine')} training checkpoint, not a model-only one (resume "
                              "it with checkpoint.resume, or write one with `megatron-sgtm ablate`)")
    return meta


def load_model_only(path: Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, global fp32 weights) of a model-only checkpoint; `verify` checks it first (`read_meta`)."""
    meta, weights = model_only_meta(path, verify), path / MODEL_FILE
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
    with building(out) as partial:
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial / MODEL_FILE))
        for file in files:
            shutil.copyfile(file, partial / file.name)
        _write_meta(partial, {**meta, "engine": "model-only", CHECKSUMS: _hash(partial, _files(partial))})
    return out


def init_weights(model: torch.nn.Module, cfg, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Layout-invariant random weights, then the global `weights` given (e.g. `megatron-sgtm eval`'s) or
    `checkpoint.pretrained`'s (Megatron-LM's --pretrained-checkpoint: weights only, a fresh optimizer from step 0)."""
    from megatron_sgtm.layout import init_layout_invariant, load_global

    init_layout_invariant(model, cfg.train.seed, cfg.model.init_method_std, cfg.model.num_layers)
    if weights is None and cfg.checkpoint.pretrained:
        weights = load_model_only(Path(cfg.checkpoint.pretrained), cfg.checkpoint.verify)[1]
    if weights is not None:
        load_global(model, weights)
