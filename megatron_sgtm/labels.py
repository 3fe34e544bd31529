"""Per-token SGTM labels: the one encoding shared by the data path, the masked layers and gating,
and the per-forward label masks the masked layers read.

The trainer wraps each model call in ``with token_labels(labels):``. Masked layers read the labels
*during forward* and save what backward needs in the autograd graph, so pipeline schedules with
several micro-batches in flight stay exact: nothing reads "the current labels" at backward time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

import torch


class TokenLabel(IntEnum):
    """What the classifier said about a token's document (stored as uint8 in batches)."""

    UNLABELED = 0  # U: everything not confidently labelled (incl. undiscovered forget data)
    RETAIN = 1  # R: confidently safe and sampled for masking
    FORGET = 2  # F: confidently in the forget domain


@dataclass(frozen=True)
class LabelMasks:
    """Position indicators in megatron's [s, b, 1] activation layout (1.0 = keep, 0.0 = drop)."""

    not_forget: torch.Tensor  # positions whose contributions may reach Θ_R
    not_retain: torch.Tensor  # positions whose contributions may reach Θ_F
    any_forget: bool
    any_retain: bool

    def to(self, dtype: torch.dtype) -> LabelMasks:
        if self.not_forget.dtype == dtype:
            return self
        return LabelMasks(self.not_forget.to(dtype), self.not_retain.to(dtype), self.any_forget, self.any_retain)

    def seq_slice(self, rank: int, size: int) -> LabelMasks:
        """The rows of sequence-parallel rank `rank` (tensors after a reduce-scatter)."""
        s = self.not_forget.shape[0] // size
        rows = slice(rank * s, (rank + 1) * s)
        return LabelMasks(self.not_forget[rows], self.not_retain[rows], self.any_forget, self.any_retain)


_ACTIVE: list[LabelMasks] = []


def masks_from_labels(labels: torch.Tensor) -> LabelMasks:
    """[b, s] integer labels -> [s, b, 1] keep indicators."""
    if labels.dim() != 2:
        raise ValueError(f"token labels must be [batch, seq], got shape {tuple(labels.shape)}")
    sb = labels.t().unsqueeze(-1)
    is_forget = sb == TokenLabel.FORGET
    is_retain = sb == TokenLabel.RETAIN
    return LabelMasks(
        not_forget=(~is_forget).float(),
        not_retain=(~is_retain).float(),
        any_forget=bool(is_forget.any()),
        any_retain=bool(is_retain.any()),
    )


@contextlib.contextmanager
def token_labels(labels: torch.Tensor | None) -> Iterator[None]:
    """Make `labels` ([b, s]: U/R/F per position) visible to masked layers during one forward."""
    if labels is None:
        yield
        return
    _ACTIVE.append(masks_from_labels(labels))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_masks() -> LabelMasks | None:
    """The masks of the forward now running, or None outside `token_labels` (plain megatron)."""
    return _ACTIVE[-1] if _ACTIVE else None
