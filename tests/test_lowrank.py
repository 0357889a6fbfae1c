"""Low-rank refactoring against float64 dense SVD references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.errors import AdbError, MismatchError
from adapterdb.lora import delta_weight
from adapterdb.lowrank import dense_refactor, refactor

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def dense(terms: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """ΔW = Σ c·B·A in float64, shaped like the adapted weight."""
    return sum(delta_weight(a.double(), b.double(), c).double() for a, b, c in terms)


def best_error(delta: torch.Tensor, rank: int) -> float:
    """Eckart–Young: the optimal relative error, from a float64 full SVD."""
    s = torch.linalg.svdvals(delta.flatten(1).double())
    total = float(s.square().sum())
    return math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0


def achieved_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = delta.double() - delta_weight(a.double(), b.double(), 1.0)
    norm = float(delta.double().norm())
    return float(diff.norm()) / norm if norm > 0 else float(diff.norm())


@st.composite
def lora_terms(draw: st.DrawFn) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    dtype = draw(st.sampled_from(DTYPES))
    conv = draw(st.booleans())
    out, fan_in = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    terms = []
    for _ in range(draw(st.integers(1, 4))):
        r = draw(st.integers(1, 4))
        a_shape, b_shape = ((r, fan_in, 3, 3), (out, r, 1, 1)) if conv else ((r, fan_in), (out, r))
        zero = draw(st.integers(0, 5)) == 0  # sometimes an all-zero factor
        a = torch.zeros(a_shape) if zero else torch.randn(a_shape, generator=gen)
        b = torch.randn(b_shape, generator=gen)
        terms.append((a.to(dtype), b.to(dtype), draw(st.sampled_from([1.0, 0.5, -2.0, 1 / 3]))))
    return terms


def check_factors(delta: torch.Tensor, rank: int, a, b, err: float, a_tail, b_tail) -> None:
    assert a.dtype == b.dtype == torch.float32
    assert a.shape == (rank, *a_tail) and b.shape == (delta.shape[0], rank, *b_tail)
    want = best_error(delta, rank)
    assert err == pytest.approx(want, abs=1e-5)
    assert achieved_error(delta, a, b) == pytest.approx(want, abs=1e-4)
    # singular values split as sqrt: column i of B and row i of A have equal norms
    assert torch.allclose(b.flatten(1).norm(dim=0), a.flatten(1).norm(dim=1), rtol=1e-3, atol=1e-5)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(lora_terms(), st.integers(1, 10))
def test_refactor_is_the_best_rank_r_approximation(terms, rank: int) -> None:
    a0, b0, _ = terms[0]
    delta = dense(terms)
    a, b, err = refactor(terms, rank)
    check_factors(delta, rank, a, b, err, a0.shape[1:], b0.shape[2:])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(lora_terms(), st.integers(1, 10))
def test_dense_refactor_matches_refactor(terms, rank: int) -> None:
    delta = dense(terms)
    a, b, err = dense_refactor(delta.float(), rank)
    b_tail = (1, 1) if delta.dim() == 4 else ()
    check_factors(delta, rank, a, b, err, delta.shape[1:], b_tail)


def test_generic_product_equals_truncated_svd() -> None:
    gen = torch.Generator().manual_seed(3)
    terms = [(torch.randn(4, 20, generator=gen), torch.randn(30, 4, generator=gen), 0.5)] * 2
    terms.append((torch.randn(3, 20, generator=gen), torch.randn(30, 3, generator=gen), 1.0))
    delta = dense(terms)
    u, s, vh = torch.linalg.svd(delta)
    want = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    for a, b, _ in (refactor(terms, 5), dense_refactor(delta, 5)):
        assert torch.allclose((b @ a).double(), want, atol=1e-5 * float(s[0]))


def test_single_term_full_rank_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 16, 3, 3, generator=gen), torch.randn(10, 6, 1, 1, generator=gen)
    a2, b2, err = refactor([(a, b, 2.0)], 6)
    assert err < 1e-6
    assert torch.allclose(delta_weight(a2, b2, 1.0), delta_weight(a, b, 2.0), atol=1e-4)


def test_rank_beyond_achievable_is_zero_padded() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 5, generator=gen), torch.randn(4, 2, generator=gen)
    a2, b2, err = refactor([(a, b, 1.0)], 7)
    assert a2.shape == (7, 5) and b2.shape == (4, 7) and err < 1e-6
    assert not a2[2:].any() and not b2[:, 2:].any()


def test_zero_delta() -> None:
    a, b = torch.zeros(3, 5), torch.zeros(4, 3)
    for a2, b2, err in (refactor([(a, b, 1.0), (a, b, 1.0)], 2), dense_refactor(b @ a, 2)):
        assert err == 0.0 and not a2.any() and not b2.any()


def test_randomized_path_is_near_optimal() -> None:
    gen = torch.Generator().manual_seed(2)
    n, m = 96, 120  # min(n, m) > rank + oversample: the sketch is genuinely randomized
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(m, n, generator=gen))
    delta = (u * 0.8 ** torch.arange(n)) @ v.T  # decaying spectrum
    a, b, err = dense_refactor(delta, 8)
    assert err == pytest.approx(achieved_error(delta, a, b), abs=1e-5)
    assert err <= best_error(delta, 8) * (1 + 1e-3)
    assert torch.equal(dense_refactor(delta, 8)[0], a)  # seeded: deterministic


def test_errors() -> None:
    a, b = torch.randn(2, 5), torch.randn(4, 2)
    with pytest.raises(MismatchError, match="q_proj"):
        refactor([(a, b, 1.0), (torch.randn(2, 6), b, 1.0)], 2, name="q_proj")
    with pytest.raises(MismatchError, match="q_proj"):
        refactor([(a, torch.randn(4, 3), 1.0)], 2, name="q_proj")
    with pytest.raises(AdbError, match="rank"):
        refactor([(a, b, 1.0)], 0)
    with pytest.raises(MismatchError):
        dense_refactor(torch.randn(3), 1)
