"""The factorisation shortcuts of adapterdb.merging.layers that make the set methods' continual
step fast (issue 15): `SharedBasis` (every task in one pair of orthonormal bases from one QR per
side), `from_orthonormal` (a thin SVD without refactoring orthonormal factors) and KnOTS'
block-wise QR of the block-diagonal A's, each against the dense float64 matrix it must equal.

Tolerance 1e-9 of ‖ΔW‖: both sides are exact float64 algebra on the same float64 inputs, so
they differ by a few QRs' rounding (~1e-15 relative, amplified at most by the small random
matrices' conditioning); any wrong basis, sign or block is an O(1) error.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_strategies import layer_terms

from adapterdb.merging.knots import aligned
from adapterdb.merging.layers import LowRank, SharedBasis, Term, from_orthonormal

TOL = 1e-9


def assert_thin_svd_of(x: LowRank, want: torch.Tensor) -> None:
    """x is a valid thin SVD (orthonormal, S > 0 descending) of `want`."""
    eye = torch.eye(x.rank, dtype=torch.float64)
    assert torch.allclose(x.u.T @ x.u, eye, atol=1e-9)
    assert torch.allclose(x.vh @ x.vh.T, eye, atol=1e-9)
    assert bool((x.s > 0).all()) and bool((x.s[:-1] >= x.s[1:]).all())
    assert float((x.dense() - want).norm()) <= TOL * max(float(want.norm()), 1.0)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(layer_terms())
def test_shared_basis_holds_every_task_and_their_sum(terms: list[Term]) -> None:
    basis = SharedBasis.of(terms)
    for i, term in enumerate(terms):
        assert_thin_svd_of(basis.lift(basis.task(i)), term.dense())
    assert_thin_svd_of(basis.lift(basis.total()), sum(t.dense() for t in terms))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(layer_terms())
def test_knots_alignment_is_the_svd_of_the_concatenation(terms: list[Term]) -> None:
    # the block-wise QRs must give the SVD of [ΔW_1 … ΔW_T] itself, coordinates in task order
    basis = aligned(terms)
    v = torch.cat([c.double() for c in basis.coords], 1)
    got = LowRank(basis.u, basis.s, v)
    want = torch.cat([t.dense() for t in terms], 1)
    # the coordinates are float32 (the merge kernels' precision): rounding 1e-7 of ‖ΔW‖
    assert float((got.dense() - want).norm()) <= 1e-6 * max(float(want.norm()), 1.0)
    assert torch.allclose(basis.u.T @ basis.u, torch.eye(basis.u.shape[1]).double(), atol=1e-9)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_from_orthonormal_sorts_signs_and_drops_zeros(k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(7, k, generator=gen, dtype=torch.float64))[0]
    vh = torch.linalg.qr(torch.randn(5 + k, k, generator=gen, dtype=torch.float64))[0].T
    s = torch.randn(k, generator=gen, dtype=torch.float64)
    s[torch.rand(k, generator=gen) < 0.3] = 0.0
    x = from_orthonormal(u, s, vh)
    assert x.rank == int((s != 0).sum())
    assert_thin_svd_of(x, (u * s) @ vh)


def test_from_orthonormal_by_hand() -> None:
    # diag(1, -3, 0) = e2 (3) (-e2)ᵀ + e1 (1) e1ᵀ: σ = (3, 1), the sign moved into u
    x = from_orthonormal(
        torch.eye(3).double(), torch.tensor([1.0, -3.0, 0.0]).double(), torch.eye(3).double()
    )
    assert x.s.tolist() == [3.0, 1.0]
    assert x.u[:, 0].tolist() == [0.0, -1.0, 0.0] and x.vh[0].tolist() == [0.0, 1.0, 0.0]
    assert (
        from_orthonormal(torch.eye(2).double(), torch.zeros(2).double(), torch.eye(2).double()).rank
        == 0
    )
