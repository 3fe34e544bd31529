"""examples/megatron_distributed.py, a user's own megatron-core script at TP=2 x DP=2 on a labelled Megatron indexed
dataset (`LabelledGPTDataset`, megatron's DDP + DistributedOptimizer gated by `install_step_gating`, the gate from
`step_gate`), against `megatron-sgtm train` reading the same index through `data.indexed_prefix`: same initial
weights, seed, layout and labels give the same per-step losses within 1e-5 over 20 steps and gate the same steps.

The index is written here by megatron-core's `IndexedDatasetBuilder` and tagged by `megatron-sgtm data
tag-indexed`; the initial weights are a model-only checkpoint (`checkpoint.pretrained` for train, `--init` for the
example).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_sgtm.cli import main as cli
from megatron_sgtm.layout import native_shapes
from megatron_sgtm.training.checkpoint import write_model_only
from megatron_sgtm.training.config import from_dict
from tests.support.cli_runs import train_command
from tests.support.example_runs import assert_matches_train, run, run_example

STEPS, WORLD, EOD = 20, 4, 1
RANGES = {"english": (4, 100), "spanish": (100, 200), "italian": (200, 300)}  # each category's token ids


def write_corpus(prefix: Path, num_docs: int) -> None:
    """Documents of three token "languages", each ending in EOD; the categories file the tagger reads."""
    rng = np.random.default_rng(0)
    names = rng.choice(list(RANGES), size=num_docs, p=[0.6, 0.1, 0.3])
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for name in names:
        low, high = RANGES[name]
        doc = np.append(rng.integers(low, high, size=int(rng.integers(40, 400))), EOD)  # a step spans few docs
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    Path(f"{prefix}.categories.txt").write_text("".join(f"{n}\n" for n in names))
    Path(f"{prefix}.scores.jsonl").write_text("".join(json.dumps({"id": str(d), "score": float(n == "spanish")})
                                                      + "\n" for d, n in enumerate(names)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("megatron_example")
    prefix = tmp / "corpus"
    write_corpus(prefix, 300)
    assert cli(["data", "tag-indexed", "--prefix", str(prefix), "--classifier", "scores", "--scores",
                f"{prefix}.scores.jsonl", "--categories", f"{prefix}.categories.txt"]) == 0
    cfg = {
        "method": "sgtm",
        "model": {"arch": "gpt2", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
                  "vocab_size": 320, "seq_length": 32, "tie_embeddings": False},
        "sgtm": {"forget_heads": 2, "forget_mlp_units": 8, "mask_embeddings": True},
        "data": {"indexed_prefix": str(prefix), "eod_id": EOD, "indexed_split": "100,0,0", "retain_rate": 1.0,
                 "forget_categories": ["spanish"], "document_attention": True, "attention": "dense"},
        "parallel": {"engine": "megatron", "tensor_model_parallel_size": 2},
        "optim": {"lr": 3e-3, "min_lr": 1e-4, "warmup_steps": 2, "warmup_init_lr": 0.0, "weight_decay": 0.1,
                  "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "clip_grad": 1.0, "global_batch_size": 8,
                  "micro_batch_size": 2},
        "train": {"train_steps": STEPS, "seed": 1234, "log_interval": 1, "eval_interval": 0, "eval_batches": 2},
        "logging": {"run_dir": str(tmp / "run"), "wandb_mode": "disabled"},
    }
    gen = torch.Generator().manual_seed(7)
    weights = {name: torch.ones(shape) if name.endswith("layernorm.weight") else
               0.02 * torch.randn(shape, generator=gen) for name, shape in native_shapes(from_dict(cfg).model).items()}
    write_model_only(tmp / "init", weights, {"config": {"model": cfg["model"]}})
    cfg["checkpoint"] = {"pretrained": str(tmp / "init")}
    return tmp, cfg


def test_the_example_matches_megatron_sgtm_train_per_step(prepared):
    tmp, cfg = prepared
    run(train_command(tmp, cfg, "train", WORLD))
    example = run_example("megatron_distributed.py", WORLD, "--prefix", cfg["data"]["indexed_prefix"],
                          "--eod-id", str(EOD), "--steps", str(STEPS),
                          "--init", str(tmp / "init" / "model.safetensors"))
    assert_matches_train(example, tmp / "run", STEPS)
    assert example["losses"][-1] < example["losses"][0]
