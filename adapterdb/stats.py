"""Means with 95% Student-t intervals, and paired differences, over a handful of task orders.

A continual run is repeated over a few task orders (3-5), so a method's spread over orders is
a small-sample estimate: the interval uses Student's t with n − 1 degrees of freedom, not the
normal 1.96. Two methods run on the same orders are compared order by order (a paired
difference): the order effect, often larger than the method effect, cancels out.

Pure Python: the t quantile is found by bisection on the t distribution's tail, computed
from the regularised incomplete beta function (a continued fraction), so no SciPy is needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LEVEL = 0.95
_EPS = 1e-15


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz).

    The fraction converges fast only for x < (a + 1) / (a + b + 2); above that the symmetry
    I_x(a, b) = 1 − I_{1−x}(b, a) moves x into that range.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(1000):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < _EPS:
            return math.exp(log_front) * (f - 1.0) / a
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def t_tail(t: float, df: int) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom and t >= 0."""
    return 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))


def t_critical(df: int, level: float = LEVEL) -> float:
    """The two-sided critical value: P(|T| > t) = 1 − level (12.706 for df 1 at 95%)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    tail = (1.0 - level) / 2.0
    lo, hi = 0.0, 1.0
    while t_tail(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * hi:
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_tail(mid, df) > tail else (lo, mid)
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class Interval:
    """A mean and the half-width of its 95% interval; no half-width for a single value."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "half_width": self.half_width,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "level": LEVEL,
        }


def interval(values: Sequence[float | None], level: float = LEVEL) -> Interval | None:
    """Mean ± t_{n−1} · s / √n (s the sample standard deviation); None when a value is
    missing, since a mean over the orders that happen to have it would compare unlike sets."""
    if not values or any(v is None for v in values):
        return None
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    mean = statistics.fmean(vals)
    if n == 1:
        return Interval(mean, None, 1)
    return Interval(mean, t_critical(n - 1, level) * statistics.stdev(vals) / math.sqrt(n), n)


@dataclass(frozen=True)
class Paired:
    """Per-order differences a − b, their mean and interval, and how many were positive."""

    diffs: tuple[float, ...]
    interval: Interval

    @property
    def positive(self) -> int:
        return sum(d > 0 for d in self.diffs)

    def to_json(self) -> dict[str, Any]:
        return {"per_order": list(self.diffs), **self.interval.to_json(), "positive": self.positive}


def paired(
    a: Sequence[float | None], b: Sequence[float | None], level: float = LEVEL
) -> Paired | None:
    """The paired difference of two methods measured on the same orders (a[k], b[k] share
    order k); None when a value is missing."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one per order on both sides, got {len(a)}, {len(b)}")
    if any(v is None for v in (*a, *b)):
        return None
    diffs = tuple(float(x) - float(y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    found = interval(diffs, level)
    return None if found is None else Paired(diffs, found)
