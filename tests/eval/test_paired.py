"""Paired differences over seeds: the t quantile, mean and sd, and the 95% interval."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.eval.paired import mean_sd, paired_difference, regularized_beta, t_cdf, t_quantile_975


@pytest.mark.parametrize(
    "df, table",
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045), (30, 2.042), (120, 1.980), (10**6, 1.960)],
)
def test_t_quantile_matches_the_table(df, table):
    assert abs(t_quantile_975(df) - table) < 5e-4


def test_t_quantile_decreases_towards_the_normal_value():
    qs = [t_quantile_975(df) for df in (1, 2, 5, 10, 50, 1000, 10**5)]
    assert qs == sorted(qs, reverse=True)
    assert abs(qs[-1] - 1.959964) < 1e-4  # the normal 97.5% quantile


def test_t_cdf_is_symmetric_and_known_in_closed_form():
    # df = 1 is the Cauchy distribution: P(T <= t) = 1/2 + atan(t) / pi
    for t in (-3.0, -0.5, 0.0, 0.7, 12.706):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    # df = 2: P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-1.0, 0.3, 4.303):
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_cdf(1.3, 7) + t_cdf(-1.3, 7) == pytest.approx(1.0, abs=1e-14)


def test_regularized_beta_known_values():
    assert regularized_beta(1.0, 1.0, 0.3) == pytest.approx(0.3)  # uniform
    assert regularized_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248)  # 6x^2 - 8x^3 + 3x^4 at 0.4
    assert regularized_beta(2.5, 0.5, 0.0) == 0.0 and regularized_beta(2.5, 0.5, 1.0) == 1.0


@pytest.mark.parametrize("df", [0, -1, 2.5, True])
def test_t_quantile_rejects_bad_degrees_of_freedom(df):
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(df)


def test_hand_computed_example():
    # a     = 0.30 0.32 0.35 0.31 0.33   mean 0.322
    # b     = 0.25 0.30 0.29 0.27 0.31   mean 0.284
    # d=a-b = 0.05 0.02 0.06 0.04 0.02   mean 0.038
    # d - mean = 0.012 -0.018 0.022 0.002 -0.018; squares sum to 0.00128; / (5 - 1) = 0.00032
    # sd = sqrt(0.00032) = 0.0178885;  se = sd / sqrt(5) = sqrt(0.000064) = 0.008
    # t(0.975, 4) = 2.776445;  half width = 2.776445 * 0.008 = 0.0222116
    # interval = [0.038 - 0.0222116, 0.038 + 0.0222116] = [0.0157884, 0.0602116]: excludes 0
    r = paired_difference([0.30, 0.32, 0.35, 0.31, 0.33], [0.25, 0.30, 0.29, 0.27, 0.31])
    assert r.n == 5
    assert r.mean_a == pytest.approx(0.322) and r.mean_b == pytest.approx(0.284)
    assert r.diff_mean == pytest.approx(0.038)
    assert r.diff_sd == pytest.approx(math.sqrt(0.00032))
    assert r.ci_low == pytest.approx(0.0157884, abs=1e-6) and r.ci_high == pytest.approx(0.0602116, abs=1e-6)
    assert r.excludes_zero
    assert r.format() == "+0.038 [+0.016, +0.060]"
    assert r.format(4) == "+0.0380 [+0.0158, +0.0602]"
    flipped = paired_difference([0.25, 0.30, 0.29, 0.27, 0.31], [0.30, 0.32, 0.35, 0.31, 0.33])
    assert flipped.format() == "-0.038 [-0.060, -0.016]" and flipped.excludes_zero


def test_identical_inputs_give_a_zero_width_interval_at_zero():
    xs = [0.1, 0.7, 0.3, 0.9]
    r = paired_difference(xs, list(xs))
    assert (r.diff_mean, r.diff_sd, r.ci_low, r.ci_high) == (0.0, 0.0, 0.0, 0.0)
    assert not r.excludes_zero
    assert r.format() == "+0.000 [+0.000, +0.000]"


def test_lengths_are_checked():
    with pytest.raises(ValueError, match="equal lengths, got 3 and 2"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2 pairs, got lengths 1 and 1"):
        paired_difference([1.0], [2.0])


def test_mean_sd():
    assert mean_sd([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == pytest.approx((5.0, math.sqrt(32 / 7)))
    assert mean_sd([0.1, 0.1, 0.1]) == (0.1, 0.0)
    m, s = mean_sd([3.0])
    assert m == 3.0 and math.isnan(s)
    assert all(math.isnan(v) for v in mean_sd([1.0, math.nan]))
    with pytest.raises(ValueError):
        mean_sd([])


def test_a_diverged_run_never_excludes_zero():
    r = paired_difference([1.0, math.nan, 2.0], [0.0, 0.0, 0.0])
    assert math.isnan(r.diff_mean) and not r.excludes_zero


values = st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(diffs=st.lists(values, min_size=2, max_size=12), scale=st.floats(1.5, 10.0))
def test_interval_contains_the_mean_and_widens_with_the_spread(diffs, scale):
    zeros = [0.0] * len(diffs)
    r = paired_difference(diffs, zeros)
    assert r.ci_low <= r.diff_mean <= r.ci_high
    centre = r.diff_mean
    wider = paired_difference([centre + scale * (d - centre) for d in diffs], zeros)
    assert wider.ci_low <= wider.diff_mean <= wider.ci_high
    width, wider_width = r.ci_high - r.ci_low, wider.ci_high - wider.ci_low
    assert wider_width == pytest.approx(scale * width, rel=1e-6, abs=1e-9)
    if r.diff_sd > 1e-6:
        assert wider_width > width
