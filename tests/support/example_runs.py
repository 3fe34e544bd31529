"""The examples against `megatron-sgtm train`: a train config with the examples' model and hyperparameters, its
initial weights as a model-only checkpoint and the micro-batches of train's sampler for each data-parallel rank,
so an example (`--init`, `--batches`) trains on exactly what train does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from megatron_sgtm.data.sampler import SGTMSampler
from megatron_sgtm.layout import native_shapes
from megatron_sgtm.training.checkpoint import write_model_only
from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.run_data import load_data
from tests.support import ROOT, child_env
from tests.support.cli_runs import train_losses
from tests.support.train_fixtures import build_tiny_shards, tiny_config

MODEL_KEYS = ("tokens", "targets", "position_ids", "token_labels", "loss_mask")


def matched_run(tmp: Path, engine: str, steps: int, dp: int) -> dict:
    """The train config of the examples' model (untied, Θ_R embeddings) and hyperparameters; writes initial
    weights to tmp/init (the config's `checkpoint.pretrained`) and every DP rank's batches to tmp/batches.pt."""
    cfg = tiny_config(
        build_tiny_shards(tmp / "shards"), tmp / "run",
        model={"tie_embeddings": False},
        sgtm={"forget_heads": 1, "forget_mlp_units": 8, "mask_embeddings": True},
        data={"document_attention": False},
        optim={"lr": 3e-3, "min_lr": 1e-4, "warmup_steps": 2, "warmup_init_lr": 0.0, "weight_decay": 0.1,
               "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "clip_grad": 1.0, "global_batch_size": 8,
               "micro_batch_size": 2},
        train={"train_steps": steps, "seed": 1234, "eval_interval": 0, "eval_batches": 2},
        parallel={"engine": engine},
    )
    typed = from_dict(cfg)
    gen = torch.Generator().manual_seed(7)
    weights = {name: torch.ones(shape) if name.endswith("layernorm.weight") else
               0.02 * torch.randn(shape, generator=gen) for name, shape in native_shapes(typed.model).items()}
    write_model_only(tmp / "init", weights, {"config": {"model": cfg["model"]}})
    cfg["checkpoint"] = {"pretrained": str(tmp / "init")}

    data = load_data(typed)
    per_rank = []
    for rank in range(dp):
        sampler = SGTMSampler(data.corpus, data.doc_labels, seq_length=typed.model.seq_length,
                              micro_batch_size=typed.optim.micro_batch_size,
                              global_batch_size=typed.optim.global_batch_size, dp_rank=rank, dp_size=dp,
                              seed=typed.train.seed, mode=typed.data.mode, documents=data.train_docs)
        per_rank.append([[{k: mb[k] for k in MODEL_KEYS} for mb in (next(sampler) for _ in
                                                                      range(sampler.num_micro_batches))]
                         for _ in range(steps)])
    torch.save(per_rank, tmp / "batches.pt")
    return cfg


def run(command: list[str]) -> str:
    """The stdout of `command` run from the repository root; asserts it succeeded."""
    proc = subprocess.run(command, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def run_example(script: str, nproc: int, *args: str) -> dict:
    """examples/`script` under torchrun on `nproc` ranks; the JSON summary it prints last."""
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(ROOT / "examples" / script), *args])
    return json.loads(out.strip().splitlines()[-1])


def assert_matches_train(example: dict, run_dir: Path, steps: int, tolerance: float = 1e-5) -> float:
    """The example's per-step losses within `tolerance` of train's (run_dir's metrics.jsonl) at every one of
    `steps` steps, and as many Θ_R- and Θ_F-gated steps; returns the largest difference."""
    train = train_losses(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert len(example["losses"]) == steps == len(train)
    worst = max(abs(a - train[step]) for step, a in enumerate(example["losses"], start=1))
    print(f"largest loss difference {worst:.2e}; gated R/F steps {last['gated_retain_steps']}/"
          f"{last['gated_forget_steps']}")
    assert worst <= tolerance, (worst, example["losses"], train)
    assert [sum(g[0] for g in example["gates"]), sum(g[1] for g in example["gates"])] == [
        last["gated_retain_steps"], last["gated_forget_steps"]]
    return worst
