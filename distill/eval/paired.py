"""Paired comparisons over seeds: the mean paired difference and its 95% t-interval.

The project's evidence standard: a claim that method A beats method B needs paired seeds
(same data and init per seed, only the method differs), at least 3 of them, the mean, the
spread and the paired difference with its 95% confidence interval.

For seeds i = 1..n with scores a_i and b_i, the differences d_i = a_i - b_i have mean d and
sample standard deviation s (n - 1 in the denominator); the interval is

    d +- t_{0.975, n-1} * s / sqrt(n)

with t_{0.975, n-1} the two-sided 95% critical value of Student's t with n - 1 degrees of
freedom. Pure Python (no numpy or scipy): the t quantile inverts the t CDF by bisection,
the CDF coming from the regularized incomplete beta function, evaluated by its continued
fraction (modified Lentz).
"""

import math
import statistics
from dataclasses import dataclass

_EPS = 1e-15  # relative convergence of the continued fraction
_TINY = 1e-300  # stands in for a zero denominator in Lentz's method
_MAX_TERMS = 100_000  # the fraction needs O(sqrt(max(a, b))) terms; df = 1e6 needs a few thousand


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction K of I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * K, where

        K = 1 / (1 + c_1 / (1 + c_2 / (1 + ...)))
        c_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        c_{2m}   = m (b - m) x / ((a + 2m - 1)(a + 2m))

    evaluated front to back by the modified Lentz method (f_j = f_{j-1} C_j D_j). It
    converges fast for x < (a + 1) / (a + b + 2); the caller uses the symmetry otherwise."""
    f, c, d = _TINY, _TINY, 0.0
    for j in range(1, _MAX_TERMS):
        if j == 1:
            num = 1.0
        else:
            k = j - 1  # the index of c_k
            m = k // 2
            if k % 2:  # odd: c_{2m+1}
                num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
            else:  # even: c_{2m}
                num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + num / c
        c = c if abs(c) > _TINY else _TINY
        step = c * d
        f *= step
        if abs(step - 1.0) < _EPS:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"need a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b  # I_x(a, b) = 1 - I_{1-x}(b, a)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom:
    for t >= 0, 1 - I_{df / (df + t^2)}(df / 2, 1 / 2) / 2; symmetric about 0."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile_975(df: int) -> float:
    """The two-sided 95% critical value of Student's t: the t with P(T <= t) = 0.975
    (df 1: 12.706, 4: 2.776, 29: 2.045, large df: 1.960)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    lo, hi = 0.0, 2.0
    while t_cdf(hi, df) < 0.975:  # bracket: the CDF is increasing in t
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < 0.975:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_sd(xs) -> tuple[float, float]:
    """(mean, sample standard deviation with n - 1); sd is nan for one value, and both are
    nan when a value is not finite (a diverged run stays visible, it is not averaged away)."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_sd needs at least one value, got none")
    if not all(math.isfinite(x) for x in xs):
        return math.nan, math.nan
    mean = statistics.mean(xs)  # exact (fractions): identical values give their value and sd 0
    return mean, (statistics.stdev(xs, mean) if len(xs) > 1 else math.nan)


@dataclass(frozen=True)
class PairedDiff:
    """Method a against method b over n paired seeds; diff = a - b per seed."""

    n: int
    mean_a: float
    sd_a: float
    mean_b: float
    sd_b: float
    diff_mean: float
    diff_sd: float
    ci_low: float
    ci_high: float
    excludes_zero: bool

    def format(self, digits: int = 3) -> str:
        """The difference and its 95% interval, e.g. '+0.031 [+0.012, +0.050]'."""
        return f"{self.diff_mean:+.{digits}f} [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}]"


def paired_difference(a: list[float], b: list[float]) -> PairedDiff:
    """The mean of a_i - b_i over paired seeds with its 95% t-interval. Needs n >= 2 pairs
    (a and b of the same length, the same seeds in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"a paired interval needs at least 2 pairs, got lengths {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    mean_a, sd_a = mean_sd(a)
    mean_b, sd_b = mean_sd(b)
    d_mean, d_sd = mean_sd(diffs)
    half = t_quantile_975(len(diffs) - 1) * d_sd / math.sqrt(len(diffs))
    low, high = d_mean - half, d_mean + half
    return PairedDiff(
        n=len(diffs), mean_a=mean_a, sd_a=sd_a, mean_b=mean_b, sd_b=sd_b, diff_mean=d_mean, diff_sd=d_sd,
        ci_low=low, ci_high=high, excludes_zero=bool(low > 0 or high < 0),
    )
