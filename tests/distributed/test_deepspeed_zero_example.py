"""examples/deepspeed_zero.py, a user's own DeepSpeed ZeRO script on the public hooks, against `megatron-sgtm train`
(engine deepspeed) on the same model, initial weights, batches, seed and layout: ZeRO-2 and ZeRO-3 at DP=2 on
gloo give the same per-step losses within 1e-5 over 20 steps and gate the same steps (docs/design.md §2,
"one implementation"). So the public hooks are the application's step gating, not a second implementation.

The test writes the initial weights as a model-only checkpoint (`checkpoint.pretrained` for train, `--init` for
the example) and the micro-batches of train's sampler for each DP rank (`--batches`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sgtm.data.sampler import SGTMSampler
from megatron_sgtm.layout import native_shapes
from megatron_sgtm.training.checkpoint import write_model_only
from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.run_data import load_data
from tests.support import ROOT, child_env
from tests.support.cli_runs import train_command, train_losses
from tests.support.train_fixtures import build_tiny_shards, tiny_config

STEPS, DP = 20, 2
MODEL_KEYS = ("tokens", "targets", "position_ids", "token_labels", "loss_mask")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict]:
    """(work dir, train config): the example's model, optimizer and batch settings, untied with Θ_R embeddings,
    initial weights in tmp/init, every DP rank's batches in tmp/batches.pt."""
    tmp = tmp_path_factory.mktemp("deepspeed_example")
    cfg = tiny_config(
        build_tiny_shards(tmp / "shards"), tmp / "run",
        model={"tie_embeddings": False},
        sgtm={"forget_heads": 1, "forget_mlp_units": 8, "mask_embeddings": True},
        data={"document_attention": False},
        optim={"lr": 3e-3, "min_lr": 1e-4, "warmup_steps": 2, "warmup_init_lr": 0.0, "weight_decay": 0.1,
               "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "clip_grad": 1.0, "global_batch_size": 8,
               "micro_batch_size": 2},
        train={"train_steps": STEPS, "seed": 1234, "eval_interval": 0, "eval_batches": 2},
        parallel={"engine": "deepspeed"},
    )
    typed = from_dict(cfg)
    gen = torch.Generator().manual_seed(7)
    weights = {name: torch.ones(shape) if name.endswith("layernorm.weight") else
               0.02 * torch.randn(shape, generator=gen) for name, shape in native_shapes(typed.model).items()}
    write_model_only(tmp / "init", weights, {"config": {"model": cfg["model"]}})
    cfg["checkpoint"] = {"pretrained": str(tmp / "init")}

    data = load_data(typed)
    per_rank = []
    for rank in range(DP):
        sampler = SGTMSampler(data.corpus, data.doc_labels, seq_length=typed.model.seq_length,
                              micro_batch_size=typed.optim.micro_batch_size,
                              global_batch_size=typed.optim.global_batch_size, dp_rank=rank, dp_size=DP,
                              seed=typed.train.seed, mode=typed.data.mode, documents=data.train_docs)
        per_rank.append([[{k: mb[k] for k in MODEL_KEYS} for mb in (next(sampler) for _ in
                                                                      range(sampler.num_micro_batches))]
                         for _ in range(STEPS)])
    torch.save(per_rank, tmp / "batches.pt")
    return tmp, cfg


def run(command: list[str]) -> str:
    proc = subprocess.run(command, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_the_example_matches_megatron_sgtm_train_per_step(prepared, stage):
    tmp, base = prepared
    cfg = {**base, "parallel": {"engine": "deepspeed", "zero_stage": stage},
           "logging": {**base["logging"], "run_dir": str(tmp / f"run_zero{stage}")}}
    run(train_command(tmp, cfg, f"zero{stage}", DP))
    train = train_losses(tmp / f"run_zero{stage}")
    records = [json.loads(line) for line in (tmp / f"run_zero{stage}" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]

    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={DP}",
               str(ROOT / "examples" / "deepspeed_zero.py"), "--zero-stage", str(stage), "--steps", str(STEPS),
               "--batches", str(tmp / "batches.pt"), "--init", str(tmp / "init" / "model.safetensors")])
    example = json.loads(out.strip().splitlines()[-1])
    assert example["zero_stage"] == stage and len(example["losses"]) == STEPS == len(train)
    worst = max(abs(a - train[step]) for step, a in enumerate(example["losses"], start=1))
    print(f"ZeRO-{stage}: largest loss difference {worst:.2e}; gated R/F steps {last['gated_retain_steps']}/"
          f"{last['gated_forget_steps']}")
    assert worst <= 1e-5, (worst, example["losses"], train)
    assert [sum(g[0] for g in example["gates"]), sum(g[1] for g in example["gates"])] == [
        last["gated_retain_steps"], last["gated_forget_steps"]]
