"""Continual TA and continual TIES per LoRA layer against dense float64 transcriptions of
FusionBench's loops (`subspace_reference.continual_ta` / `continual_ties`), plus hand cases."""

from __future__ import annotations

import dataclasses

import pytest
import subspace_reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_strategies import fold_all, layer_terms

from adapterdb.errors import AdbError, MismatchError
from adapterdb.merging import registry
from adapterdb.merging.continual import ContinualTaParams, ContinualTiesParams, ties_sum
from adapterdb.merging.layers import LAYER_METHODS, STATE_ERROR, LowRank, Term, output_error

# float64 on the same rounded factors: continual TA differs from the dense sum only by
# QR/SVD rounding (~1e-15 relative), continual TIES is the same dense arithmetic plus one
# SVD of the result; 1e-9 of the largest input norm leaves room, a wrong rule is off by O(1).
TOL = 1e-9


def scale_of(terms: list[Term]) -> float:
    return max(1.0, *(float(t.dense().norm()) for t in terms))


@settings(max_examples=40, deadline=None)
@given(terms=layer_terms(), lam=st.sampled_from([0.3, 1.0, -0.5]))
def test_continual_ta_matches_dense_loop(terms: list[Term], lam: float) -> None:
    merged = fold_all("continual_ta", ContinualTaParams(lam=lam), terms)
    want = ref.continual_ta([t.dense() for t in terms], lam)
    assert torch.allclose(merged.dense(), want, rtol=0, atol=TOL * scale_of(terms))
    # `svd_plus` keeps the bases orthonormal even for repeated and zero updates
    eye = torch.eye(merged.rank, dtype=torch.float64)
    assert torch.allclose(merged.u.T @ merged.u, eye, atol=1e-10)
    assert torch.allclose(merged.vh @ merged.vh.T, eye, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(terms=layer_terms(), density=st.sampled_from([0.2, 0.5, 1.0]))
def test_continual_ties_factors_matches_dense_loop(terms: list[Term], density: float) -> None:
    """ties_space=factors: the same float64 arithmetic on the factor tensors as the entry-by-entry
    reference (the same thresholds, the same sums); only the final SVD rounds (~1e-15)."""
    p = ContinualTiesParams(density=density)
    got = fold_all("continual_ties", p, terms).dense()
    pairs = [(t.a.double(), t.b.double() * t.scale) for t in terms]
    want = ref.continual_ties_factors(pairs, p.lam, density)
    # each step grows a factor's entries at most by (1 + λ)·|old| + λ·|new|, so ‖B_m‖·‖A_m‖
    # stays below (1 + λ)^(2T)·max_t ‖s·B_t‖·‖A_t‖
    size = max(1.0, *(float(a.norm() * b.norm()) for a, b in pairs)) * (1 + p.lam) ** (
        2 * len(pairs)
    )
    assert torch.allclose(got, want, rtol=0, atol=TOL * size)


def product_steps(
    terms: list[Term], p: ContinualTiesParams
) -> list[tuple[torch.Tensor, LowRank, float]]:
    """ties_space=product step by step: (the reference step on the state adb continued from,
    adb's merge, adb's state error)."""
    step, state, out = LAYER_METHODS["continual_ties"].fn, None, []
    for t, term in enumerate(terms, 1):
        prev = None if state is None else state["b"].double() @ state["a"].double()
        tau = term.dense()
        want = p.lam * tau if prev is None else prev + p.lam * ref.ties_pair(prev, tau, p.density)
        merged, state = step(state, term, t, p)
        out.append((want, merged, float(state[STATE_ERROR])))
    return out


@settings(max_examples=30, deadline=None)
@given(
    terms=layer_terms(),
    density=st.sampled_from([0.2, 0.5, 1.0]),
    state_rank=st.sampled_from([None, 1, 2]),
)
def test_continual_ties_product_steps_match_dense_loop(
    terms: list[Term], density: float, state_rank: int | None
) -> None:
    """ties_space=product: each step is the reference step on the (rank-k) state it continued
    from, to within the state error it records: the state is the float32 randomized SVD of the
    dense result, so ‖M_t − L_t‖ ≤ (state_error + float32 rounding 1e-6)·‖M_t‖. Its sketch
    (k + 32 wide) covers these ≤ 7-wide layers, so the error is Eckart–Young's optimum."""
    p = ContinualTiesParams(density=density, ties_space="product", state_rank=state_rank)
    k = state_rank or terms[0].a.shape[0]
    for want, merged, error in product_steps(terms, p):
        norm = float(want.norm())
        assert float((merged.dense() - want).norm()) <= (error + 1e-6) * norm + 1e-12
        s = torch.linalg.svdvals(want)
        best = float(s[k:].square().sum() / s.square().sum()) ** 0.5 if norm > 0 else 0.0
        assert error == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_continual_ties_product_sequence_matches_dense_loop(seed: int) -> None:
    """Six fp32 tasks on a 9 x 5 layer, state of full rank 5 (exact to float32): the whole
    fold agrees with FusionBench's dense loop (random entries: no trim threshold within
    float32 rounding)."""
    gen = torch.Generator().manual_seed(seed)
    terms = [Term(torch.randn(2, 5, generator=gen), torch.randn(9, 2, generator=gen), 0.5)]
    terms += [Term(torch.randn(2, 5, generator=gen), torch.randn(9, 2, generator=gen), 2.0)] * 2
    terms += [Term(torch.randn(2, 5, generator=gen), torch.randn(9, 2, generator=gen), 1.0)] * 3
    p = ContinualTiesParams(ties_space="product", state_rank=5)
    got = fold_all("continual_ties", p, terms).dense()
    want = ref.continual_ties([t.dense() for t in terms], p.lam, p.density)
    assert float((got - want).norm()) < 1e-5 * float(want.norm())


def test_product_state_error_is_measured_and_recorded() -> None:
    """A 48 x 40 layer kept at state rank 3: the state error is the true ‖M_t − L_t‖/‖M_t‖, and
    `output_error` (what the workflow records) is the true error of the rank-2 output against
    M_t, the squares of the two adding up (the residual is orthogonal to L_t)."""
    gen = torch.Generator().manual_seed(0)
    terms = [Term(torch.randn(4, 40, generator=gen), torch.randn(48, 4, generator=gen), 1.0)]
    terms.append(Term(torch.randn(4, 40, generator=gen), torch.randn(48, 4, generator=gen), 1.0))
    p = ContinualTiesParams(ties_space="product", state_rank=3)
    step = LAYER_METHODS["continual_ties"].fn
    merged, state = step(None, terms[0], 1, p)
    prev = state["b"].double() @ state["a"].double()
    want = prev + p.lam * ref.ties_pair(prev, terms[1].dense(), p.density)
    merged, state = step(state, terms[1], 2, p)
    error = float(state[STATE_ERROR])
    assert 0.1 < error < 1  # TIES of rank-3 and rank-4 inputs is far from rank 3
    assert error == pytest.approx(float((merged.dense() - want).norm() / want.norm()), abs=1e-5)
    a, b, refactor = merged.factors(2)
    truth = float((want - b.double() @ a.double()).norm() / want.norm())
    assert output_error(refactor, state) == pytest.approx(truth, abs=1e-5)
    assert output_error(refactor, state) > max(error, refactor)


def test_factor_space_refuses_a_rank_mismatch() -> None:
    a = Term(torch.ones(2, 3), torch.ones(4, 2), 1.0)
    b = Term(torch.ones(1, 3), torch.ones(4, 1), 1.0)
    with pytest.raises(
        MismatchError,
        match=r"^continual_ties: task 2 has LoRA rank 1 .*"
        r"use ties_space=product$",
    ):
        fold_all("continual_ties", ContinualTiesParams(), [a, b])
    product = fold_all("continual_ties", ContinualTiesParams(ties_space="product"), [a, b])
    assert product.rank >= 1


def test_continual_ta_state_rank_caps_the_state() -> None:
    """diag(3, 0) then diag(0, 1), capped at rank 1: the merge kept is diag(3, 0), and the
    lost 1 is the recorded error 1/√10; a third diag(0, 1) does not bring it back."""

    def diag(x: float, y: float) -> Term:
        return Term(torch.eye(2), torch.diag(torch.tensor([x, y])), 1.0)

    p = ContinualTaParams(lam=1.0, state_rank=1)
    step = LAYER_METHODS["continual_ta"].fn
    _, state = step(None, diag(3, 0), 1, p)
    merged, state = step(state, diag(0, 1), 2, p)
    assert torch.allclose(merged.dense(), torch.diag(torch.tensor([3.0, 0.0])).double())
    assert float(state[STATE_ERROR]) == pytest.approx(10**-0.5)
    merged, state = step(state, diag(0, 1), 3, p)
    assert torch.allclose(merged.dense(), torch.diag(torch.tensor([3.0, 0.0])).double())
    exact = fold_all("continual_ta", ContinualTaParams(lam=1.0), [diag(3, 0), diag(0, 1)])
    assert exact.rank == 2


def test_ties_sum_by_hand() -> None:
    """No trim: entry 0 elects + (3 − 2 > 0) and keeps only 3; entry 1 elects − and SUMS the
    two agreeing values (FusionBench's merge_func sum, not TIES' mean); with density 0.5 each
    side keeps its larger entry only."""
    x = torch.tensor([3.0, -1.0], dtype=torch.float64)
    y = torch.tensor([-2.0, -2.5], dtype=torch.float64)
    assert ties_sum(x, y, 1.0).tolist() == [3.0, -3.5]
    assert ties_sum(x, y, 0.5).tolist() == [3.0, -2.5]


def test_continual_ties_first_step_by_hand() -> None:
    """Task 1 alone: λ·ΔW on ΔW, but λ on each factor, so λ²·ΔW, in factor space."""
    t = Term(torch.eye(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 2.0)
    product = fold_all("continual_ties", ContinualTiesParams(ties_space="product"), [t])
    assert torch.allclose(product.dense(), 0.5 * t.dense(), atol=1e-5)
    factors = fold_all("continual_ties", ContinualTiesParams(), [t])
    assert torch.allclose(factors.dense(), 0.25 * t.dense(), atol=1e-12)


def test_continual_ties_factors_two_steps_by_hand() -> None:
    """Rank 1, s = 1, λ = 1, no trim. A: [1, −1] then [−3, 1]: entry 0 elects − (1 − 3 < 0)
    and adds −3, entry 1 ties at 0, elects + and adds 1, so A_m = [−2, 0]; B: 2 then 2 agree,
    B_m = 2 + 4 = 6; ΔW = B_m A_m = [−12, 0] (on ΔW the same tasks give [−4, 0])."""
    terms = [
        Term(torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0]]), 1.0),
        Term(torch.tensor([[-3.0, 1.0]]), torch.tensor([[2.0]]), 1.0),
    ]
    p = ContinualTiesParams(lam=1.0, density=1.0)
    got = fold_all("continual_ties", p, terms).dense()
    assert torch.allclose(got, torch.tensor([[-12.0, 0.0]], dtype=torch.float64), atol=1e-12)
    product = fold_all("continual_ties", dataclasses.replace(p, ties_space="product"), terms)
    assert torch.allclose(product.dense(), torch.tensor([[-4.0, 0.0]]).double(), atol=1e-5)


def test_params_registered_and_checked() -> None:
    assert registry.parse_params("continual_ta", ["lambda=0.5"]) == ContinualTaParams(lam=0.5)
    with pytest.raises(AdbError, match=r"^continual_ties: density=0.0 must be in \(0, 1\]"):
        registry.parse_params("continual_ties", ["density=0"])
    parsed = registry.parse_params("continual_ties", ["ties_space=product", "state_rank=8"])
    assert parsed == ContinualTiesParams(ties_space="product", state_rank=8)
    with pytest.raises(AdbError, match=r"^continual_ties: state_rank applies to ties_space="):
        registry.parse_params("continual_ties", ["state_rank=8"])
    with pytest.raises(AdbError, match=r"^continual_ta: state_rank=0 must be >= 1"):
        registry.parse_params("continual_ta", ["state_rank=0"])
