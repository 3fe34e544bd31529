"""A small synthetic shard directory and tiny training configs, shared by the training tests."""

from __future__ import annotations

from pathlib import Path

from megatron_sgtm.data.build import build_shards
from megatron_sgtm.data.shards import Manifest, ShardInfo
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tokenizer import train_bpe


def build_tiny_shards(out: Path, num_docs: int = 400, vocab: int = 300, seed: int = 0) -> Path:
    docs = list(generate(num_docs, seed=seed))
    tokenizer = train_bpe((d.text for d in docs), vocab)
    build_shards(docs, tokenizer, out)
    return out


def write_manifest(directory: Path, categories: dict[str, int] | None = None) -> Path:
    """A shard directory holding only its manifest (`validate` reads no shard): documents per category as given,
    by default the synthetic corpus's english, spanish and italian."""
    categories = {"english": 6, "spanish": 3, "italian": 1} if categories is None else categories
    directory.mkdir(parents=True, exist_ok=True)
    shard = ShardInfo("shard-000000.tar", num_docs=sum(categories.values()), categories=categories)
    Manifest(shards=[shard], eod_id=0, vocab_size=300).write(directory)
    return directory


def tiny_config(data_path: Path, run_dir: Path, **sections) -> dict:
    """A 2-layer gpt2-style model on ground-truth labels; `sections` override per section."""
    cfg = {
        "method": "sgtm",
        "model": {"arch": "gpt2", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "ffn_hidden_size": 64, "vocab_size": 320, "seq_length": 32},
        "sgtm": {"forget_heads": 1, "forget_mlp_units": 8},
        "data": {"path": str(data_path), "score_source": "truth", "retain_rate": 0.5, "heldout_fraction": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "global_batch_size": 8, "micro_batch_size": 2},
        "train": {"train_steps": 5, "log_interval": 1, "eval_interval": 0, "eval_batches": 2},
        "logging": {"run_dir": str(run_dir), "wandb_mode": "disabled"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg
