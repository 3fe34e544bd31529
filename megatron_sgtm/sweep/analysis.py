"""The paper's derived numbers as pure functions of losses, token counts and compute (no files, no torch).

- Leakage (§4.3, App. G): standard (`none`) models trained on all retain data plus N forget tokens give
  forget loss as a function of N. A run's *equivalent forget tokens* are that curve read backwards at
  the run's forget loss, by interpolation between the two curve points around it, linear in tokens (the
  paper's choice) or in log tokens (loss falls about linearly in log tokens, so a linear reading between
  points far apart overstates the tokens); leakage = equivalent tokens / undiscovered forget tokens the
  run saw. Outside the curve's range the answer is a bound ("<" or ">" the curve's end), never an
  extrapolation. The curve is itself a mean over seeds: `reading_band` reads the loss on the curve moved
  up and down by each point's standard error, the range the curve's own noise allows.
- Compute penalty (App. B): fit loss = a * C^(-b) to the `none` runs across sizes by least squares in
  log space; a method's loss then has an equivalent compute C_eq = (loss / a)^(-1/b), and its penalty
  is (C_base - C_eq) / C_base with C_base = 6 * N * D of the run itself (positive: the method costs
  compute). Which N (total or non-embedding parameters) is the caller's choice; see `report`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class AnalysisError(ValueError):
    """Data that a fit or an interpolation cannot use (too few points, a curve that does not fall)."""


@dataclass(frozen=True)
class Bounded:
    """A value, or a bound on it where the data only says it is below ("<") or above (">") `value`."""

    value: float
    bound: str = ""  # "" | "<" | ">"

    def scaled(self, factor: float) -> Bounded:
        """The value times a positive factor (the bound keeps its direction)."""
        return Bounded(self.value * factor, self.bound)

    def __str__(self) -> str:
        return f"{self.bound}{self.value:.3g}"


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for a single value) and count of the finite values."""
    xs = [v for v in values if math.isfinite(v)]
    if not xs:
        return math.nan, math.nan, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


def equivalent_tokens(curve: Sequence[tuple[float, float]], loss: float, log_tokens: bool = False) -> Bounded:
    """Forget tokens a standard model needs to reach `loss`, from `curve` = [(forget tokens, forget loss)].

    Between the curve's fewest-token and most-token points the answer is interpolated on the first segment
    (by tokens) whose losses enclose `loss`: linearly in tokens, or with `log_tokens` linearly in log tokens
    (a segment that starts at 0 tokens has no log and stays linear). A loss above the fewest-token point's is
    "< its tokens", one below the most-token point's "> its tokens"."""
    points = sorted(curve)
    if len(points) < 2 or len({t for t, _ in points}) < 2:
        raise AnalysisError(f"a leakage curve needs points at 2 or more token counts, got {points}")
    (t_first, l_first), (t_last, l_last) = points[0], points[-1]
    if not l_first > l_last:
        raise AnalysisError(f"the forget loss does not fall with forget tokens ({l_first:.4g} at {t_first:.4g} "
                            f"tokens, {l_last:.4g} at {t_last:.4g})")
    if loss > l_first:
        return Bounded(t_first, "<")
    if loss < l_last:
        return Bounded(t_last, ">")
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if min(l0, l1) <= loss <= max(l0, l1):
            share = 0.0 if l0 == l1 else (loss - l0) / (l1 - l0)
            if log_tokens and t0 > 0:
                return Bounded(math.exp(math.log(t0) + (math.log(t1) - math.log(t0)) * share))
            return Bounded(t0 + (t1 - t0) * share)
    raise AssertionError("unreachable: a continuous curve from l_first to l_last passes every loss between")


def leakage(curve: Sequence[tuple[float, float]], loss: float, undiscovered_tokens: float,
            log_tokens: bool = False) -> Bounded:
    """Equivalent forget tokens per undiscovered forget token the run trained on."""
    if not undiscovered_tokens > 0:
        raise AnalysisError(f"leakage needs undiscovered forget tokens > 0, got {undiscovered_tokens}")
    return equivalent_tokens(curve, loss, log_tokens).scaled(1 / undiscovered_tokens)


def reading_band(curve: Sequence[tuple[float, float, float]], loss: float, log_tokens: bool = False
                 ) -> tuple[Bounded, Bounded]:
    """The equivalent tokens of `loss` on `curve` = [(tokens, mean loss, standard error)] moved down and up by
    each point's standard error: (fewest, most) tokens the curve's noise allows (a higher curve reaches
    `loss` later). A curve the shift stops falling reads as the bound of its side, "<" the fewest-token or
    ">" the most-token point: the curve cannot resolve this loss."""
    def read(sign: int, side: Bounded) -> Bounded:
        try:
            return equivalent_tokens([(t, v + sign * e) for t, v, e in curve], loss, log_tokens)
        except AnalysisError:
            return side
    tokens = sorted(t for t, _, _ in curve)
    return read(-1, Bounded(tokens[0], "<")), read(+1, Bounded(tokens[-1], ">"))


def unresolved_segments(curve: Sequence[tuple[float, float, float]]) -> list[tuple[float, float]]:
    """(tokens, tokens) of each pair of neighbouring curve points whose loss drop is not larger than the sum
    of their standard errors: the seeds' noise is as large as the curve's slope there, so a reading between
    them says little."""
    points = sorted(curve)
    return [(t0, t1) for (t0, l0, e0), (t1, l1, e1) in zip(points, points[1:]) if not l0 - l1 > e0 + e1]


@dataclass(frozen=True)
class PowerLaw:
    """loss = a * compute^(-b)."""

    a: float
    b: float
    points: int

    def loss(self, compute: float) -> float:
        return self.a * compute ** -self.b

    def compute(self, loss: float) -> float:
        return (loss / self.a) ** (-1 / self.b)


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    """Least squares of log(loss) = log(a) - b log(compute)."""
    pairs = [(math.log(c), math.log(v)) for c, v in zip(compute, loss) if c > 0 and v > 0 and math.isfinite(v)]
    if len({x for x, _ in pairs}) < 2:
        raise AnalysisError(f"a power-law fit needs positive losses at 2 or more compute values, got {len(pairs)} "
                            f"point(s)")
    n = len(pairs)
    mx, my = sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n
    slope = sum((x - mx) * (y - my) for x, y in pairs) / sum((x - mx) ** 2 for x, _ in pairs)
    if not slope < 0:
        raise AnalysisError(f"the loss does not fall with compute (log-log slope {slope:.3g})")
    return PowerLaw(a=math.exp(my - slope * mx), b=-slope, points=n)


def training_compute(params: float, tokens: float) -> float:
    """C = 6 N D (forward and backward FLOPs of a dense transformer)."""
    return 6.0 * params * tokens


def compute_penalty(law: PowerLaw, loss: float, compute: float) -> float:
    """(C_base - C_eq) / C_base: the share of its own compute a run lost (positive) or gained (negative)
    relative to a standard model that reaches `loss`."""
    return 1.0 - law.compute(loss) / compute
