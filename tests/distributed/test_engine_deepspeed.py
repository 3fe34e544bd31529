"""Engine ``deepspeed``: step gating under ZeRO 1/2/3 (docs/design.md invariant 3), agreement of losses and
weights across ZeRO stages, TP=2 and the megatron engine (invariant 4), resume exactness through
DeepSpeed's own checkpoints (invariant 5), ablated evaluation, weights_only checkpoint loads, and the
step gate on DP ranks that hold different labels.

The distributed part runs once (tests/distributed/workers/deepspeed_gating.py, 2 gloo ranks); each test checks
one property of its results. Unit tests of the LR schedule, the config merge and the counters of
`ZeroSGTMAdamW` need no process group.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_sgtm.core.gating import Gate
from tests.distributed.launch import torchrun
from tests.distributed.workers.deepspeed_gating import (
    BF16_LAYOUTS,
    LAYOUTS,
    MIX_LAYOUTS,
    MODEL,
    RECOMPUTED,
    SCHEDULE,
)

KEYS = [layout[0] for layout in LAYOUTS]
# fp32 layouts, and the bf16 ones for every property that does not compare values across layouts
ALL_KEYS = KEYS + [layout[0] for layout in BF16_LAYOUTS]
JOINT, RETAIN, FORGET = 0, 1, 2  # the worker's region-mask encoding
KINDS = ("param", "exp_avg", "exp_avg_sq")


def _kinds(key: str) -> tuple[str, ...]:
    """The recorded state kinds: fp32 params and moments, and in bf16 also the bf16 model params."""
    return (*KINDS, "model") if key.endswith("_bf16") else KINDS


def _moves(changed: int, total: int, kind: str, joint: bool = False) -> bool:
    """Whether a trained region moved: every element of its fp32 state (of Θ_J 90%: unused position rows keep
    zero moments); in the bf16 model params 80% (an update below half a bf16 ulp rounds back to the same
    bf16 value; measured 90-98%)."""
    if kind == "model":
        return changed >= 0.8 * total
    return changed >= 0.9 * total if joint else changed == total


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return torchrun("deepspeed_gating.py", 2, tmp_path_factory.mktemp("deepspeed_gating"), timeout=900)


def _changed(results, key, before, after, kind):
    """Per region: (elements that changed, elements) between two recorded states."""
    out = {JOINT: [0, 0], RETAIN: [0, 0], FORGET: [0, 0]}
    for name, region in results[f"{key}/regions"].items():
        old, new = results[f"{key}/{before}/{kind}/{name}"], results[f"{key}/{after}/{kind}/{name}"]
        changed = old != new  # bitwise: no tolerance
        for code in out:
            sel = region == code
            out[code][0] += int(changed[sel].sum())
            out[code][1] += int(sel.sum())
    return out


@pytest.mark.parametrize("key", ALL_KEYS)
def test_partition_layout_matches_deepspeed_gather(results, key):
    """The engine's model-space -> flat-partition mapping (used for the region codes) reproduces this
    rank's fp32 partition and Adam moments exactly from DeepSpeed's safe_get_full_* helpers."""
    assert float(results[f"{key}/layout_err"]) == 0.0
    assert float(results[f"{key}/layout_err_end"]) == 0.0
    assert int(results[f"{key}/gated_elements"]) > 0


@pytest.mark.parametrize("key", ALL_KEYS)
def test_all_forget_step_freezes_retain(results, key):
    """Invariant 3: an all-F step leaves every Θ_R value and Adam moment bit-identical; Θ_F and Θ_J move. In
    bf16 (ZeRO-2) that holds for the fp32 partitions, their moments and the bf16 model params alike."""
    assert results[f"{key}/gated/4"].tolist() == [True, False]
    assert bool(results[f"{key}/model_bf16"]) == key.endswith("_bf16")
    for kind in _kinds(key):
        count = _changed(results, key, "before_forget", "before_retain", kind)
        assert count[RETAIN][1] > 0 and count[RETAIN][0] == 0, (kind, count)
        assert count[FORGET][1] > 0 and _moves(*count[FORGET], kind), (kind, count)
        assert _moves(*count[JOINT], kind, joint=True), (kind, count)


@pytest.mark.parametrize("key", ALL_KEYS)
def test_all_retain_step_freezes_forget(results, key):
    """Invariant 3: an all-R step leaves every Θ_F value and Adam moment bit-identical; Θ_R and Θ_J move."""
    assert results[f"{key}/gated/5"].tolist() == [False, True]
    for kind in _kinds(key):
        count = _changed(results, key, "before_retain", "after_retain", kind)
        assert count[FORGET][1] > 0 and count[FORGET][0] == 0, (kind, count)
        assert count[RETAIN][1] > 0 and _moves(*count[RETAIN], kind), (kind, count)
        assert _moves(*count[JOINT], kind, joint=True), (kind, count)


@pytest.mark.parametrize("key", [layout[0] for layout in MIX_LAYOUTS])
@pytest.mark.parametrize("case,frozen", [("F_U", None), ("F_F", RETAIN), ("R_F", None)])
def test_step_gate_reads_the_labels_of_every_dp_rank(results, key, case, frozen):
    """DP ranks holding different labels (rank 0's, rank 1's): the gate follows the global batch's label
    counts, so U on one rank trains both regions and R + F freezes nothing; only F + F freezes Θ_R, bit for
    bit in values and Adam moments, on both ranks' partitions."""
    assert results[f"{key}/{case}/gated"].tolist() == [frozen == RETAIN, False]
    for kind in KINDS:
        count = _changed(results, key, f"{case}/before", f"{case}/after", kind)
        for region in (RETAIN, FORGET):
            changed, total = count[region]
            assert total > 0
            assert changed == (0 if region == frozen else total), (kind, region, count)


@pytest.mark.parametrize("key", ALL_KEYS)
def test_region_step_counters(results, key):
    """Each region's Adam step count advances once per optimizer step it takes part in, however many
    times DeepSpeed calls the client optimizer's step() (per group, per ZeRO-3 sub-group)."""
    for step in (1, 2, 3):
        assert results[f"{key}/gated/{step}"].tolist() == [False, False]
    n = len(SCHEDULE)
    for counters in results[f"{key}/sgtm_steps"].tolist():
        assert counters == [n, n - 1, n - 1]


def test_sub_groups_exercised(results):
    assert int(results["zero3_subgroups_offload/fp32_partitions"]) > int(results["zero3/fp32_partitions"])


@pytest.mark.parametrize("key", KEYS[1:] + ["megatron"])
def test_losses_match_across_layouts_and_engines(results, key):
    """Invariant 4: ZeRO-1/2/3 (with and without offload), TP=2 and the megatron engine give the same
    losses at every step."""
    ref = results["zero1/losses"]
    assert len(ref) == len(SCHEDULE)
    torch.testing.assert_close(results[f"{key}/losses"], ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("key", [*RECOMPUTED, "megatron"])
def test_logged_step_loss_is_the_recomputed_sum_of_its_micro_batches(results, key):
    """Both engines keep the step's loss sum on the device (one host read per step): the logged loss is still,
    bit for bit, the sum of every micro-batch's masked loss read on the host, over the DP ranks, recomputed
    from the micro-batches through the model before each step."""
    logged, recomputed = results[f"{key}/losses"], results[f"{key}/recomputed_losses"]
    assert len(logged) == len(SCHEDULE)
    assert logged.tolist() == recomputed.tolist()


@pytest.mark.parametrize("key", KEYS[1:] + ["megatron"])
def test_grad_norms_match_across_layouts_and_engines(results, key):
    """The norm DeepSpeed clips with (over the global batch, TP shards counted once) is megatron's."""
    ref = results["zero1/grad_norms"]
    assert bool(torch.isfinite(ref).all()) and bool((ref > 0).all())
    torch.testing.assert_close(results[f"{key}/grad_norms"], ref, rtol=1e-4, atol=0)


@pytest.mark.parametrize("key", KEYS[1:] + ["megatron"])
def test_weights_match_across_layouts_and_engines(results, key):
    prefix = f"{key}/after_retain/param/"
    names = [k[len(prefix):] for k in results if k.startswith(prefix)]
    assert names
    for name in names:
        torch.testing.assert_close(results[prefix + name], results[f"zero1/after_retain/param/{name}"],
                                   rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("key", ALL_KEYS)
def test_resume_is_exact(results, key):
    """Invariant 5: load() of the step-3 checkpoint, then steps 4-5 again: same losses, and bit-identical
    parameters and Adam moments (including the gated steps' per-region counters)."""
    assert results[f"{key}/replay_losses"].tolist() == results[f"{key}/losses"][3:].tolist()
    diffs = {k: float(v) for k, v in results.items() if k.startswith(f"{key}/replay_diff/")}
    assert diffs and max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}


@pytest.mark.parametrize("key", ALL_KEYS)
def test_checkpoint_loads_are_weights_only(results, key):
    loads = results[f"{key}/weights_only_loads"]
    assert loads.numel() >= 2 and bool(loads.all())


@pytest.mark.parametrize("key", ALL_KEYS)
def test_ablated_evaluation(results, key):
    live, ablated, again = results[f"{key}/eval"].tolist()
    assert ablated != live
    assert again == live  # the live model is restored exactly after the ablated pass
    ref = results["zero1/eval"]
    # bf16 after 5 steps: within bf16 round-off (2^-9 per operation) of the fp32 run's losses
    torch.testing.assert_close(results[f"{key}/eval"], ref, rtol=1e-2 if key.endswith("_bf16") else 1e-5, atol=0)


# -- single-process unit tests ---------------------------------------------------------------
def test_lr_schedule_drives_the_client_optimizer():
    """The DeepSpeed engine's client optimizer is scheduled by megatron's scheduler, as the megatron engine's:
    warmup from 0 then cosine to min_lr, weight decay scaled by each group's wd_mult, and a scheduler state
    saved before (without weight-decay entries) continues at its step."""
    from megatron_sgtm.training.config import OptimConfig, TrainConfig, TrainLoopConfig
    from megatron_sgtm.training.engine import lr_scheduler

    cfg = TrainConfig(model=MODEL, optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=3, weight_decay=0.1),
                      train=TrainLoopConfig(train_steps=10))
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": params[:1], "wd_mult": 1.0}, {"params": params[1:], "wd_mult": 0.0}])
    sched = lr_scheduler(opt, cfg)
    lrs = []
    for _ in range(13):
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(1e-3, rel=1e-12) and lrs[10:] == [pytest.approx(1e-4)] * 3
    assert all(a > b for a, b in zip(lrs[3:10], lrs[4:11]))
    old = {"num_steps": 5, "max_lr": 1e-3, "min_lr": 1e-4, "lr_warmup_steps": 3, "lr_decay_steps": 10,
           "lr_decay_style": "cosine"}
    lr_scheduler(opt, cfg).load_state_dict(old)
    assert opt.param_groups[0]["lr"] == lrs[5]


def _cfg(tmp_path, user: dict | None, stage: int = 2, offload: bool = False):
    from megatron_sgtm.training.config import OptimConfig, ParallelConfig, TrainConfig

    path = None
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
    return TrainConfig(model=MODEL, parallel=ParallelConfig(engine="deepspeed", zero_stage=stage, cpu_offload=offload,
                                                            deepspeed_config=str(path) if path else None),
                       optim=OptimConfig(global_batch_size=8, micro_batch_size=2, clip_grad=0.5))


def test_deepspeed_config_merge(tmp_path):
    from megatron_sgtm.training.engine_deepspeed import deepspeed_config

    ds = deepspeed_config(_cfg(tmp_path, None, stage=1), on_gpu=False, dp_size=2)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False
    user = {"zero_optimization": {"stage": 3, "offload_optimizer": {"pin_memory": False}, "sub_group_size": 7}}
    ds = deepspeed_config(_cfg(tmp_path, user, stage=1, offload=True), on_gpu=True, dp_size=4)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["sub_group_size"] == 7
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}  # the JSON wins, key by key
    assert ds["gradient_accumulation_steps"] == 1


def test_deepspeed_config_refuses_optimizer_section(tmp_path):
    from megatron_sgtm.training.engine_deepspeed import deepspeed_config

    with pytest.raises(ValueError, match="optimizer"):
        deepspeed_config(_cfg(tmp_path, {"optimizer": {"type": "Adam"}}), on_gpu=False, dp_size=2)
    with pytest.raises(ValueError, match="stage"):
        deepspeed_config(_cfg(tmp_path, {"zero_optimization": {"stage": 0}}), on_gpu=False, dp_size=2)


def test_zero_sgtm_adamw_counts_each_step_once():
    """DeepSpeed's ZeRO-3 steps each fp32 sub-group separately (several per param group), with the other
    groups' params emptied; counters (so bias corrections) must advance once per engine step, and the
    result must equal one plain SGTMAdamW step over everything."""
    from megatron_sgtm import SGTMAdamW, ZeroSGTMAdamW, set_step_gate

    torch.manual_seed(0)
    init = [torch.randn(6), torch.randn(5), torch.randn(4)]
    codes = torch.tensor([0, 1, 1, 2, 2, 0], dtype=torch.uint8)

    def build(cls):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = cls([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=0.1)
        opt.set_region_codes(params[0], codes)
        return params, opt

    ref_params, ref = build(SGTMAdamW)
    zp, zero = build(ZeroSGTMAdamW)
    calls = [(0, [zp[0]]), (0, [zp[1]]), (1, [zp[2]])]  # (group, the sub-group's params)
    for gate in (Gate(), Gate(retain=True), Gate(forget=True), Gate()):
        grads = [torch.randn_like(t) for t in init]
        for p, q, g in zip(ref_params, zp, grads):
            p.grad, q.grad = g.clone(), g.clone()
        set_step_gate([ref, zero], gate)  # opens the step of ZeroSGTMAdamW
        ref.step()
        for group, params in calls:
            for i, g in enumerate(zero.param_groups):
                g["params"] = params if i == group else []
            zero.step()
        zero.param_groups[0]["params"], zero.param_groups[1]["params"] = zp[:2], zp[2:]
    expected = [[4, 3, 3], [4, 3, 3]]
    assert [g["sgtm_steps"] for g in ref.param_groups] == expected
    assert [g["sgtm_steps"] for g in zero.param_groups] == expected
    for p, q in zip(zp, ref_params):
        assert torch.equal(p, q)
