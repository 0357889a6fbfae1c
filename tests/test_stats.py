"""Student-t intervals and paired differences (adapterdb/stats.py) against known values,
closed forms, a float64 reference and, where installed, SciPy."""

from __future__ import annotations

import math
import statistics

import pytest

from adapterdb.stats import betainc, interval, paired, t_critical, t_tail

# Two-sided 95% critical values from any printed t table (3 decimals)
TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 29: 2.045, 120: 1.980}


@pytest.mark.parametrize(("df", "expected"), TABLE.items())
def test_t_critical_matches_printed_table(df: int, expected: float) -> None:
    assert t_critical(df) == pytest.approx(expected, abs=5e-4)


def test_t_critical_closed_forms_and_normal_limit() -> None:
    # df = 1 is Cauchy: t = tan(pi/2 * level); df = 2: t = q / sqrt((1 - q^2) / 2), q = level
    assert t_critical(1) == pytest.approx(math.tan(math.pi / 2 * 0.95), rel=1e-12)
    assert t_critical(2, 0.99) == pytest.approx(0.99 / math.sqrt((1 - 0.99**2) / 2), rel=1e-12)
    assert t_critical(100_000) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), rel=1e-4)
    with pytest.raises(ValueError):
        t_critical(0)


@pytest.mark.parametrize(("a", "b"), [(1.0, 1.0), (2.5, 1.0), (1.0, 3.5)])
def test_betainc_closed_forms(a: float, b: float) -> None:
    """I_x(a, 1) = x^a and I_x(1, b) = 1 − (1 − x)^b, on both sides of the symmetry switch."""
    for x in (1e-6, 0.1, 0.5, 0.9, 1 - 1e-9):
        expected = x**a if b == 1.0 else 1 - (1 - x) ** b
        assert betainc(a, b, x) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert betainc(a, b, 0.0) == 0.0 and betainc(a, b, 1.0) == 1.0


def test_t_tail_against_numerical_integration() -> None:
    """A float64 reference independent of the incomplete beta: Simpson's rule on the density."""
    df, t = 4, 1.7
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def pdf(u: float) -> float:
        return c * (1 + u * u / df) ** (-(df + 1) / 2)

    n, h = 20_000, t / 20_000
    central = (
        h / 3 * sum(pdf(i * h) * (1 if i in (0, n) else 4 if i % 2 else 2) for i in range(n + 1))
    )
    assert t_tail(t, df) == pytest.approx(0.5 - central, rel=1e-10)


def test_against_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    for df in range(1, 61):
        for level in (0.8, 0.95, 0.99):
            expected = scipy_stats.t.ppf(1 - (1 - level) / 2, df)
            assert t_critical(df, level) == pytest.approx(expected, rel=1e-11)
    for a in (0.5, 1.5, 7.0, 40.0):
        for b in (0.5, 2.0, 30.0):
            for x in (0.001, 0.2, 0.5, 0.8, 0.999):
                assert betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), abs=1e-11)
    values = [0.81, 0.86, 0.79, 0.90, 0.84]
    lo, hi = scipy_stats.t.interval(
        0.95, len(values) - 1, loc=statistics.fmean(values), scale=scipy_stats.sem(values)
    )
    iv = interval(values)
    assert iv is not None and (iv.low, iv.high) == pytest.approx((lo, hi), rel=1e-11)


def test_interval_by_hand() -> None:
    iv = interval([1.0, 2.0, 3.0])  # mean 2, sample sd 1, n 3: half = t_2 / sqrt(3)
    assert iv is not None
    assert (iv.mean, iv.n) == (2.0, 3)
    assert iv.half_width == pytest.approx(4.302652729749 / math.sqrt(3), rel=1e-10)
    assert iv.to_json()["low"] == pytest.approx(2.0 - iv.half_width)


def test_interval_of_one_value_or_a_missing_one() -> None:
    one = interval([0.7])
    assert one is not None and one.half_width is None and one.low is None and one.mean == 0.7
    assert interval([0.7, None]) is None
    assert interval([]) is None


def test_paired_difference_cancels_the_order_effect() -> None:
    """Orders move both methods by 20 points, the method by 1: unpaired intervals overlap,
    the paired one excludes zero."""
    base = [0.60, 0.80, 0.70, 0.65]
    better = [b + 0.01 + 0.001 * k for k, b in enumerate(base)]
    a_iv, b_iv = interval(better), interval(base)
    assert a_iv and b_iv and a_iv.low is not None and b_iv.high is not None
    assert a_iv.low < b_iv.high  # unpaired: no visible difference
    p = paired(better, base)
    assert p is not None and p.positive == 4
    assert p.diffs == pytest.approx((0.010, 0.011, 0.012, 0.013))
    assert p.interval.low is not None and p.interval.low > 0
    doc = p.to_json()
    assert doc["per_order"] == pytest.approx([0.010, 0.011, 0.012, 0.013])
    assert doc["positive"] == 4 and doc["n"] == 4


def test_paired_counts_only_strictly_positive_and_refuses_mismatches() -> None:
    p = paired([0.5, 0.6, 0.7], [0.5, 0.5, 0.8])
    assert p is not None and p.positive == 1
    assert paired([0.5, None], [0.5, 0.6]) is None
    with pytest.raises(ValueError):
        paired([0.5], [0.5, 0.6])
