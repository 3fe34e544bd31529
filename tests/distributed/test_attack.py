"""`megatron-sgtm attack finetune` from a TP=2 megatron and a ZeRO-3 DeepSpeed checkpoint, through the real CLI.

One 2-process launch trains both checkpoints; the attack on the TP=2 one runs under torchrun at TP=2 (rank 0
writes the ablated release in a child process), the attack on the ZeRO-3 one twice as a single process (the same
seed gives the same curve; a target met mid-curve is reported at the right step, an unreachable one as not
reached). The step-0 evaluation is the source run's ablated evaluation: same release, same held-out split.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sgtm.training.checkpoint import complete_checkpoints
from tests.distributed.launch import torchrun
from tests.support import child_env
from tests.support.train_fixtures import build_tiny_shards, tiny_config

LAYOUTS = {"tp2": {"tensor_model_parallel_size": 2}, "zero3": {"engine": "deepspeed", "zero_stage": 3}}
# A short attack: 4 steps, evaluated every 2; the lr is raised so that 4 steps move the tiny model.
ATTACK = ["--train.train_steps=4", "--train.eval_interval=2", "--optim.warmup_steps=1", "--optim.lr=3e-3",
          "--optim.warmup_init_lr=3e-4", "--logging.wandb_mode=disabled"]


def _env() -> dict:
    return child_env()


def _attack(checkpoint: Path, out: Path, *args: str, nproc: int = 1) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "megatron_sgtm.cli", "attack", "finetune", "--checkpoint",
           str(checkpoint), "--out", str(out), *ATTACK, *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "attack.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """name -> (last checkpoint, the run's summary)."""
    tmp = tmp_path_factory.mktemp("attack")
    data = build_tiny_shards(tmp / "shards")
    runs = {name: tiny_config(data, tmp / name, parallel=layout, checkpoint={"dir": str(tmp / "ckpt" / name)},
                              train={"train_steps": 3})
            for name, layout in LAYOUTS.items()}
    (tmp / "spec.json").write_text(json.dumps({"runs": runs}))
    torchrun("megatron_train.py", 2, tmp / "out", str(tmp / "spec.json"))
    return {name: (complete_checkpoints(tmp / "ckpt" / name)[-1], json.loads((tmp / name / "summary.json").read_text()))
            for name in LAYOUTS}


def test_attack_from_tp2_under_torchrun(trained, tmp_path):
    checkpoint, summary = trained["tp2"]
    result = _attack(checkpoint, tmp_path / "a", "--target-loss", "0.01", "--parallel.tensor_model_parallel_size=2",
                     nproc=2)
    assert result["ablated"] and (tmp_path / "a" / "released" / "meta.json").is_file()
    assert [p["step"] for p in result["curve"]] == [0, 2, 4]
    assert result["before"]["forget_loss"] == pytest.approx(summary["forget_loss_ablated"], abs=1e-4)
    assert result["curve"][-1]["forget_loss"] < result["curve"][0]["forget_loss"]
    assert not result["reached"] and result["reached_step"] is None
    assert (tmp_path / "a" / "attack_curve.png").is_file()


def test_attack_from_zero3_reproduces_and_finds_the_step(trained, tmp_path):
    checkpoint, summary = trained["zero3"]
    first = _attack(checkpoint, tmp_path / "a", "--target-loss", "0.01")
    assert not first["reached"] and first["before"]["forget_loss"] == pytest.approx(summary["forget_loss_ablated"],
                                                                                    abs=1e-3)
    (tmp_path / "run").mkdir()
    target = first["curve"][1]["forget_loss"]  # step 2's forget loss, as a finished run's summary
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"forget_loss": target}))
    second = _attack(checkpoint, tmp_path / "b", "--target-run", str(tmp_path / "run"))
    assert second["curve"] == first["curve"]  # same seed, same curve
    expected = next(p for p in first["curve"] if p["forget_loss"] <= target)
    assert (second["reached"], second["reached_step"]) == (True, expected["step"])
    assert second["reached_tokens"] == expected["step"] * 8 * 32  # global batch x sequence length per step
