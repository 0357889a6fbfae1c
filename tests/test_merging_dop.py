"""DOP (adapterdb.merging.dop): the factor-space closed form against dense float64 references
(`subspace_reference`: FusionBench's loss minimised by a Newton step, and its iterative loop)."""

from __future__ import annotations

import pytest
import subspace_reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.errors import AdbError
from adapterdb.merging.dop import DopParams, dop, energy_rank
from adapterdb.merging.layers import LAYER_METHODS, LowRank, Term

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
# Both sides solve the same quadratic in float64, adb on (K x K') cores, the reference by the
# pseudo-inverse of the dense Hessian; their gap is a few float64 ulps times the conditioning
# of the small systems (well under 1e-9 for these sizes), so 1e-7 of the tasks' scale leaves
# room yet catches any wrong term (those are O(1)).
RTOL = 1e-7


def run_dop(terms: list[Term], p: DopParams) -> LowRank:
    """The continual method over a task sequence, the state handed back as the workflow does."""
    state = None
    for t, term in enumerate(terms, 1):
        merged, state = dop(state, term, t, p)
    return merged


@st.composite
def lora_terms(draw: st.DrawFn) -> list[Term]:
    """T = 1…6 LoRA terms of one layer: ranks incl. 1, out ≠ in, fp32 or bf16 factors, with
    zero and identical updates among them."""
    out, inp = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    terms: list[Term] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["gauss", "gauss", "zero", "same"]))
        if kind == "same" and terms:
            terms.append(terms[-1])
            continue
        rank = draw(st.integers(1, 3))
        a = torch.randn(rank, inp, generator=gen).to(dtype)
        b = torch.randn(out, rank, generator=gen).to(dtype) * (kind != "zero")
        terms.append(Term(a, b, draw(st.sampled_from([1.0, 0.5, 2.0]))))
    return terms


PARAMS = st.builds(
    DopParams,
    alpha=st.sampled_from([0.0, 0.5, 0.8, 1.0]),
    svd_epsilon=st.sampled_from([0.99999, 1.0, 0.7, 0.3]),
    svd_proj_space=st.sampled_from(["uv", "u", "v"]),
)


@SETTINGS
@given(lora_terms(), PARAMS)
def test_matches_dense_reference(terms: list[Term], p: DopParams) -> None:
    merged = run_dop(terms, p)
    dense = [t.dense() for t in terms]
    want = ref.dop_sequence(dense, p.alpha, p.svd_epsilon, p.svd_proj_space)
    scale = max(float(sum(d.norm() for d in dense)), 1e-30)
    assert float((merged.dense() - want).norm()) <= RTOL * scale
    assert merged.u.shape[0] == dense[0].shape[0] and merged.vh.shape[1] == dense[0].shape[1]
    assert bool((merged.s > 0).all()) and merged.rank <= sum(t.a.shape[0] for t in terms)


def _pair(seed: int) -> tuple[LowRank, torch.Tensor, torch.Tensor]:
    """adb's DOP step for two random rank-2 tasks of a 5 x 4 layer, and the tasks' ΔW."""
    gen = torch.Generator().manual_seed(seed)
    terms = [Term(torch.randn(2, 4, generator=gen), torch.randn(5, 2, generator=gen), 0.7)]
    terms.append(Term(torch.randn(2, 4, generator=gen), torch.randn(5, 2, generator=gen), 0.7))
    return run_dop(terms, DopParams(alpha=0.7)), terms[0].dense(), terms[1].dense()


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_is_the_limit_of_gradient_descent(seed: int) -> None:
    """FusionBench's loss, fixed weights, optimised by plain gradient descent to convergence
    from its start: the very same ΔW (GD never moves the part the loss ignores)."""
    merged, prev, tau = _pair(seed)
    gd = ref.dop_iterative(prev, tau, 0.7, "gd", steps=3000)
    assert float((merged.dense() - gd).norm()) <= 1e-9 * float(gd.norm())


def test_closed_form_reaches_adams_minimum() -> None:
    """FusionBench's Adam loop converges to the same loss, and to the same ΔW inside both tasks'
    protected subspaces; it differs only where the loss is flat (Adam is not rotation-
    invariant, so it drifts there)."""
    merged, prev, tau = _pair(0)
    adam = ref.dop_iterative(prev, tau, 0.7, "adam", steps=3000)
    loss = ref.dop_objective((prev, tau), 0.7)
    closed, iterated = float(loss(merged.dense())), float(loss(adam))
    assert closed <= iterated <= closed * (1 + 1e-6)
    diff = merged.dense() - adam
    for x in (prev, tau):
        u, _, v = ref.dop_heads(x, 0.99999)
        assert float((u.T @ diff).norm()) <= 1e-3 * float(adam.norm())
        assert float((diff @ v).norm()) <= 1e-3 * float(adam.norm())


def test_worked_examples() -> None:
    """2 x 2 by hand (α = ½, ε = 1, "uv"): P = Q = Σ w_i s_i² e_i e_iᵀ, C = Σ w_i 2 s_i³ e_i e_iᵀ.
    Orthogonal tasks τ_1 = 2·e1e1ᵀ, τ_2 = e2e2ᵀ: X_ab = C_ab / (λ_a + μ_b) gives diag(2, 1),
    both kept whole (the average would halve them). Collinear τ_1 = 2·e1e1ᵀ, τ_2 = e1e1ᵀ:
    X_11 = ½(2·8 + 2·1) / (2 · ½(4 + 1)) = 1.8, the s²-weighted mean, not the average 1.5."""
    e1, e2 = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    p = DopParams(alpha=0.5, svd_epsilon=1.0)
    orthogonal = run_dop([Term(e1.T, e1, 2.0), Term(e2.T, e2, 1.0)], p)
    torch.testing.assert_close(orthogonal.dense(), torch.diag(torch.tensor([2.0, 1.0])).double())
    collinear = run_dop([Term(e1.T, e1, 2.0), Term(e1.T, e1, 1.0)], p)
    torch.testing.assert_close(collinear.dense(), torch.diag(torch.tensor([1.8, 0.0])).double())


def test_first_task_is_the_merge_and_state_is_its_svd() -> None:
    term = Term(torch.randn(2, 6), torch.randn(3, 2), 0.5)
    merged, state = dop(None, term, 1, DopParams())
    torch.testing.assert_close(merged.dense(), term.dense())
    assert set(state) == {"u", "s", "vh"} and all(v.dtype == torch.float64 for v in state.values())
    assert LAYER_METHODS["dop"].kind == "continual" and LAYER_METHODS["dop"].params is DopParams


def test_never_forms_the_dense_update() -> None:
    """A 10⁵ x 10⁵ layer (80 GB dense in float64) merges in factor space."""
    gen, n = torch.Generator().manual_seed(0), 100_000
    terms = [
        Term(torch.randn(2, n, generator=gen), torch.randn(n, 2, generator=gen), 1.0)
        for _ in range(2)
    ]
    assert run_dop(terms, DopParams()).rank == 4


def test_energy_rank() -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # shares .4 .7 .9 1
    assert [energy_rank(s, e) for e in (0.1, 0.4, 0.41, 0.9, 0.99999, 1.0)] == [1, 1, 2, 3, 4, 4]
    assert energy_rank(s[:0], 0.5) == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"alpha": 1.5}, r"alpha=1.5 is out of range; use a weight in \[0, 1\]"),
        ({"svd_epsilon": 0.0}, r"svd_epsilon=0.0 is out of range; use a share in \(0, 1\]"),
        ({"svd_proj_space": "w"}, "svd_proj_space='w' is not one of: uv, u, v"),
    ],
)
def test_bad_params(params: dict[str, object], message: str) -> None:
    with pytest.raises(AdbError, match=message):
        DopParams(**params)  # type: ignore[arg-type]
