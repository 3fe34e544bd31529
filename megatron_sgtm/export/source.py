"""The model a command reads (`eval`, `unlearn`): a native training checkpoint (or a checkpoint root: its newest
complete iteration), a model-only checkpoint or an HF export `export-hf` wrote, read into its training config,
method, step and tokenizer; its weights as the global tensors the engine starts from (a megatron checkpoint:
None, the engine reshards the directory at its own layout) or as a model built in this process."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sgtm.data.shards import TOKENIZER_FILE, Manifest, sha256_file
from megatron_sgtm.errors import UserError
from megatron_sgtm.export.native import NativeCheckpoint, load_native, read_model_meta
from megatron_sgtm.training.checkpoint import META, load_model_only, read_meta, resolve_checkpoint
from megatron_sgtm.training.config import recorded_config

HF_MANIFEST = "sgtm_manifest.json"  # what `export-hf` writes beside an HF directory's config.json


class SourceError(UserError):
    """A checkpoint or HF directory that cannot be read; names the path."""


@dataclass
class Source:
    path: Path
    kind: str  # megatron, deepspeed, model-only or hf
    config: dict  # the training config (YAML form) the model was trained with, as far as known
    method: str
    step: int | None
    ablated: bool  # the weights are already ablated (`ablate`, `export-hf --ablate`)
    tokenizer: str | None  # the trained-with tokenizer's `_tokenizer_id`, when known
    converted: dict[str, torch.Tensor] | None = None  # an HF export's weights, converted when it was read

    def global_weights(self) -> dict[str, torch.Tensor] | None:
        """The global fp32 weights an engine starts from; None for a megatron checkpoint (the engine reshards
        `path` at its own layout)."""
        if self.kind == "hf":
            return self.converted
        if self.kind == "model-only":
            return load_model_only(self.path)[1]
        return self.native().state if self.kind == "deepspeed" else None

    def native(self) -> NativeCheckpoint:
        """The model built in this process (TP=1, PP=1) with the checkpoint's weights."""
        if self.kind == "hf":
            raise SourceError(f"--checkpoint {self.path}: an HF export; import it with `megatron-sgtm import-hf` "
                              "first")
        return load_native(self.path)


def tokenizer_fingerprint(path: Path) -> str:
    """SHA-256 of what makes token ids mean the same text (the model's vocabulary and merges, the added
    tokens), so that `export-hf`'s re-saved copy (other padding and length settings) matches its source."""
    try:
        data = json.loads(path.read_text())
        added = sorted((t["id"], t["content"]) for t in data["added_tokens"])
        content = {"model": data["model"], "added_tokens": added}
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return "file:" + sha256_file(path)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _tokenizer_id(directory: Path, meta: dict) -> str | None:
    """The tokenizer the model was trained with: the fingerprint of its copy in `directory`, or the file hash
    the training run recorded (`file:<sha256>`)."""
    if (directory / TOKENIZER_FILE).is_file():
        return tokenizer_fingerprint(directory / TOKENIZER_FILE)
    recorded = meta.get("identity", {}).get("tokenizer")
    return f"file:{recorded}" if recorded and not recorded.startswith("vocab_size=") else None


def open_source(path: Path, world: int) -> Source:
    """Read `path`'s description (every rank reads it; no weights yet)."""
    if not path.is_dir():
        raise SourceError(f"--checkpoint {path}: no such directory")
    if not (path / META).is_file() and (path / "config.json").is_file():
        return _open_hf(path)
    path = resolve_checkpoint(path, collective=world > 1)
    read_meta(path, collective=world > 1)  # checked once, each rank hashing its share; the reads below find it so
    meta = read_model_meta(path)[0]
    kind = meta["engine"]
    if kind == "deepspeed" and world != 1:
        raise SourceError(f"--checkpoint {path}: a DeepSpeed checkpoint is read in one process; run without "
                          "torchrun/srun")
    source_meta = meta
    if "identity" not in meta and meta.get("source") and (Path(meta["source"]) / META).is_file():
        source_meta = read_meta(Path(meta["source"]), files=False)  # model-only: its training run's
    return Source(path, kind, recorded_config(meta), meta.get("method", "none"), meta.get("step"),
                  bool(meta.get("ablated", False)), _tokenizer_id(path, source_meta))


def _open_hf(path: Path) -> Source:
    from megatron_sgtm.export.hf import from_hf, read_hf_dir

    if not (path / HF_MANIFEST).is_file():
        raise SourceError(f"--checkpoint {path}: an HF directory without {HF_MANIFEST}, so not one `megatron-sgtm "
                          "export-hf` wrote (import it with `megatron-sgtm import-hf --config` first)")
    manifest = json.loads((path / HF_MANIFEST).read_text())
    if manifest.get("pruned"):
        raise SourceError(f"--checkpoint {path}: a pruned export (its shapes are not the trained model's); "
                          "evaluate the checkpoint it came from")
    try:
        config, hf_state = read_hf_dir(path)
        model, weights = from_hf(hf_state, config)
    except (ValueError, KeyError) as err:
        raise SourceError(f"--checkpoint {path}: unsupported HF config ({err})") from err
    origin = Path(manifest.get("source") or "/nonexistent")
    meta = read_meta(origin, files=False) if (origin / META).is_file() else {}
    config = recorded_config(meta)
    config["model"] = dataclasses.asdict(model)
    return Source(path, "hf", config, manifest.get("method") or "none", manifest.get("step"),
                  bool(manifest.get("ablated", False)), _tokenizer_id(path, meta), weights)


def check_tokenizer(source: Source, data: Path) -> None:
    """Refuse data tokenized differently from the model's training data (by the tokenizers' content hash)."""
    manifest = Manifest.read(data)
    tokenizer = data / manifest.tokenizer
    if source.tokenizer is None or not tokenizer.is_file():
        return
    by_file = source.tokenizer.startswith("file:")
    mine = "file:" + sha256_file(tokenizer) if by_file else tokenizer_fingerprint(tokenizer)
    if mine != source.tokenizer:
        raise SourceError(f"--checkpoint {source.path} and --data {data}: different tokenizers ({tokenizer} is not "
                          "the one the model was trained with)")
