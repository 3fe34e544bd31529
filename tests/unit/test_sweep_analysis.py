"""The leakage and compute-penalty math on synthetic curves whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest

from megatron_sgtm.sweep.analysis import (
    AnalysisError,
    Bounded,
    compute_penalty,
    equivalent_tokens,
    fit_power_law,
    leakage,
    mean_std,
    reading_band,
    training_compute,
    unresolved_segments,
)


def test_an_exact_power_law_is_recovered():
    compute = [1e15, 3e15, 1e16, 4e16, 1e17]
    law = fit_power_law(compute, [3.7 * c ** -0.07 for c in compute])
    assert law.a == pytest.approx(3.7, rel=1e-9) and law.b == pytest.approx(0.07, rel=1e-9) and law.points == 5
    assert law.compute(law.loss(2e16)) == pytest.approx(2e16, rel=1e-9)


def test_least_squares_in_log_space_averages_the_noise():
    # Multiplicative noise of ±1% at alternate points cancels in log space: the fit is the true law.
    compute = [1e15, 1e15, 1e16, 1e16]
    law = fit_power_law(compute, [2.0 * c ** -0.1 * f for c, f in zip(compute, [1.01, 1 / 1.01] * 2)])
    assert (law.a, law.b) == (pytest.approx(2.0), pytest.approx(0.1))


def test_a_method_at_the_loss_of_half_the_compute_has_penalty_one_half():
    law = fit_power_law([1e15, 1e16, 1e17], [5.0 * c ** -0.05 for c in (1e15, 1e16, 1e17)])
    base = training_compute(params=1e6, tokens=2e7)
    assert base == 1.2e14
    assert compute_penalty(law, law.loss(base / 2), base) == pytest.approx(0.5)
    assert compute_penalty(law, law.loss(base), base) == pytest.approx(0.0, abs=1e-9)
    assert compute_penalty(law, law.loss(2 * base), base) == pytest.approx(-1.0)  # better than standard: negative


def test_a_fit_needs_two_compute_values_and_a_falling_loss():
    with pytest.raises(AnalysisError, match="2 or more compute values"):
        fit_power_law([1e15, 1e15], [3.0, 3.1])
    with pytest.raises(AnalysisError, match="does not fall with compute"):
        fit_power_law([1e15, 1e16], [3.0, 3.1])
    with pytest.raises(AnalysisError, match="2 or more compute values"):  # missing losses are left out
        fit_power_law([1e15, 1e16], [3.0, math.nan])


# Forget loss 4.0 at 0 forget tokens falling linearly to 2.0 at 1e6 tokens (slope 2e-6 per token).
LINEAR = [(0.0, 4.0), (2.5e5, 3.5), (5e5, 3.0), (1e6, 2.0)]


def test_leakage_on_a_linear_curve_is_the_known_ratio():
    # Loss 3.8 = 4.0 - 2e-6 * 1e5: 1e5 equivalent tokens; over 1e7 undiscovered tokens, 0.01.
    assert equivalent_tokens(LINEAR, 3.8).value == pytest.approx(1e5)
    result = leakage(LINEAR, 3.8, 1e7)
    assert result.value == pytest.approx(0.01) and result.bound == ""
    assert leakage(LINEAR, 2.5, 7.5e5).value == pytest.approx(1.0)  # a filter: all it saw, it learned
    assert equivalent_tokens(LINEAR, 3.5) == Bounded(2.5e5)  # on a point


def test_interpolation_is_linear_in_tokens_between_the_two_points_around_the_loss():
    curve = [(1e3, 5.0), (1e5, 3.0)]  # linear in tokens, not in log tokens
    assert equivalent_tokens(curve, 4.0).value == pytest.approx(50_500)
    shuffled = [(1e5, 3.0), (1e3, 5.0), (1e4, 4.0)]
    assert equivalent_tokens(shuffled, 3.5).value == pytest.approx(55_000)


def test_log_token_interpolation_recovers_a_loss_linear_in_log_tokens():
    # loss = 6 - 0.5 ln(t): exactly linear in log tokens, so the log reading is exact between points far apart
    # where the linear reading is not (at loss 6 - 0.5 ln(3e4) the linear one says 1e3 + 99e3 * share).
    curve = [(0.0, 6.5), *((t, 6 - 0.5 * math.log(t)) for t in (1e3, 1e4, 1e5))]
    loss = 6 - 0.5 * math.log(3e4)
    assert equivalent_tokens(curve, loss, log_tokens=True).value == pytest.approx(3e4, rel=1e-9)
    share = (loss - curve[2][1]) / (curve[3][1] - curve[2][1])  # on the segment 1e4 .. 1e5
    assert equivalent_tokens(curve, loss).value == pytest.approx(1e4 + 9e4 * share)
    assert equivalent_tokens(curve, loss).value > 3e4 * 1.2  # linear overstates inside a convex segment
    # a segment from 0 tokens has no log: it stays linear (halfway in loss is halfway in tokens)
    assert equivalent_tokens(curve, (6.5 + curve[1][1]) / 2, log_tokens=True).value == pytest.approx(500)
    assert leakage(curve, loss, 6e4, log_tokens=True).value == pytest.approx(0.5)


def test_the_reading_band_is_the_reading_on_the_curve_moved_by_its_standard_errors():
    # Linear curve 4.0 -> 2.0 over 1e6 tokens, every point's standard error 0.1 nat: the loss 3.0 reads 5e5
    # tokens on the curve, 4.5e5 on the curve 0.1 lower (it reaches 3.0 sooner) and 5.5e5 on the one 0.1 higher.
    curve = [(t, v, 0.1) for t, v in LINEAR]
    assert reading_band(curve, 3.0) == (Bounded(pytest.approx(4.5e5)), Bounded(pytest.approx(5.5e5)))
    assert reading_band(curve, 3.95)[0] == Bounded(0.0, "<")  # above the lowered curve's start: only a bound
    assert unresolved_segments(curve) == []
    flat = [(0.0, 4.0, 0.05), (1e5, 3.92, 0.05), (2e5, 3.0, 0.05)]  # first drop 0.08 < 0.05 + 0.05
    assert unresolved_segments(flat) == [(0.0, 1e5)]
    assert reading_band([(0.0, 4.0, 0.2), (1e5, 3.7, 0.2)], 3.85) == (Bounded(0.0, "<"), Bounded(1e5, ">"))
    # a point of one seed has no standard error (NaN): nothing next to it is resolved
    single = [(0.0, 4.0, 0.05), (1e5, 3.0, math.nan), (2e5, 2.0, 0.05)]
    assert unresolved_segments(single) == [(0.0, 1e5), (1e5, 2e5)]
    # moved up by its errors this curve no longer falls (4.0 -> 4.1): only "more than its most tokens" is known
    assert reading_band([(0.0, 4.0, 0.0), (1e5, 3.9, 0.2)], 3.95)[1] == Bounded(1e5, ">")


def test_outside_the_curve_only_a_bound_is_known():
    above = leakage(LINEAR, 4.3, 1e7)  # forgets more than a model that never saw forget data
    assert above == Bounded(0.0, "<") and str(above) == "<0"
    below = equivalent_tokens(LINEAR, 1.5)  # knows more than the model with the most forget tokens
    assert below == Bounded(1e6, ">") and str(below) == ">1e+06"
    assert str(leakage(LINEAR[1:], 3.9, 1e7)) == "<0.025"


def test_a_noisy_curve_is_read_on_its_first_segment_that_encloses_the_loss():
    bumpy = [(0.0, 4.0), (1e5, 3.0), (2e5, 3.2), (3e5, 2.0)]
    assert equivalent_tokens(bumpy, 3.1).value == pytest.approx(9e4)


def test_a_curve_that_does_not_fall_or_has_one_point_is_refused():
    with pytest.raises(AnalysisError, match="does not fall with forget tokens"):
        equivalent_tokens([(0.0, 3.0), (1e5, 3.2)], 3.1)
    with pytest.raises(AnalysisError, match="2 or more token counts"):
        equivalent_tokens([(1e5, 3.0)], 3.0)
    with pytest.raises(AnalysisError, match="undiscovered forget tokens > 0"):
        leakage(LINEAR, 3.0, 0)


def test_mean_and_sample_std_ignore_missing_values():
    assert mean_std([1.0, 3.0, math.nan]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert mean_std([2.5]) == (2.5, 0.0, 1)
    mean, std, n = mean_std([])
    assert math.isnan(mean) and math.isnan(std) and n == 0
