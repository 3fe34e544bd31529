"""Checks `train` runs before it builds the model, so that a run does not find out after hours of training
what it could have been told at once: an output directory that cannot be written (a file in the way), a
checkpoint filesystem without room for one checkpoint, a manifest that disagrees with its shards, a tokenizer
file that does not parse. Each failure is one line naming the field (`ConfigError`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_sgtm.data.shards import Manifest, ManifestError
from megatron_sgtm.errors import is_first_rank
from megatron_sgtm.training import checkpoint
from megatron_sgtm.training.config import ConfigError, TrainConfig
from megatron_sgtm.training.disk import checkpoint_bytes, free_bytes, human


def check_writable_dir(path: Path, field: str) -> None:
    """Create `path` (and its parents) and write a file in it: a file in the way, or a directory this user
    may not write, is reported now rather than at the first save or log line."""
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"{field}={path}: {blocker} is a file, not a directory")
    probe = path / f".write-test-{os.environ.get('RANK', '0')}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{field}={path}: cannot be written ({err.strerror}: {err.filename})") from err


def _saves(cfg: TrainConfig) -> int:
    """Checkpoints this run writes: one per save_interval, and one at the end."""
    steps, interval = cfg.train.train_steps, cfg.checkpoint.save_interval
    return (steps // interval if interval else 0) + (0 if interval and steps % interval == 0 else 1)


def check_free_space(cfg: TrainConfig, root: Path) -> None:
    """Refuse a run whose checkpoint filesystem cannot hold even one checkpoint (every save would fail, losing
    the whole run at its first save); warn when it cannot hold all that keep_last keeps at once, as free space
    changes while a run goes (other jobs, clean-ups) and a later disk-full save keeps the previous checkpoint.
    The size is a lower bound (`disk.checkpoint_bytes`), so a refusal is never wrong."""
    one = checkpoint_bytes(cfg.model)
    free = free_bytes(root)
    if free < one:
        raise ConfigError(f"checkpoint.dir={root}: {human(free)} free on its filesystem, but one checkpoint of this "
                          f"model needs at least {human(one)}; free space or choose another checkpoint.dir")
    existing = len(checkpoint.complete_checkpoints(root))
    at_once = min(_saves(cfg), max(1, cfg.checkpoint.keep_last + 1 - existing))
    if free < at_once * one and is_first_rank():
        print(f"warning: checkpoint.dir={root}: {human(free)} free, room for {free // one} of the {at_once} "
              f"checkpoints (at least {human(one)} each) this run keeps at once (checkpoint.keep_last="
              f"{cfg.checkpoint.keep_last}); a later save may fail with disk full", file=sys.stderr, flush=True)


def check_data(cfg: TrainConfig) -> None:
    """The manifest's totals are its shards' sums (`Manifest.read`), and its tokenizer file parses and has
    the manifest's vocabulary. (Each shard's entry is checked against the shard when the data is loaded.)"""
    from megatron_sgtm.data.tokenizer import load_tokenizer

    data = Path(cfg.data.path)
    manifest = Manifest.read(data)
    tokenizer = data / manifest.tokenizer
    if not tokenizer.is_file():
        return  # data built elsewhere may come without one; nothing in training reads it
    try:
        vocab = load_tokenizer(tokenizer).get_vocab_size()
    except ValueError as err:
        raise ConfigError(f"data.path={data}: {err}") from err
    if vocab != manifest.vocab_size:
        raise ManifestError(f"{data / 'manifest.json'}: vocab_size is {manifest.vocab_size} but its tokenizer "
                            f"{tokenizer} has {vocab} tokens (the manifest was edited; rebuild the shards)")


def check_something_to_save(cfg: TrainConfig, root: Path) -> None:
    """train.train_steps=0 from scratch trains nothing: no optimizer state exists to checkpoint (megatron's
    distributed optimizer cannot even write one), so checkpoint.dir is refused rather than failing at the end."""
    if cfg.train.train_steps == 0 and checkpoint.resolve_resume(cfg.checkpoint.resume, root) is None:
        raise ConfigError(f"train.train_steps=0 trains nothing, so there is no checkpoint to save in checkpoint.dir="
                          f"{root}: unset checkpoint.dir to evaluate only (or resume a checkpoint)")


def preflight(cfg: TrainConfig) -> None:
    """Every check above (run on every rank, before any process group; rank 0 reports)."""
    check_writable_dir(Path(cfg.logging.run_dir), "logging.run_dir")
    if cfg.checkpoint.dir:
        root = Path(cfg.checkpoint.dir)
        check_writable_dir(root, "checkpoint.dir")
        check_something_to_save(cfg, root)
        check_free_space(cfg, root)
    if not cfg.data.indexed_prefix:
        check_data(cfg)
