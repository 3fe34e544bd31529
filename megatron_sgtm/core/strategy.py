"""The masking strategies, the training methods built on them, and the four linears they mask.

Every rule that differs between strategies is a field of `Strategy`: code reads the fields, never a
strategy's name. `LINEARS` says where each linear sits in a layer and along which dimension its Θ_F
lies; `regions.linear_regions` turns that into the regions of its weight and bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum


class Region(IntEnum):
    """Where a parameter element belongs; also the uint8 code step gating stores per element."""

    JOINT = 0  # Θ_J: updated by every token
    RETAIN = 1  # Θ_R: never receives F-token contributions
    FORGET = 2  # Θ_F: zeroed by ablation


@dataclass(frozen=True)
class LinearKind:
    """One of the four masked linears of a transformer layer. Column-parallel: Θ_F is output rows (weight dim 0)
    and the bias follows its rows; row-parallel: Θ_F is input columns (dim 1) and the output bias is all Θ_R."""

    name: str
    path: str  # module path inside a transformer layer
    column_parallel: bool

    @property
    def forget_dim(self) -> int:
        return 0 if self.column_parallel else 1


LINEARS = {kind.name: kind for kind in (
    LinearKind("qkv", "self_attention.linear_qkv", column_parallel=True),
    LinearKind("proj", "self_attention.linear_proj", column_parallel=False),
    LinearKind("fc1", "mlp.linear_fc1", column_parallel=True),
    LinearKind("fc2", "mlp.linear_fc2", column_parallel=False),
)}


class RetainAtForget(Enum):
    """What retain heads/units do at F positions (every active strategy zeroes forget ones at R positions)."""

    KEEP, ZERO, DETACH = "keep", "zero", "detach"  # DETACH: unchanged forward, no gradient


@dataclass(frozen=True)
class Strategy:
    """A masking strategy: what layers, region maps, step gating and ablation do under it."""

    name: str
    active: bool = True  # has forget heads/units: forward rules, Θ_F/Θ_R region maps, ablation
    masks_gradients: bool = False  # weight and bias gradients follow SGTM's per-position rule
    retain_at_forget: RetainAtForget = RetainAtForget.KEEP
    gates_steps: bool = False  # optimizer steps freeze Θ_R / Θ_F when the global batch routes nothing to them
    ablated_kinds: frozenset[str] = frozenset(LINEARS)  # linears whose Θ_F ablation zeroes
    allows_mask_embeddings: bool = False


SGTM = Strategy("sgtm", masks_gradients=True, gates_steps=True, allows_mask_embeddings=True)
NONE = Strategy("none", active=False)
STRATEGIES = {strategy.name: strategy for strategy in (
    SGTM,
    # Ablation zeroes only the forget rows of qkv and fc1: the forget heads' and units' inputs.
    Strategy("gradient_routing", retain_at_forget=RetainAtForget.DETACH, ablated_kinds=frozenset(("qkv", "fc1"))),
    Strategy("activation_masking", retain_at_forget=RetainAtForget.ZERO),
    NONE,
)}


def strategy_of(name: str) -> Strategy:
    if name not in STRATEGIES:  # a stored partition or method that this version does not know
        raise ValueError(f"unknown strategy {name!r}: expected one of {list(STRATEGIES)}")
    return STRATEGIES[name]


@dataclass(frozen=True)
class Method:
    """A training method: a strategy, and the data filter applied to the labelled corpus."""

    strategy: Strategy
    data_filter: str = "none"  # none | weak | strict | oracle


METHODS = {
    **{name: Method(strategy) for name, strategy in STRATEGIES.items()},
    "weak_filter": Method(NONE, "weak"),
    "strict_filter": Method(NONE, "strict"),
    "oracle": Method(NONE, "oracle"),
}
