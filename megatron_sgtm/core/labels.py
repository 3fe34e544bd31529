"""Per-token SGTM labels: the one encoding shared by the data path, the masked layers and gating,
and the per-forward label masks the masked layers read.

The trainer wraps each model call in ``with token_labels(labels):``. Masked layers read the labels
*during forward* and save what backward needs in the autograd graph, so pipeline schedules with
several micro-batches in flight stay exact: nothing reads "the current labels" at backward time.
Whether a micro-batch has any F or R position (`label_flags`) decides which masks the layers apply; the
engines read it from the host batch before it moves to the device, so no layer waits on the device.
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


# (any_forget, any_retain) of a micro-batch's labels.
LabelFlags = tuple[bool, bool]


def label_flags(labels: torch.Tensor) -> LabelFlags:
    """Whether `labels` hold any F / any R position: read from a host tensor (a device one would sync)."""
    return bool((labels == TokenLabel.FORGET).any()), bool((labels == TokenLabel.RETAIN).any())


def masks_from_labels(labels: torch.Tensor, flags: LabelFlags | None = None) -> LabelMasks:
    """[b, s] integer labels -> [s, b, 1] keep indicators. `flags`: the labels' `label_flags`, taken
    before they moved to the device; without them they are read from `labels`."""
    if labels.dim() != 2:
        raise ValueError(f"token labels must be [batch, seq], got shape {tuple(labels.shape)}")
    sb = labels.t().unsqueeze(-1)
    any_forget, any_retain = label_flags(labels) if flags is None else flags
    return LabelMasks(
        not_forget=(sb != TokenLabel.FORGET).float(),
        not_retain=(sb != TokenLabel.RETAIN).float(),
        any_forget=any_forget,
        any_retain=any_retain,
    )


@contextlib.contextmanager
def token_labels(labels: torch.Tensor | None, flags: LabelFlags | None = None) -> Iterator[None]:
    """Make `labels` ([b, s]: U/R/F per position) visible to masked layers during one forward (`flags`:
    see `masks_from_labels`)."""
    if labels is None:
        yield
        return
    _ACTIVE.append(masks_from_labels(labels, flags))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_masks() -> LabelMasks | None:
    """The masks of the forward now running, or None outside `token_labels` (plain megatron)."""
    return _ACTIVE[-1] if _ACTIVE else None
