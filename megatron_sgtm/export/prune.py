"""Θ_F of a global state, ablation without a model, and physical pruning of HF exports.

`global_regions` applies the rule of `regions.param_regions` to global (TP=1/PP=1) names, so a checkpoint
can be ablated or summarised without building a model (the tests check both agree element for element).

Pruning works on the HF side because only HF configs can describe the smaller model (a pruned llama has
``num_attention_heads * head_dim != hidden_size``). But LlamaConfig still requires the head count to divide
the hidden size and GPT2Attention fixes ``head_dim = n_embd / n_head``: where the remaining heads do not
divide it (always for gpt2) the forget heads stay with zero weights and only the forget MLP units go.
Either way the pruned model computes what the zero-ablated one does: an ablated head has zero q/k/v and an
ablated unit zero pre-activation (GELU(0) = SiLU(0)·0 = 0), whatever ablation leaves in proj/fc2.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import torch
from transformers import PretrainedConfig

from megatron_sgtm.core.partition import ModelDims, Partition
from megatron_sgtm.core.regions import ParamRegion, linear_regions, masked_embeddings
from megatron_sgtm.core.strategy import LINEARS, LinearKind, Region
from megatron_sgtm.export.hf import HF_CLASSES, State, hf_config, hf_family, hf_shapes
from megatron_sgtm.layout import native_shapes
from megatron_sgtm.model import ModelConfig


def _check_partition(dims: ModelDims, partition: Partition, what: str) -> None:
    if partition.dims != dims:
        raise ValueError(f"the partition was resolved for {partition.dims}, but {what} has {dims}")


def _masked_linears(cfg: ModelConfig, partition: Partition | None) -> Iterator[tuple[str, LinearKind, ParamRegion]]:
    """(global name, linear kind, region) of the weights and biases of the masked layers' linears."""
    if partition is None or not partition.active:
        return
    names = native_shapes(cfg)
    _check_partition(cfg.dims(), partition, "the model")
    index = partition.shard(0, 1)
    for layer in partition.masked_layers:
        for kind in LINEARS.values():
            name = f"decoder.layers.{layer}.{kind.path}"
            weight, bias = linear_regions(partition, kind, index.for_kind(kind.name), f"{name}.bias" in names)
            yield f"{name}.weight", kind, weight
            if bias is not None:
                yield f"{name}.bias", kind, bias


def global_regions(cfg: ModelConfig, partition: Partition | None) -> dict[str, ParamRegion]:
    """The region of every tensor of the global state of `cfg` (the rules of `regions.param_regions`)."""
    names = native_shapes(cfg)
    regions = dict.fromkeys(names, ParamRegion(Region.JOINT))
    regions.update((name, region) for name, _, region in _masked_linears(cfg, partition))
    position = "embedding.position_embeddings.weight" in names
    for name in masked_embeddings(partition, cfg.tie_embeddings, position):
        regions[f"embedding.{name}.weight"] = ParamRegion(Region.RETAIN)
    return regions


def _ablated_regions(cfg: ModelConfig, partition: Partition | None) -> Iterator[tuple[str, ParamRegion]]:
    """(name, region) of the tensors whose Θ_F ablation zeros: those of the strategy's `ablated_kinds`."""
    for name, kind, region in _masked_linears(cfg, partition):
        if region.split and kind.name in partition.rules.ablated_kinds:
            yield name, region


def ablation_masks(cfg: ModelConfig, partition: Partition | None) -> dict[str, torch.Tensor]:
    """Bool mask per tensor of the global state: True where `regions.ablate` zeros (tensors it never touches
    are left out). sgtm / activation masking / none: all of Θ_F; gradient routing: the forget rows of
    `linear_qkv` and `linear_fc1` (and their bias entries) only."""
    shapes = native_shapes(cfg)
    return {  # broadcast views: no copy
        name: region.forget_mask(torch.empty(()).expand(shapes[name]))
        for name, region in _ablated_regions(cfg, partition)
    }


@torch.no_grad()
def ablate_state(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, partition: Partition | None
) -> tuple[State, int]:
    """(copy of `state` with Θ_F zeroed as `regions.ablate` zeros a live model, number of elements zeroed).
    Tensors ablation does not touch are shared with `state`."""
    masks = ablation_masks(cfg, partition)
    out = {**state, **{name: state[name].masked_fill(mask, 0) for name, mask in masks.items()}}
    return out, sum(int(mask.sum()) for mask in masks.values())


def _hf_dims(config: PretrainedConfig) -> ModelDims:
    if config.model_type == "llama":
        return ModelDims(
            num_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_key_value_heads, ffn_hidden_size=config.intermediate_size,
            kv_channels=config.head_dim or config.hidden_size // config.num_attention_heads, gated_mlp=True,
        )
    return ModelDims(
        num_layers=config.n_layer, num_attention_heads=config.n_head, num_query_groups=config.n_head,
        ffn_hidden_size=config.n_inner or 4 * config.n_embd, kv_channels=config.n_embd // config.n_head,
        gated_mlp=False,
    )


def _check_prunable(config: PretrainedConfig, partition: Partition) -> None:
    if config.model_type not in HF_CLASSES:
        raise ValueError(f"cannot prune model_type={config.model_type!r}: expected one of {sorted(HF_CLASSES)}")
    if not partition.active:
        raise ValueError(f"cannot prune: the method's strategy={partition.strategy!r} has no forget heads or units")
    dims = _hf_dims(config)
    missing = sorted(set(range(dims.num_layers)) - set(partition.masked_layers))
    if missing:
        raise ValueError(
            f"cannot prune: layers {missing} are not masked (sgtm.masked_layers={list(partition.masked_layers)}); "
            "a Hugging Face config has one head count and one intermediate size for all layers, so every layer "
            "must lose the same heads and units. Export the zero-ablated model instead"
        )
    _check_partition(dims, partition, "the Hugging Face config (already pruned?)")


def _keep(total: int, drop: tuple[int, ...], width: int) -> torch.Tensor:
    """Indices of the rows of the kept items when each of `total` items owns `width` consecutive rows."""
    kept = torch.tensor([i for i in range(total) if i not in set(drop)], dtype=torch.long)
    return (kept[:, None] * width + torch.arange(width)).reshape(-1)


def removes_heads(config: PretrainedConfig, partition: Partition) -> bool:
    """Whether pruning can drop the forget heads: only llama, and only when the remaining head count divides
    the hidden size (transformers' LlamaConfig validation requires it even with an explicit head_dim)."""
    remaining = config.num_attention_heads - len(partition.forget_heads)
    return config.model_type == "llama" and config.hidden_size % remaining == 0


def prune_config(config: PretrainedConfig, partition: Partition) -> PretrainedConfig:
    """The HF config of the pruned model (forget heads/groups removed where `removes_heads`; forget units)."""
    _check_prunable(config, partition)
    dims = _hf_dims(config)
    heads = removes_heads(config, partition)
    config = copy.deepcopy(config)
    units = dims.ffn_hidden_size - len(partition.forget_units)
    if config.model_type == "llama" and not heads:
        config.intermediate_size = units
    elif config.model_type == "llama":
        config.head_dim = dims.kv_channels
        config.num_attention_heads = dims.num_attention_heads - len(partition.forget_heads)
        config.num_key_value_heads = dims.num_query_groups - len(partition.forget_groups)
        config.intermediate_size = units
    else:
        config.n_inner = units
    return config


@torch.no_grad()
def prune(
    config: PretrainedConfig, state: Mapping[str, torch.Tensor], partition: Partition, *, consume: bool = False
) -> tuple[PretrainedConfig, State]:
    """(config, state) of the HF model without Θ_F, from an unpruned export (`to_hf`), ablated or not.

    Refused unless every layer is masked. Tensors pruning does not touch are shared with `state`; with
    `consume`, `state` (a dict) is emptied so that each replaced tensor is freed as it is replaced."""
    new_config = prune_config(config, partition)
    d = _hf_dims(config)
    heads = _keep(d.num_attention_heads, partition.forget_heads, d.kv_channels)
    groups = _keep(d.num_query_groups, partition.forget_groups, d.kv_channels)
    units = _keep(d.ffn_hidden_size, partition.forget_units, 1)
    out = dict(state)
    if consume:
        state.clear()
    state = out  # read each tensor from `out`, where it is replaced, so that nothing else keeps it
    drop_heads = removes_heads(config, partition)
    for i in range(d.num_layers):
        if config.model_type == "llama":
            p = f"model.layers.{i}."
            for name, rows, dim in (
                ("self_attn.q_proj", heads, 0), ("self_attn.k_proj", groups, 0), ("self_attn.v_proj", groups, 0),
                ("self_attn.o_proj", heads, 1),
                ("mlp.gate_proj", units, 0), ("mlp.up_proj", units, 0), ("mlp.down_proj", units, 1),
            ):
                weight = state[f"{p}{name}.weight"]
                if drop_heads or name.startswith("mlp."):
                    out[f"{p}{name}.weight"] = weight.index_select(dim, rows)
                else:  # heads stay, zeroed
                    keep = torch.zeros(weight.shape[dim], dtype=torch.bool)
                    keep[rows] = True
                    out[f"{p}{name}.weight"] = weight.masked_fill(~(keep[:, None] if dim == 0 else keep[None, :]), 0)
            continue
        p = f"transformer.h.{i}."
        # Conv1D [in, out]: c_fc's units are output columns (and bias entries), mlp.c_proj's input rows.
        out[p + "mlp.c_fc.weight"] = state[p + "mlp.c_fc.weight"].index_select(1, units)
        out[p + "mlp.c_fc.bias"] = state[p + "mlp.c_fc.bias"].index_select(0, units)
        out[p + "mlp.c_proj.weight"] = state[p + "mlp.c_proj.weight"].index_select(0, units)
        # Heads stay, zeroed: their q, k and v columns of c_attn (and bias), their input rows of attn.c_proj.
        forget = torch.ones(d.num_attention_heads * d.kv_channels, dtype=torch.bool)
        forget[heads] = False
        qkv = forget.repeat(3)
        out[p + "attn.c_attn.weight"] = state[p + "attn.c_attn.weight"].masked_fill(qkv[None, :], 0)
        out[p + "attn.c_attn.bias"] = state[p + "attn.c_attn.bias"].masked_fill(qkv, 0)
        out[p + "attn.c_proj.weight"] = state[p + "attn.c_proj.weight"].masked_fill(forget[:, None], 0)
    return new_config, out


def _numel(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(torch.Size(s).numel() for s in shapes.values())


def summarize(cfg: ModelConfig, partition: Partition | None, pruned: bool = False) -> dict:
    """JSON-able account of Θ_F/Θ_R/Θ_J and of what ablation (and, if `pruned`, pruning) removes.

    Parameter counts are of the global state (tied embeddings counted once)."""
    shapes = native_shapes(cfg)
    counts = {"forget": 0, "retain": 0, "joint": 0}
    for name, region in global_regions(cfg, partition).items():
        forget = region.forget_numel(shapes[name])
        counts["forget"] += forget
        counts[region.region.name.lower()] += torch.Size(shapes[name]).numel() - forget
    ablated = sum(region.forget_numel(shapes[name]) for name, region in _ablated_regions(cfg, partition))
    summary: dict = {"params": {"total": _numel(shapes), **counts}, "ablated_params": ablated}
    if partition is not None:
        summary.update(
            strategy=partition.strategy, masked_layers=list(partition.masked_layers),
            forget_heads=list(partition.forget_heads), forget_query_groups=list(partition.forget_groups),
            forget_mlp_units=list(partition.forget_units), mask_embeddings=partition.mask_embeddings,
            joint_down_projections=partition.joint_down_projections,
        )
    if pruned:
        if partition is None:
            raise ValueError("cannot summarise pruning without a partition")
        before = hf_config(cfg)
        after = prune_config(before, partition)
        dropped = removes_heads(before, partition)
        hd = cfg.hidden_size // cfg.num_attention_heads
        if dropped:
            zeroed = 0
        elif hf_family(cfg) == "llama":  # q rows and o_proj columns per head, k and v rows per query group
            zeroed = 2 * hd * cfg.hidden_size * (len(partition.forget_heads) + len(partition.forget_groups))
        else:  # a gpt2 head: its q, k, v rows and biases (3 * (hidden + 1) * hd) and its proj input rows
            zeroed = len(partition.forget_heads) * hd * (4 * cfg.hidden_size + 3)
        params_before, params_after = _numel(hf_shapes(before)), _numel(hf_shapes(after))
        summary["pruned"] = {
            "hf_class": HF_CLASSES[before.model_type],
            "layers": list(range(cfg.num_layers)),
            "heads_removed": list(partition.forget_heads) if dropped else [],
            "query_groups_removed": list(partition.forget_groups) if dropped else [],
            "heads_zeroed": [] if dropped else list(partition.forget_heads),
            "mlp_units_removed": list(partition.forget_units),
            "num_attention_heads": [cfg.num_attention_heads, _hf_dims(after).num_attention_heads],
            "num_query_groups": [cfg.num_query_groups, _hf_dims(after).num_query_groups],
            "ffn_hidden_size": [cfg.ffn_hidden_size, _hf_dims(after).ffn_hidden_size],
            "params_before": params_before,
            "params_after": params_after,
            "params_removed": params_before - params_after,
            "params_zeroed": zeroed * cfg.num_layers,
        }
    return summary
