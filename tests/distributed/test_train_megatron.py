"""`megatron-sgtm train` on the megatron engine: step gating, layout invariance, resume, resharding.

docs/design.md invariants 3 (step gating under the DistributedOptimizer at DP=2), 4 (5 steps give
the same losses at DP=1, DP=2, TP=2, PP=2, TP=2xPP=2) and 5 (SIGKILL + resume reproduces the
uninterrupted run exactly; a TP=2 checkpoint resumes at TP=1). Each world size launches once.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_sgtm.model import ModelConfig
from tests.distributed.launch import torchrun
from tests.support import child_env, reference_gpt
from tests.support.cli_runs import kill_when, train_command, train_losses
from tests.support.train_fixtures import build_tiny_shards, tiny_config

LAYOUTS = {
    "dp2": {},
    "tp2": {"tensor_model_parallel_size": 2},
    "pp2": {"pipeline_model_parallel_size": 2},
    "tp2sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "zero3": {"engine": "deepspeed", "zero_stage": 3},
}
CALIBRATED = ("tp2", "pp2", "zero3")  # runs that also fit the ablated model's output bias
CALIBRATE = {"calibrate_ablated": True, "calibration_steps": 100}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("data") / "shards")


def _launch(tmp: Path, nproc: int, spec: dict) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "spec.json").write_text(json.dumps(spec))
    return torchrun("megatron_train.py", nproc, tmp / "out", str(tmp / "spec.json"))


@pytest.fixture(scope="module")
def world2(data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("world2")
    runs = {name: tiny_config(data, tmp / name, parallel=par, train=CALIBRATE if name in CALIBRATED else {})
            for name, par in LAYOUTS.items()}
    gating = tiny_config(data, tmp / "gating", sgtm={"forget_heads": 1, "forget_mlp_units": 8})
    gating_bf16 = tiny_config(data, tmp / "gating_bf16", sgtm={"forget_heads": 1, "forget_mlp_units": 8},
                              train={"bf16": True})
    return _launch(tmp, 2, {"gating": gating, "gating_bf16": gating_bf16, "runs": runs})


@pytest.fixture(scope="module")
def tp2_saved(data, tmp_path_factory) -> dict:
    """A TP=2 run that checkpoints at steps 3 and 6 (a job of its own, as users run them)."""
    tmp = tmp_path_factory.mktemp("tp2_save")
    run = tiny_config(
        data, tmp / "tp2_save", parallel={"tensor_model_parallel_size": 2}, train={"train_steps": 6},
        checkpoint={"dir": str(tmp / "ckpt_tp2"), "save_interval": 3, "keep_last": 5},
    )
    results = _launch(tmp, 2, {"runs": {"tp2_save": run}})
    results["ckpt_tp2"] = tmp / "ckpt_tp2"
    return results


@pytest.fixture(scope="module")
def world1(data, tp2_saved, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("world1")
    runs = {
        "dp1": tiny_config(data, tmp / "dp1", train=CALIBRATE),
        "tp1_resume": tiny_config(
            data, tmp / "resume", train={"train_steps": 6},
            checkpoint={"resume": str(tp2_saved["ckpt_tp2"] / "iter_0000003")},
        ),
    }
    return _launch(tmp, 1, {"runs": runs})


@pytest.fixture(scope="module")
def world4(data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("world4")
    par = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
    return _launch(tmp, 4, {"runs": {"tp2pp2": tiny_config(data, tmp / "tp2pp2", parallel=par)}})


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_layout_invariance_of_five_training_steps(world1, world2, world4):
    reference = world1["dp1/losses"]
    assert len(reference) == 5 and torch.isfinite(reference).all()
    runs = {**{k: world2[f"{k}/losses"] for k in LAYOUTS}, "tp2pp2": world4["tp2pp2/losses"]}
    for name, losses in runs.items():
        assert _relative(losses, reference) <= 1e-5, f"{name}: {losses.tolist()} vs {reference.tolist()}"
    assert reference[-1] < reference[0]


def test_calibrated_ablation_fits_the_output_bias_at_every_layout(world1, world2):
    """The bias fitted after ablation lowers the retain loss it was fitted for, and gives the same losses at
    every layout (the fit runs on TP-sharded logits; test_calibration_optimum.py checks it reaches the optimum)."""
    for run in ("dp1", *CALIBRATED):
        results = world1 if run == "dp1" else world2
        assert results[f"{run}/retain_loss_ablated_calibrated"] < results[f"{run}/retain_loss_ablated"] - 0.1, run
        for name in ("forget", "retain", "adjacent"):
            key = f"{name}_loss_ablated_calibrated"
            assert _relative(results[f"{run}/{key}"], world1[f"dp1/{key}"]) <= 1e-4, (run, key)


@pytest.mark.parametrize("precision", ["", "bf16/"], ids=["fp32", "bf16"])
@pytest.mark.parametrize("step,frozen", [("all_forget", "retain"), ("all_retain", "forget")])
def test_step_gating_freezes_params_and_adam_moments_bit_for_bit(world2, step, frozen, precision):
    """In bf16 too: the model's bf16 params, the fp32 main params the inner optimizer steps and their Adam
    moments of the frozen region stay bit-identical."""
    step = precision + step
    assert bool(world2[f"{precision}shards_fp32"])
    assert bool(world2[f"{precision}model_bf16"]) == bool(precision)
    same, total, changed = world2[f"{step}/shard_counts"].tolist()
    assert total > 0 and same == total, f"{total - same} frozen shard elements moved"
    assert changed > 0, "the other region did not train"
    gated_retain, gated_forget = world2[f"{step}/gated"].tolist()
    assert (gated_retain, gated_forget) == ((1, 0) if frozen == "retain" else (0, 1))
    # In model space, with the forget set derived independently (the last head, the last 8 units).
    before = {k.split("/before/")[1]: v for k, v in world2.items() if k.startswith(f"{step}/before/")}
    after = {k.split("/before/")[1]: world2[k.replace("/before/", "/after/")] for k in world2
             if k.startswith(f"{step}/before/")}
    model = ModelConfig(**tiny_config(Path("."), Path("."))["model"])
    forget, retain = reference_gpt.forget_masks(before, model, heads=(3,), units=range(56, 64), layers=(0, 1))
    region = retain if frozen == "retain" else forget
    other = forget if frozen == "retain" else retain
    for name in before:
        assert torch.equal(before[name][region[name]], after[name][region[name]]), name
    assert any(not torch.equal(before[n][other[n]], after[n][other[n]]) for n in before)
    joint = [n for n in before if not (forget[n] | retain[n]).any()]
    assert any(not torch.equal(before[n], after[n]) for n in joint), "Θ_J did not train"


@pytest.mark.parametrize("precision", ["", "bf16/"], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,frozen", [("ranks_F_U", None), ("ranks_F_F", "retain"), ("ranks_R_F", None),
                                         ("ranks_Fpad_F", "retain"), ("ranks_Rpad_R", "forget")])
def test_step_gate_reads_the_labels_of_every_dp_rank(world2, case, frozen, precision):
    """DP ranks holding different labels (rank 0's, rank 1's): the gate follows the global batch, so U on
    one rank trains both regions and R + F freezes nothing; only F + F freezes Θ_R. U-labelled padding at
    loss_mask 0 (rank 0's micro-batches in the `pad` cases) is not loss-bearing: F + F (R + R) beside it still
    freezes Θ_R (Θ_F). Frozen params and Adam moments stay bit-identical on every rank's shard; the others move
    (nearly) everywhere."""
    case = precision + case
    counts = world2[f"{case}/region_counts"]
    for row, region in enumerate(("retain", "forget")):
        same, total, changed = counts[row].tolist()
        assert total > 0
        if region == frozen:
            assert same == total, f"{region}: {total - same} frozen elements moved"
        else:
            assert changed >= 0.9 * total, f"{region}: only {changed} of {total} elements moved"
    assert world2[f"{case}/gated"].tolist() == [frozen == "retain", frozen == "forget"]


def test_tp2_checkpoint_resumes_at_tp1(world1, tp2_saved):
    uninterrupted = tp2_saved["tp2_save/losses"][3:]
    resumed = world1["tp1_resume/losses"]
    assert len(resumed) == 3
    assert _relative(resumed, uninterrupted) <= 1e-5


def test_sigkill_and_resume_reproduce_the_uninterrupted_run_exactly(data, tmp_path):
    env = child_env()
    steps = {"train_steps": 8}
    full = tiny_config(data, tmp_path / "full", train=steps)
    subprocess.run(train_command(tmp_path, full, "full"), env=env, check=True, capture_output=True,
                   timeout=600)

    ckpt = {"dir": str(tmp_path / "ckpt"), "save_interval": 2, "keep_last": 2, "resume": "auto"}
    killed = tiny_config(data, tmp_path / "killed", train=steps, checkpoint=ckpt)
    kill_when(train_command(tmp_path, killed, "killed"), env, tmp_path / "ckpt" / "iter_0000004" / "meta.json")
    killed_at = max(train_losses(tmp_path / "killed"))
    assert killed_at < 8, "the run finished before it could be killed"

    resumed = tiny_config(data, tmp_path / "resumed", train=steps, checkpoint=ckpt)
    subprocess.run(train_command(tmp_path, resumed, "resumed"), env=env, check=True, capture_output=True,
                   timeout=600)
    expected, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert min(got) >= 5 and max(got) == 8
    for step, loss in got.items():
        assert loss == expected[step], f"step {step}: {loss!r} != {expected[step]!r}"
    # keep_last=2: the older checkpoints were rotated away by the saves themselves
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("iter_???????")) == ["iter_0000006", "iter_0000008"]
