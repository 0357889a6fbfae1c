"""DOP: dual orthogonal projections (Yang et al., "Continual Model Merging without Data: Dual
Projections for Balancing Stability and Plasticity", NeurIPS 2025), on LoRA factors.

DOP is continual by nature, so it is registered as a continual method: like FusionBench's
`method/dop/dop.py` (`ContinualDOPForCLIP`, which we read and re-derived), each step is a
two-model problem between the previous merge M (task vector τ_1) and the new task (τ_2) —
its result depends on the order and it never revisits older tasks, whose influence lives on
only through M. The state is therefore M itself (its thin SVD), not the history.

Per layer, with τ_i = U_i S_i V_iᵀ truncated to its head (the fewest leading directions
holding ≥ `svd_epsilon` of Σ s), DOP keeps the merge X close to each task inside that task's
input and output subspaces:

    L(X) = Σ_i w_i (‖S_i U_iᵀ (X − τ_i)‖²_F + ‖(X − τ_i) V_i S_i‖²_F),  w = (α, 1 − α)

(`svd_proj_space` "u" / "v" keeps only the first / second term). FusionBench starts from the
simple average X_0 = (τ_1 + τ_2)/2 and runs Adam on L, by default with MGDA re-weighting w as
it goes (`mgda: true`). With w fixed (its `mgda: false` branch; `alpha` is that weight), L is
quadratic and its gradient vanishes on a Sylvester equation

    P X + X Q = C,   P = Σ w_i U_i S_i² U_iᵀ,  Q = Σ w_i V_i S_i² V_iᵀ,
                     C = Σ w_i (P_i τ_i + τ_i Q_i),

which we solve in closed form: P and Q are low rank, so in the eigenbases of P and Q the
equation decouples entrywise, D[a, b] = R[a, b] / (λ_a + μ_b) for the residual R = C − P X_0 −
X_0 Q. Where λ_a + μ_b = 0 (outside both heads) L does not depend on X: we keep X_0 there,
which is exactly the limit of gradient descent from X_0 (it never moves X in that null space).
Adam is not rotation-invariant and also drifts inside it, so it reaches the same minimum of L
with a different X: `tests/test_merging_dop.py` checks both against float64 transcriptions of
the iterative optimisation (gradient descent: the same X; Adam: the same L).

Everything lives in the span of the two tasks' factors (U ⊂ span[U_1 U_2], V ⊂ span[V_1 V_2]),
so the solve runs on (K × K') cores, K ≤ rank τ_1 + rank τ_2, and never forms a dense
out × in matrix. MGDA's per-iteration weights depend on the optimiser's path and have no
closed form; they are not offered.

`svd_epsilon`: FusionBench keeps `searchsorted(cumsum(s)/sum(s), ε)` directions, one fewer than
"the fewest holding ≥ ε", which at ε = 1 would drop the last direction of an exactly low-rank
τ (its dense fp32 SVD hides this behind noise singular values); we keep the fewest holding ≥ ε.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from adapterdb.errors import AdbError
from adapterdb.merging.layers import (
    LowRank,
    State,
    Term,
    outside,
    register_continual,
    svd_in_bases,
    svd_of_sum,
)
from adapterdb.merging.registry import Params

# singular values of a side's stacked factors below this fraction of the largest are null
_NULL_TOL = 1e-10


@dataclass(frozen=True)
class DopParams(Params):
    """alpha: weight of the previous merge's loss (the new task gets 1 − alpha); svd_epsilon:
    share of each task's singular-value mass whose directions are protected; svd_proj_space:
    protect the output ("u"), input ("v") or both ("uv") subspaces. FusionBench's defaults."""

    alpha: float = 0.8
    svd_epsilon: float = 0.99999
    svd_proj_space: Literal["uv", "u", "v"] = "uv"

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise AdbError(f"alpha={self.alpha} is out of range; use a weight in [0, 1]")
        if not 0.0 < self.svd_epsilon <= 1.0:
            raise AdbError(f"svd_epsilon={self.svd_epsilon} is out of range; use a share in (0, 1]")


@register_continual("dop", params=DopParams)
def dop(
    state: Mapping[str, torch.Tensor] | None, new: Term, t: int, p: DopParams
) -> tuple[LowRank, State]:
    """Fold task t into the merge (t is unused: DOP's weights do not depend on it). The first
    task is the merge, as in FusionBench; state = the merge's thin SVD."""
    task = svd_of_sum([new])
    if state is None:
        merged = task
    else:
        merged = _dop_pair(LowRank(state["u"], state["s"], state["vh"]), task, p)
    return merged, {"u": merged.u, "s": merged.s, "vh": merged.vh}


def energy_rank(s: torch.Tensor, epsilon: float) -> int:
    """The fewest leading singular values holding ≥ `epsilon` of their sum."""
    if s.numel() == 0:
        return 0
    share = s.cumsum(0) / s.sum()
    return min(int((share < epsilon).sum()) + 1, s.numel())


def _dop_pair(prev: LowRank, task: LowRank, p: DopParams) -> LowRank:
    """The closed-form minimiser of L (module doc) for (merge, new task), from the factors."""
    pair = (prev, task)
    weights = (p.alpha, 1.0 - p.alpha)
    # each τ_i in the small coordinates of joint bases: U_i = q_u u_c[i], V_i = q_v v_c[i]
    q_u, u_c = _joint_basis(prev.u, task.u)
    q_v, v_c = _joint_basis(prev.vh.T, task.vh.T)
    taus = [(u * x.s) @ v.T for u, v, x in zip(u_c, v_c, pair, strict=True)]
    x0 = (taus[0] + taus[1]) / 2
    resid = [tau - x0 for tau in taus]
    # √w_i · S_i over each task's head: the sides' operators are Σ_i (U_i √w_i S_i)(…)ᵀ
    roots = [
        w**0.5 * x.s[: energy_rank(x.s, p.svd_epsilon)] for w, x in zip(weights, pair, strict=True)
    ]
    g = [u[:, : r.numel()] * r for u, r in zip(u_c, roots, strict=True)]
    h = [v[:, : r.numel()] * r for v, r in zip(v_c, roots, strict=True)]
    if p.svd_proj_space == "v":
        g = [gi[:, :0] for gi in g]
    if p.svd_proj_space == "u":
        h = [hi[:, :0] for hi in h]
    e_u, sigma, z_u = _side(g, [gi.T @ r for gi, r in zip(g, resid, strict=True)])
    e_v, nu, z_v = _side(h, [hi.T @ r.T for hi, r in zip(h, resid, strict=True)])
    # R̂ = Eᵤᵀ R E_v = σ ⊙ (Z_u E_v) + (E_uᵀ Z_vᵀ) ⊙ ν; D̂ = R̂ / (σ² + ν²), 0 where both vanish
    num = sigma[:, None] * (z_u @ e_v) + (e_u.T @ z_v.T) * nu[None, :]
    den = sigma[:, None].square() + nu[None, :].square()
    d_hat = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    y = x0 + e_u @ d_hat @ e_v.T
    return svd_in_bases(q_u, y, q_v)


def _joint_basis(
    first: torch.Tensor, second: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """An orthonormal basis q of span[first | second] (both with orthonormal columns) and both
    in its coordinates: q = [first | the part of `second` outside it] (`outside`), which costs
    O(n · k2 · (k1 + k2)) where a QR of the stacked (n × (k1 + k2)) matrix would cost
    O(n · (k1 + k2)²): k1 (the merge's rank) grows with every task, k2 = r does not. Directions
    of `second` already inside `first` come out with ~0 coordinates, which the solve ignores."""
    e, inside, rest = outside(first, second)
    basis = torch.cat([first, e], 1)
    coords_first = torch.eye(basis.shape[1], first.shape[1], dtype=torch.float64)
    return basis, [coords_first, torch.cat([inside, rest], 0)]


def _side(
    factors: Sequence[torch.Tensor], projected: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One side of the Sylvester solve. With G = [G_1 | G_2] = E diag(σ) Wᵀ (full E, σ padded
    with zeros; the side's operator is G Gᵀ = Σ_i G_i G_iᵀ), returns E, σ and
    Z = Σ_i W_iᵀ (G_iᵀ R_i) — so Eᵀ (Σ_i G_i G_iᵀ R_i) = σ ⊙ Z, computed without squaring σ,
    which keeps small but real directions accurate. `projected` holds the G_iᵀ R_i."""
    g = torch.cat(list(factors), 1)
    e, s, wh = torch.linalg.svd(g, full_matrices=True)
    keep = int((s > _NULL_TOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    sigma = torch.zeros(g.shape[0], dtype=torch.float64)
    sigma[:keep] = s[:keep]
    z = torch.zeros(g.shape[0], projected[0].shape[1], dtype=torch.float64)
    z[:keep] = wh[:keep] @ torch.cat(list(projected), 0)
    return e, sigma, z
