"""Partition resolution, per-rank slices and misconfiguration errors (single process)."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_sgtm.core.partition import ModelDims, Partition, PartitionError, SGTMConfig
from megatron_sgtm.model import ModelConfig, resolve_partition

PAPER = ModelDims(num_layers=4, num_attention_heads=32, num_query_groups=32, ffn_hidden_size=2048,
                  kv_channels=64, gated_mlp=False)
GQA = ModelDims(num_layers=2, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=64,
                kv_channels=4, gated_mlp=True)


def test_paper_defaults_are_the_last_head_and_64_of_2048_units_in_every_layer():
    p = SGTMConfig().resolve(PAPER)
    assert p.forget_heads == (31,)
    assert p.forget_units == tuple(range(2048 - 64, 2048))
    assert p.masked_layers == (0, 1, 2, 3)


def test_gqa_defaults_to_one_whole_query_group():
    assert SGTMConfig().resolve(GQA).forget_heads == (4, 5, 6, 7)


def test_param_fraction_derives_heads_and_units():
    p = SGTMConfig(forget_param_fraction=0.25).resolve(GQA)
    assert p.forget_heads == (4, 5, 6, 7) and len(p.forget_units) == 16


def test_shards_put_each_forget_unit_on_one_rank():
    p = SGTMConfig(forget_heads=[0, 1, 2, 3], forget_mlp_units=[0, 63]).resolve(GQA)
    shards = [p.shard(r, 2) for r in range(2)]
    assert [int(s.fc2_cols.sum()) for s in shards] == [1, 1]
    assert shards[0].fc2_cols[0] and shards[1].fc2_cols[-1]
    # gated fc1: the unit's gate and up rows ([gate; up] per rank) on the same rank
    assert shards[1].fc1_rows.nonzero().flatten().tolist() == [31, 63]
    assert shards[0].fc1_rows.nonzero().flatten().tolist() == [0, 32]


def test_qkv_rows_of_a_forget_group_are_its_whole_block():
    p = SGTMConfig(forget_heads=[4, 5, 6, 7]).resolve(GQA)
    hd, per = GQA.kv_channels, GQA.heads_per_group
    block = (per + 2) * hd
    s0, s1 = p.shard(0, 2), p.shard(1, 2)
    assert not s0.qkv_rows.any()
    assert s1.qkv_rows.tolist() == [True] * block and s1.proj_cols.all()


def test_global_index_set_is_layout_independent_and_roundtrips():
    p = SGTMConfig(forget_heads=[0, 1, 2, 3], forget_mlp_units=[3, 40]).resolve(GQA)
    assert Partition.from_dict(p.to_dict()) == p
    units_tp1 = torch.nonzero(p.shard(0, 1).fc2_cols).flatten().tolist()
    units_tp2 = [i + r * 32 for r in range(2) for i in torch.nonzero(p.shard(r, 2).fc2_cols).flatten().tolist()]
    assert units_tp1 == units_tp2 == [3, 40]


@pytest.mark.parametrize(
    "config,dims,needle",
    [
        (SGTMConfig(forget_heads=32), PAPER, "sgtm.forget_heads=32"),
        (SGTMConfig(forget_heads=[0, 32]), PAPER, "sgtm.forget_heads: indices [32] out of range"),
        (SGTMConfig(forget_mlp_units=2048), PAPER, "sgtm.forget_mlp_units=2048"),
        (SGTMConfig(forget_mlp_units=[-1]), PAPER, "sgtm.forget_mlp_units: indices [-1] out of range"),
        (SGTMConfig(forget_heads=[4, 5]), GQA, "must be whole query groups"),
        (SGTMConfig(forget_heads=2), GQA, "must be whole query groups"),
        (SGTMConfig(strategy="magic"), PAPER, "sgtm.strategy='magic'"),
        (SGTMConfig(masked_layers=[4]), PAPER, "sgtm.masked_layers: [4] out of range"),
        (SGTMConfig(forget_param_fraction=1.5), PAPER, "sgtm.forget_param_fraction=1.5"),
        (SGTMConfig(forget_param_fraction=0.1, forget_heads=1), PAPER, "not both"),
        (SGTMConfig(strategy="gradient_routing", mask_embeddings=True), PAPER, "mask_embeddings"),
        (SGTMConfig(strategy="none", joint_down_projections=True), PAPER, "sgtm.joint_down_projections"),
        (SGTMConfig(strategy="gradient_routing", joint_down_projections=True), PAPER, "already keeps them joint"),
    ],
)
def test_misconfiguration_names_the_setting(config, dims, needle):
    with pytest.raises(PartitionError, match=re.escape(needle)):
        config.resolve(dims)


@pytest.mark.parametrize("tp,needle", [(3, "num_attention_heads=32"), (4, "num_query_groups=2")])
def test_tp_degree_that_does_not_divide_is_refused(tp, needle):
    dims = PAPER if tp == 3 else GQA
    with pytest.raises(PartitionError, match=f"tensor_model_parallel_size={tp} does not divide {needle}"):
        SGTMConfig().resolve(dims).check_tp(tp)


def test_resolve_partition_checks_tp_before_building_anything():
    model = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, vocab_size=64, seq_length=8)
    with pytest.raises(PartitionError, match="does not divide num_attention_heads=6"):
        resolve_partition(SGTMConfig(), model, tp_size=4)


def test_joint_down_projections_are_joint_and_never_ablated():
    """The variant: linear_proj / linear_fc2 weights and biases Θ_J, not ablated; qkv / fc1 keep their Θ_F rows.
    An older partition (no such key) reads back as the paper's default split."""
    from megatron_sgtm.core.strategy import Region
    from megatron_sgtm.export.prune import ablation_masks, global_regions

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=8, arch="gpt2")
    split, joint = (SGTMConfig(forget_heads=1, forget_mlp_units=4, joint_down_projections=j).resolve(cfg.dims())
                    for j in (False, True))
    old = split.to_dict()
    del old["joint_down_projections"]
    assert Partition.from_dict(old) == split and Partition.from_dict(joint.to_dict()) == joint
    regions, masks = global_regions(cfg, joint), ablation_masks(cfg, joint)
    down = [n for n in regions if n.endswith(("linear_proj.weight", "linear_proj.bias", "linear_fc2.weight",
                                              "linear_fc2.bias"))]
    assert len(down) == 8 and all(regions[n].region == Region.JOINT and not regions[n].split for n in down)
    assert not set(down) & set(masks)
    up = [n for n in regions if ".linear_qkv." in n or ".linear_fc1." in n]
    assert up and all(regions[n].split and n in masks for n in up)
    assert set(masks) < set(ablation_masks(cfg, split))
