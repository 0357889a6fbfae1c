"""TSV, Iso-C, Iso-CTS and KnOTS (adapterdb.merging.tsv / iso / knots): the factor-space
methods against the dense float64 references of tests/subspace_reference.py, and hand-computed
cases that a wrong formula cannot pass.

Tolerances: inputs enter both sides exactly (bf16 and fp32 factors are cast to float64), so
TSV and Iso differ only by float64 rounding through a few SVDs/QRs, amplified by the inverse
singular-value gaps of small random matrices: 1e-7 of ‖ΔW‖ leaves that ~10⁸ times the float64
epsilon of room and still catches any formula error (those are O(1)). KnOTS merges its
coordinates with adb's float32 kernels and the reference rounds them to float32 the same way;
the two SVDs then differ at the float32 rounding of the products: 1e-5.
"""

from __future__ import annotations

import math

import pytest
import subspace_reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.errors import AdbError, MismatchError
from adapterdb.merging.iso import IsoCParams, IsoCtsParams, iso_c, iso_cts
from adapterdb.merging.knots import KnotsParams, knots
from adapterdb.merging.layers import LAYER_METHODS, LowRank, Term
from adapterdb.merging.tsv import TsvParams, tsv


@st.composite
def layer_terms(draw: st.DrawFn) -> list[Term]:
    """T = 1…6 LoRA updates of one (out × in) layer: ranks 1…4, fp32 or bf16 factors, LoRA
    scales of both signs; "zero" makes some updates zero, "same" repeats the first."""
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    out, fan_in = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["random", "random", "zero", "same"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    terms: list[Term] = []
    for t in range(draw(st.integers(1, 6))):
        if kind == "same" and terms:
            terms.append(terms[0])
            continue
        r = draw(st.integers(1, 4))
        a = torch.randn(r, fan_in, generator=gen)
        if kind == "zero" and t % 2 == 0:
            a = torch.zeros(r, fan_in)
        b = torch.randn(out, r, generator=gen)
        scale = draw(st.sampled_from([1.0, 0.5, -2.0, 1 / 3]))
        terms.append(Term(a.to(dtype), b.to(dtype), scale))
    return terms


def check(result: LowRank, want: torch.Tensor, tol: float) -> None:
    """result is a valid thin SVD (orthonormal, S > 0 descending) equal to `want`."""
    k = result.rank
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(result.u.T @ result.u, eye, atol=1e-9)
    assert torch.allclose(result.vh @ result.vh.T, eye, atol=1e-9)
    assert bool((result.s > 0).all()) and bool((result.s[:-1] >= result.s[1:]).all())
    got = result.dense()
    assert got.shape == want.shape
    assert float((got - want).norm()) <= tol * max(float(want.norm()), 1.0)


def deltas(terms: list[Term]) -> list[torch.Tensor]:
    return [t.dense() for t in terms]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(layer_terms(), st.sampled_from([1.0, 0.5, -1.5]))
def test_tsv_matches_the_dense_reference(terms: list[Term], alpha: float) -> None:
    check(tsv(terms, TsvParams(alpha=alpha)), ref.tsv(deltas(terms), alpha), 1e-7)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(layer_terms(), st.sampled_from([1.0, 0.5, -1.5]))
def test_iso_c_matches_the_dense_reference(terms: list[Term], alpha: float) -> None:
    check(iso_c(terms, IsoCParams(alpha=alpha)), ref.iso_c(deltas(terms), alpha), 1e-7)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(layer_terms(), st.sampled_from([1.0, -0.5]), st.sampled_from([0.0, 0.25, 0.5, 0.8, 1.0]))
def test_iso_cts_matches_the_dense_reference(
    terms: list[Term], alpha: float, fraction: float
) -> None:
    p = IsoCtsParams(alpha=alpha, common_space_fraction=fraction)
    want = ref.iso_cts(deltas(terms), alpha, fraction)
    check(iso_cts(terms, p), want, 1e-7)
    if fraction == 1.0:  # no task-specific directions left: exactly Iso-C
        check(iso_c(terms, IsoCParams(alpha=alpha)), want, 1e-7)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    layer_terms(),
    st.sampled_from(["ties", "dare_ties", "dare"]),
    st.sampled_from([0.3, 0.7, 1.0]),
    st.sampled_from(["sum", "count"]),
)
def test_knots_matches_the_dense_reference(
    terms: list[Term], merge: str, density: float, elect: str
) -> None:
    p = KnotsParams(merge=merge, density=density, elect=elect, seed=3, lam=0.7)
    want = ref.knots(deltas(terms), merge, density, elect, 3, 0.7)
    check(knots(terms, p), want, 1e-5)


# -------------------------------------------------------------- hand-computed cases


def diag_term(values: list[float]) -> Term:
    """ΔW = diag(values) as a LoRA of rank len(values) (B = I, A = diag)."""
    n = len(values)
    return Term(torch.diag(torch.tensor(values)), torch.eye(n), 1.0)


def outer_term(u: list[float], sigma: float) -> Term:
    """ΔW = σ · u uᵀ as a rank-1 LoRA."""
    x = torch.tensor([u])
    return Term(x, x.T, sigma)


def test_iso_c_flattens_the_spectrum_of_the_sum() -> None:
    # diag(3, 0) + diag(0, 1) = diag(3, 1): mean σ = 2
    got = iso_c([diag_term([3, 0]), diag_term([0, 1])], IsoCParams()).dense()
    assert torch.allclose(got, 2 * torch.eye(2, dtype=torch.float64))


def test_iso_c_averages_only_the_non_zero_spectrum() -> None:
    # a rank-1 sum in a 4 x 4 layer keeps its σ: FusionBench's mean over 4 values would be σ/4
    got = iso_c([outer_term([1, 0, 0, 0], 8.0)], IsoCParams(alpha=0.5)).dense()
    want = torch.zeros(4, 4, dtype=torch.float64)
    want[0, 0] = 4.0
    assert torch.allclose(got, want)


def test_iso_cts_keeps_task_directions_iso_c_spreads() -> None:
    # sum diag(4, 1, .5, 2), n = 4, fraction .25: k_c = 1, d = round(3/2) = 2, so k_c = 0;
    # task 1 keeps σ 4, 1 (drops .5), task 2 keeps 2: flat 7/3 on e1, e2, e4
    terms = [diag_term([4, 1, 0.5, 0]), diag_term([0, 0, 0, 2])]
    got = iso_cts(terms, IsoCtsParams(common_space_fraction=0.25)).dense()
    assert torch.allclose(got, torch.diag(torch.tensor([1, 1, 0, 1.0])).double() * 7 / 3)
    assert torch.allclose(iso_c(terms, IsoCParams()).dense(), torch.eye(4).double() * 7.5 / 4)


def test_iso_cts_ignores_a_task_that_lies_in_the_common_subspace() -> None:
    # tasks 5·q1q1ᵀ and 2·q2q2ᵀ + q3q3ᵀ (q orthonormal, not axis-aligned so that projecting
    # leaves float64 rounding noise): n = 3, k_c = 1 (q1), d = 1. Task 1's residual is zero: only
    # q1 (σ 5) and q2 (σ 2) are kept, flat at 3.5; a noise direction would pull the mean down
    gen = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))[0]
    terms = [
        Term(q[:, :1].T, q[:, :1], 5.0),
        Term(q[:, 1:3].T * torch.tensor([[2.0], [1.0]]), q[:, 1:3], 1.0),
    ]
    got = iso_cts(terms, IsoCtsParams(common_space_fraction=0.34)).dense()
    assert torch.allclose(got, 3.5 * q[:, :2] @ q[:, :2].T, atol=1e-12)


def test_tsv_turns_two_overlapping_directions_apart() -> None:
    # tasks 3·e1e1ᵀ and 1·uuᵀ with u at 60°: the nearest orthonormal pair to (e1, u) is the
    # two directions rotated symmetrically about their bisector (30°) to -15° and 75°
    theta = math.pi / 3
    terms = [outer_term([1, 0], 3.0), outer_term([math.cos(theta), math.sin(theta)], 1.0)]
    got = tsv(terms, TsvParams()).dense()
    a, b = theta / 2 - math.pi / 4, theta / 2 + math.pi / 4
    u1 = torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64)
    u2 = torch.tensor([math.cos(b), math.sin(b)], dtype=torch.float64)
    assert torch.allclose(got, 3 * torch.outer(u1, u1) + torch.outer(u2, u2))


def test_tsv_of_one_task_or_identical_tasks_is_that_task() -> None:
    gen = torch.Generator().manual_seed(0)
    term = Term(torch.randn(3, 7, generator=gen), torch.randn(5, 3, generator=gen), 0.5)
    assert torch.allclose(tsv([term], TsvParams()).dense(), term.dense())
    # 5 // 2 = 2 components per task: the best rank-2 approximation of the task
    best = ref.nonzero_svd(term.dense())
    want = (best[0][:, :2] * best[1][:2]) @ best[2][:2]
    assert torch.allclose(tsv([term, term], TsvParams()).dense(), want)


def test_knots_elects_the_dominant_sign_where_task_arithmetic_cancels() -> None:
    # [e1e1ᵀ | -.5·e1e1ᵀ]: one shared direction with coordinates 1 and -.5 (over √1.25);
    # TIES (density 1) elects the positive sign and drops task 2; the plain sum would be .5
    terms = [outer_term([1, 0], 1.0), outer_term([1, 0], -0.5)]
    got = knots(terms, KnotsParams(density=1.0)).dense()
    assert torch.allclose(got, terms[0].dense(), atol=1e-6)
    dare_sum = knots(terms, KnotsParams(merge="dare", density=1.0)).dense()
    assert torch.allclose(dare_sum, 0.5 * terms[0].dense(), atol=1e-6)


def test_zero_updates_merge_to_zero() -> None:
    zero = Term(torch.zeros(2, 3), torch.zeros(4, 2), 1.0)
    for name in ("tsv", "iso_c", "iso_cts", "knots"):
        method = LAYER_METHODS[name]
        result = method.fn([zero, zero], method.params())
        assert result.rank == 0 and result.dense().shape == (4, 3)


# -------------------------------------------------------------- parameters and bad input


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: IsoCtsParams(common_space_fraction=1.5), "common_space_fraction=1.5"),
        (lambda: KnotsParams(density=0.0), "density=0.0"),
        (lambda: KnotsParams(merge="mean"), "merge='mean'"),
        (lambda: TsvParams(alpha=math.inf), "alpha"),
    ],
)
def test_bad_parameters_are_one_line_errors(make, message: str) -> None:
    with pytest.raises(AdbError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_layers_of_different_shapes_are_refused() -> None:
    terms = [
        Term(torch.ones(1, 3), torch.ones(4, 1), 1.0),
        Term(torch.ones(1, 2), torch.ones(4, 1), 1.0),
    ]
    for name in ("tsv", "iso_c", "iso_cts", "knots"):
        method = LAYER_METHODS[name]
        with pytest.raises(MismatchError, match="LoRA term 1"):
            method.fn(terms, method.params())


def test_methods_are_registered_as_set_methods() -> None:
    for name, params in [
        ("tsv", TsvParams),
        ("iso_c", IsoCParams),
        ("iso_cts", IsoCtsParams),
        ("knots", KnotsParams),
    ]:
        assert LAYER_METHODS[name].kind == "set" and LAYER_METHODS[name].params is params
