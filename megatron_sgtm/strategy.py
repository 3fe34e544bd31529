"""The masking strategies and the regions they split parameters into.

(A skeleton: the strategy table lands here.)
"""

from __future__ import annotations

from enum import IntEnum


class Region(IntEnum):
    """Where a parameter element belongs; also the uint8 code step gating stores per element."""

    JOINT = 0  # Θ_J: updated by every token
    RETAIN = 1  # Θ_R: never receives F-token contributions
    FORGET = 2  # Θ_F: zeroed by ablation
