"""Radix-select thresholds against a sort-based reference."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.topk import kth_largest_abs, magnitude_threshold

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def ref_kth(tensors: list[torch.Tensor], k: int) -> float:
    """Sort every |x| (float32 for non-16-bit dtypes, as documented) and index."""
    flat = torch.cat([t.reshape(-1).float().abs() for t in tensors])
    return float(flat.sort(descending=True).values[k - 1])


def ref_k(fraction: float, n: int) -> int:
    return min(max(math.ceil(Fraction(repr(fraction)) * n), 0), n)


@st.composite
def tensors(draw: st.DrawFn, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Random values with deliberate ties, zeros, negative zeros and wide magnitudes."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 3, 3, 3), (4, 2, 1, 1), (257,)]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(shape, generator=gen) * 10.0 ** draw(st.integers(-30, 30))
    pool = draw(st.integers(0, 3))  # 0: continuous, else values drawn from a tiny pool -> ties
    if pool:
        x = torch.tensor([0.0, -0.0, 1.5, -1.5, 3e-3][: pool + 2])[
            torch.randint(0, pool + 2, shape, generator=gen)
        ]
    return x.to(dtype)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.data())
def test_kth_largest_abs_matches_sort(data: st.DataObject) -> None:
    x = data.draw(tensors())
    if x.numel() == 0:
        return
    k = data.draw(st.integers(1, x.numel()))
    assert kth_largest_abs(x, k) == ref_kth([x], k)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.data())
def test_magnitude_threshold_streams_many_tensors(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from([*DTYPES, None]))  # None: mixed dtypes
    parts = data.draw(st.lists(tensors(dtype), min_size=1, max_size=4))
    fraction = data.draw(st.sampled_from([0.0, 1e-3, 0.07, 0.2, 0.5, 0.999, 1.0, 1.5, -0.1]))
    n = sum(p.numel() for p in parts)
    k = ref_k(fraction, n)
    got = magnitude_threshold(parts, fraction)
    if k == 0:
        assert got == math.inf
        return
    assert got == ref_kth(parts, k)
    flat = torch.cat([p.reshape(-1).float().abs() for p in parts])
    assert int((flat >= got).sum()) >= k  # ties at τ are kept
    assert int((flat > got).sum()) < k


def test_input_forms_agree() -> None:
    parts = [torch.randn(100), torch.randn(3, 40), torch.randn(0)]
    want = magnitude_threshold(parts, 0.3)
    assert magnitude_threshold(tuple(parts), 0.3) == want
    assert magnitude_threshold(iter(parts), 0.3) == want  # one-shot iterator is materialised
    assert magnitude_threshold(lambda: iter(parts), 0.3) == want
    assert magnitude_threshold(dict(enumerate(parts)).values(), 0.3) == want
    assert magnitude_threshold(torch.cat([p.reshape(-1) for p in parts]), 0.3) == want


def test_decimal_fraction_is_exact() -> None:
    x = torch.arange(1, 101, dtype=torch.float32)
    assert 0.07 * 100 > 7  # the binary product would ceil to 8
    assert magnitude_threshold(x, 0.07) == 94.0  # exactly 7 kept: 100..94
    assert magnitude_threshold(x, Fraction(7, 100)) == 94.0


def test_edges() -> None:
    x = torch.tensor([-0.0, 0.0, -2.0, 2.0, 1.0])
    assert magnitude_threshold(x, 1.0) == 0.0  # smallest |x|; -0.0 counts as 0
    assert magnitude_threshold(x, 0.2) == 2.0  # k=1, tie with -2 kept
    assert magnitude_threshold([], 0.5) == math.inf
    assert magnitude_threshold(torch.zeros(5), 0.5) == 0.0
    assert kth_largest_abs(torch.tensor([math.inf, -3.0]), 1) == math.inf
    with pytest.raises(ValueError):
        kth_largest_abs(x, 0)
    with pytest.raises(ValueError):
        kth_largest_abs(x, 6)


def test_non_contiguous_input() -> None:
    x = torch.randn(30, 40).t()
    assert kth_largest_abs(x, 17) == ref_kth([x.contiguous()], 17)
    y = torch.randn(30, 40, dtype=torch.bfloat16).t()
    assert kth_largest_abs(y, 17) == ref_kth([y.contiguous()], 17)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.data())
def test_one_tensor_with_many_ties_and_zeros(data: st.DataObject) -> None:
    """The per-tensor select (TIES' trim="tensor") on few distinct magnitudes."""
    dtype = data.draw(st.sampled_from(DTYPES))
    shape = data.draw(st.sampled_from([(9,), (16, 3), (3, 3, 3), (4, 1, 1), (0,)]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x = torch.randint(-4, 5, shape, generator=gen).to(dtype) / 4
    fraction = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    k = ref_k(fraction, x.numel())
    assert magnitude_threshold(x, fraction) == (math.inf if k == 0 else ref_kth([x], k))


@pytest.mark.parametrize("k", [1, 5_000, 70_000, 150_000])
def test_a_crowded_bucket_is_resolved_by_its_own_histogram(k: int) -> None:
    """150k magnitudes sharing their high 16 bits (more than pass 2 searches directly), split
    over two tensors: pass 2 falls back to the 2^16-bin histogram of the low bits."""
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 1 << 16, (150_000,), generator=gen, dtype=torch.int32) | 0x3F800000
    x = bits.view(torch.float32) * torch.where(torch.rand(150_000, generator=gen) < 0.5, -1, 1)
    parts = [x[:60_000], x[60_000:]]
    assert magnitude_threshold(parts, Fraction(k, 150_000)) == ref_kth(parts, k)
    assert kth_largest_abs(x, k) == ref_kth([x], k)
