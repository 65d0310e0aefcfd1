"""Significance tests for comparing two arms, and the Student t distribution they need.

:func:`two_proportion_z_test` for rates, :func:`welch_t_test` for means of unequal variance.
The Student t distribution comes from the regularized incomplete beta function (its continued
fraction), so the library needs no scipy.
"""

from __future__ import annotations

import math

__all__ = ["two_proportion_z_test", "welch_t_test", "wilson_interval"]

Z95 = 1.959963984540054  # standard normal quantile at 0.975


def two_proportion_z_test(successes_a: int, n_a: int, successes_b: int, n_b: int) -> tuple[float, float]:
    """``(z, two-sided p)`` for rate a minus rate b, with the pooled variance of equal rates.

    Identical all-0 or all-1 arms have no variance to test against: ``(0.0, 1.0)``.
    """
    if n_a < 1 or n_b < 1 or not 0 <= successes_a <= n_a or not 0 <= successes_b <= n_b:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes_a}/{n_a} and {successes_b}/{n_b}")
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0, 1.0
    z = (successes_a / n_a - successes_b / n_b) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def wilson_interval(rate: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval (95% by default) for a rate seen over ``n`` > 0 trials: sound near 0 and 1."""
    z2 = z * z
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def welch_t_test(
    mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int
) -> tuple[float, float, float]:
    """``(t, Welch-Satterthwaite df, two-sided p)`` for mean a minus mean b, variances not assumed equal.

    ``var_*`` are sample variances (``ddof=1``). When both are 0 the df is taken as
    ``n_a + n_b - 2`` and ``t`` is 0 (equal means, p = 1) or infinite (p = 0). A mean or
    variance that is not finite (outcomes past float range) has no test: all three are NaN.
    """
    if n_a < 2 or n_b < 2 or var_a < 0 or var_b < 0:
        raise ValueError(f"need n >= 2 and var >= 0, got n={n_a}, {n_b} and var={var_a}, {var_b}")
    if not all(math.isfinite(v) for v in (mean_a, var_a, mean_b, var_b)):
        return math.nan, math.nan, math.nan
    sa, sb, diff = var_a / n_a, var_b / n_b, mean_a - mean_b
    if sa + sb == 0:
        return (0.0, n_a + n_b - 2.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), n_a + n_b - 2.0, 0.0)
    top = max(sa, sb)  # scaled: squares of 1e-160 underflow to 0 (a ZeroDivisionError), of 1e160 overflow
    ra, rb = sa / top, sb / top
    df = (ra + rb) ** 2 / (ra * ra / (n_a - 1) + rb * rb / (n_b - 1))
    t = diff / math.sqrt(sa + sb)
    return t, df, _t_two_sided_p(t, df)


def _t_two_sided_p(t: float, df: float) -> float:
    """P(|T| > |t|) for Student's t with ``df`` degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    if df > 1e8:  # the continued fraction loses digits; the normal tail plus its 1/df term is good to ~1e-8
        t = abs(t)
        if t > 40:  # both terms are below the smallest double (and t**3 past 1e102 overflows)
            return 0.0
        return math.erfc(t / math.sqrt(2)) + math.exp(-t * t / 2) * (t**3 + t) / (2 * df * math.sqrt(2 * math.pi))
    return _betai(df / 2, 0.5, df / (df + t * t), t * t / (df + t * t))


def _t_two_sided_quantile(p: float, df: float) -> float:
    """The t > 0 with P(|T| > t) = p, by Newton's method on the tail."""
    # The tail is decreasing and convex for t > 0, so Newton from 0 climbs to the root without overshooting.
    log_norm = -0.5 * math.log(df) - _log_beta(df / 2, 0.5)
    t = 0.0
    for _ in range(200):
        density = math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
        step = (_t_two_sided_p(t, df) - p) / (2 * density)
        t += step
        if step <= 1e-12 * t:
            break
    return t


def _betai(a: float, b: float, x: float, y: float) -> float:
    """The regularized incomplete beta function I_x(a, b), given ``y = 1 - x`` (Numerical Recipes' betai)."""
    if x <= 0 or y <= 0:
        return 0.0 if x <= 0 else 1.0
    # Each log from the smaller of x and y: for large df x is within t²/df of 1, and a·log(x) would lose digits.
    log_x = math.log1p(-y) if x > 0.5 else math.log(x)
    log_y = math.log1p(-x) if y > 0.5 else math.log(y)
    front = math.exp(a * log_x + b * log_y - _log_beta(a, b))
    # The continued fraction converges fast only below the mean; use I_x(a, b) = 1 - I_y(b, a) above it.
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def _log_beta(a: float, b: float) -> float:
    """Log B(a, b), without cancelling two huge lgammas when one argument is large."""
    big, small = max(a, b), min(a, b)
    if big < 1e4:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    # Stirling's series for lgamma(big + small) - lgamma(big); the next term is below 1e-18 here.
    rise = small * math.log(big) + (big + small - 0.5) * math.log1p(small / big) - small
    rise += (1 / (big + small) - 1 / big) / 12
    return math.lgamma(small) - rise


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method (Numerical Recipes' betacf)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):  # with b = 1/2 it takes under 50 terms at any df
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for numerator in (even, odd):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")
