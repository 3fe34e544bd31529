"""The SGTM partition: which heads and MLP units of which layers hold the forget domain.

`SGTMConfig` is what users write; `SGTMConfig.resolve(dims)` validates it against a model and
returns a `Partition` of *global* index sets (independent of TP/PP, so a resharded checkpoint keeps
its partition). `Partition.shard(tp_rank, tp_size)` gives the rows/columns each TP rank holds.

Megatron's own sharding is already partition-aware: query group g's q/k/v rows and its heads'
`linear_proj` columns live on rank ``g // (groups / tp)``, and MLP unit u's `linear_fc1` rows
(gate and up) and `linear_fc2` column live on rank ``u // (ffn / tp)``. Masking and ablation are
therefore local to each rank and need no communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from megatron_sgtm.core.strategy import SGTM, STRATEGIES, LinearKind, Strategy, strategy_of
from megatron_sgtm.errors import UserError

# Paper defaults: 1 of 32 heads and 64 of 2048 MLP units per layer.
DEFAULT_HEAD_FRACTION = 1 / 32
DEFAULT_UNIT_FRACTION = 64 / 2048


class PartitionError(UserError, ValueError):
    """A partition setting that does not fit the model; the message names the setting."""


@dataclass(frozen=True)
class ModelDims:
    """The model shape a partition is resolved against."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    kv_channels: int
    gated_mlp: bool

    @classmethod
    def from_transformer_config(cls, config) -> ModelDims:
        """The shape of a megatron-core `TransformerConfig` (a user's own script resolves its partition here)."""
        return cls(num_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
                   num_query_groups=config.num_query_groups or config.num_attention_heads,
                   ffn_hidden_size=config.ffn_hidden_size, kv_channels=config.kv_channels,
                   gated_mlp=bool(config.gated_linear_unit))

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


@dataclass
class SGTMConfig:
    """User-facing SGTM settings (the ``sgtm:`` section of a training config).

    forget_heads / forget_mlp_units: a count (the last heads/units of each masked layer, as in
    the paper) or an explicit list of global indices. forget_param_fraction derives both counts
    instead. With GQA a forget set must consist of whole query groups, since K/V are shared
    inside a group. masked_layers: 0-based layer indices; None masks every layer.
    joint_down_projections: the paper's variant whose attention output projections (linear_proj) and MLP
    down-projections (linear_fc2), weights and biases, are Θ_J (no masked gradient, not ablated); ablation
    still silences the forget heads and units through their Θ_F qkv / fc1 rows.
    """

    strategy: str = SGTM.name
    masked_layers: list[int] | None = None
    forget_heads: int | list[int] | None = None
    forget_mlp_units: int | list[int] | None = None
    forget_param_fraction: float | None = None
    mask_embeddings: bool = False
    joint_down_projections: bool = False

    def resolve(self, dims: ModelDims) -> Partition:
        if self.strategy not in STRATEGIES:
            raise PartitionError(f"sgtm.strategy={self.strategy!r}: expected one of {tuple(STRATEGIES)}")
        if self.mask_embeddings and not STRATEGIES[self.strategy].allows_mask_embeddings:
            allowed = ", ".join(repr(name) for name, s in STRATEGIES.items() if s.allows_mask_embeddings)
            raise PartitionError(f"sgtm.mask_embeddings applies to strategy {allowed} only")
        strategy = STRATEGIES[self.strategy]
        changes = strategy.active and (strategy.masks_gradients or bool({"proj", "fc2"} & strategy.ablated_kinds))
        if self.joint_down_projections and not changes:
            reason = "has no forget heads/units" if not strategy.active else "already keeps them joint (never ablated)"
            raise PartitionError(f"sgtm.joint_down_projections: strategy {self.strategy!r} {reason}, so the variant "
                                 "changes nothing")
        _check_model(dims)
        masked = _resolve_layers(self.masked_layers, dims.num_layers)
        fraction = self.forget_param_fraction
        if fraction is not None:
            if self.forget_heads is not None or self.forget_mlp_units is not None:
                raise PartitionError("sgtm.forget_param_fraction derives forget_heads and forget_mlp_units; "
                                     "set either the fraction or the explicit settings, not both")
            if not 0.0 < fraction < 1.0:
                raise PartitionError(f"sgtm.forget_param_fraction={fraction} must lie in (0, 1)")
        head_fraction = DEFAULT_HEAD_FRACTION if fraction is None else fraction
        unit_fraction = DEFAULT_UNIT_FRACTION if fraction is None else fraction
        groups = _default_count(dims.num_query_groups, head_fraction)
        heads = _resolve_indices("sgtm.forget_heads", self.forget_heads, dims.num_attention_heads,
                                 default_count=groups * dims.heads_per_group)
        _check_whole_groups(heads, dims)
        units = _resolve_indices("sgtm.forget_mlp_units", self.forget_mlp_units, dims.ffn_hidden_size,
                                 default_count=_default_count(dims.ffn_hidden_size, unit_fraction))
        return Partition(strategy=self.strategy, dims=dims, masked_layers=masked, forget_heads=heads,
                         forget_units=units, mask_embeddings=self.mask_embeddings,
                         joint_down_projections=self.joint_down_projections)


def _check_model(dims: ModelDims) -> None:
    if dims.num_attention_heads % dims.num_query_groups:
        raise PartitionError(f"num_query_groups={dims.num_query_groups} must divide "
                             f"num_attention_heads={dims.num_attention_heads}")


def _resolve_layers(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise PartitionError(f"sgtm.masked_layers: {bad} out of range [0, {num_layers})")
    if len(set(layers)) != len(layers):
        raise PartitionError(f"sgtm.masked_layers: duplicate entries in {list(layers)}")
    return tuple(sorted(layers))


def _default_count(total: int, fraction: float) -> int:
    return max(1, round(total * fraction))


def _resolve_indices(
    name: str, value: int | Sequence[int] | None, total: int, default_count: int
) -> tuple[int, ...]:
    if value is None:
        value = default_count
    if isinstance(value, bool):
        raise PartitionError(f"{name}={value!r}: expected a count or a list of indices")
    if isinstance(value, int):
        if not 0 < value < total:
            raise PartitionError(
                f"{name}={value}: the count must be at least 1 and below the layer's {total} "
                "(at least one retain unit must remain)"
            )
        return tuple(range(total - value, total))
    indices = [int(i) for i in value]
    if not indices:
        raise PartitionError(f"{name}: the index list is empty")
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        raise PartitionError(f"{name}: indices {bad} out of range [0, {total})")
    if len(set(indices)) != len(indices):
        raise PartitionError(f"{name}: duplicate indices in {indices}")
    if len(indices) >= total:
        raise PartitionError(f"{name}: all {total} are forget; at least one retain unit must remain")
    return tuple(sorted(indices))


def _check_whole_groups(heads: tuple[int, ...], dims: ModelDims) -> None:
    per_group = dims.heads_per_group
    if per_group == 1:
        return
    chosen = set(heads)
    for head in heads:
        group = head // per_group
        members = set(range(group * per_group, (group + 1) * per_group))
        if not members <= chosen:
            raise PartitionError(
                f"sgtm.forget_heads: with GQA ({dims.num_attention_heads} heads in "
                f"{dims.num_query_groups} query groups) forget heads must be whole query groups; "
                f"head {head} is in group {group} = heads {sorted(members)}, which is only partly "
                "forget"
            )


@dataclass(frozen=True)
class ShardIndex:
    """Boolean forget indicators of the rows/columns one TP rank holds, per SGTM linear."""

    qkv_rows: torch.Tensor  # linear_qkv output rows (q, k, v of each local query group)
    proj_cols: torch.Tensor  # linear_proj input columns (context of each local head)
    fc1_rows: torch.Tensor  # linear_fc1 output rows ([gate; up] when gated)
    fc2_cols: torch.Tensor  # linear_fc2 input columns (one per local MLP unit)

    def for_kind(self, kind: str) -> torch.Tensor:
        """The indicator of linear kind `kind` (a key of `strategy.LINEARS`)."""
        return {"qkv": self.qkv_rows, "proj": self.proj_cols, "fc1": self.fc1_rows, "fc2": self.fc2_cols}[kind]


@dataclass(frozen=True)
class Partition:
    """Resolved global forget index sets; the same at every parallel layout."""

    strategy: str
    dims: ModelDims
    masked_layers: tuple[int, ...]
    forget_heads: tuple[int, ...]
    forget_units: tuple[int, ...]
    mask_embeddings: bool = False
    joint_down_projections: bool = False
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    @property
    def rules(self) -> Strategy:
        return strategy_of(self.strategy)

    @property
    def active(self) -> bool:
        return self.rules.active

    def is_masked(self, layer: int) -> bool:
        return layer in self.masked_layers

    def splits(self, kind: LinearKind) -> bool:
        """Whether a masked layer's linear `kind` has Θ_F lines (the rest Θ_R); if not it is all Θ_J. The one
        rule that region maps, ablation, pruning and the layers' gradient masking follow."""
        return kind.column_parallel or not self.joint_down_projections

    @property
    def forget_groups(self) -> tuple[int, ...]:
        per = self.dims.heads_per_group
        return tuple(sorted({h // per for h in self.forget_heads}))

    def check_tp(self, tp_size: int) -> None:
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(self.dims, name) % tp_size:
                raise PartitionError(f"tensor_model_parallel_size={tp_size} does not divide "
                                     f"{name}={getattr(self.dims, name)}")

    def shard(self, tp_rank: int, tp_size: int) -> ShardIndex:
        """Forget indicators for the rows/columns held by TP rank `tp_rank` of `tp_size`."""
        key = (tp_rank, tp_size)
        if key not in self._cache:
            self.check_tp(tp_size)
            self._cache[key] = self._shard(tp_rank, tp_size)
        return self._cache[key]

    def _shard(self, tp_rank: int, tp_size: int) -> ShardIndex:
        d = self.dims
        hd = d.kv_channels
        groups_local = d.num_query_groups // tp_size
        heads_local = d.num_attention_heads // tp_size
        units_local = d.ffn_hidden_size // tp_size

        group = _local_indicator(self.forget_groups, tp_rank, groups_local)
        # Each local query group owns a contiguous block of (heads_per_group + 2) * hd qkv rows.
        qkv_rows = group.repeat_interleave((d.heads_per_group + 2) * hd)
        proj_cols = _local_indicator(self.forget_heads, tp_rank, heads_local).repeat_interleave(hd)
        unit = _local_indicator(self.forget_units, tp_rank, units_local)
        fc1_rows = torch.cat([unit, unit]) if d.gated_mlp else unit
        return ShardIndex(qkv_rows=qkv_rows, proj_cols=proj_cols, fc1_rows=fc1_rows, fc2_cols=unit)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "dims": asdict(self.dims), "masked_layers": list(self.masked_layers),
                "forget_heads": list(self.forget_heads), "forget_units": list(self.forget_units),
                "mask_embeddings": self.mask_embeddings, "joint_down_projections": self.joint_down_projections}

    @classmethod
    def from_dict(cls, data: dict) -> Partition:
        return cls(strategy=data["strategy"], dims=ModelDims(**data["dims"]),
                   masked_layers=tuple(data["masked_layers"]), forget_heads=tuple(data["forget_heads"]),
                   forget_units=tuple(data["forget_units"]), mask_embeddings=bool(data["mask_embeddings"]),
                   joint_down_projections=bool(data.get("joint_down_projections", False)))  # older: absent


def _local_indicator(global_indices: Sequence[int], rank: int, per_rank: int) -> torch.Tensor:
    start = rank * per_rank
    out = torch.zeros(per_rank, dtype=torch.bool)
    for i in global_indices:
        if start <= i < start + per_rank:
            out[i - start] = True
    return out
