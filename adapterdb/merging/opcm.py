"""OPCM, orthogonal projection continual merging (Tang et al., arXiv 2501.09522), on LoRA.

Per layer, with S_{t−1} = U diag(σ) Vᵀ the running (unscaled) sum of the cleaned task
updates, task t's update τ_t is cleaned in the singular basis of S_{t−1}: P = Uᵀ τ_t V loses
its diagonal and its top-left `split` × `split` block, where `split` is the first index at
which the cumulative fraction Σ_{j≤i} σ_j / Σ σ exceeds `alpha` (0.5); then
S_t = S_{t−1} + U P' Vᵀ + (the part of τ_t outside U and V), and the merge is S_t rescaled
to the mean Frobenius norm of the task updates seen so far — as FusionBench's
`method/opcm/opcm.py` (`OPCMForCLIP.merge_linear_weights` and its λ_t rescaling) does on
dense weights.

LoRA differences, both forced by working from the factors: S_{t−1} has rank k ≤ (t−1)·r, and
singular vectors beyond k are an arbitrary basis of a null space, so the diagonal is removed
only for i < k (FusionBench's full SVD also zeroes u_iᵀ τ v_i for arbitrary null vectors);
and the rescaling is per layer (this function sees one layer), where FusionBench uses the
norm of the whole model's task vector. Everything is a thin product: τ_t = s·B·A, the removed
part is U C Vᵀ with C (k × k), and S_t = U (diag σ − C) Vᵀ + s·B·A, whose SVD `svd_plus`
updates from U and V (orthonormal already: only s·B and Aᵀ's parts outside them are
orthogonalised, where a QR of the stacked (out × (k + r)) factors cost 4× more on a
16384-row layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adapterdb.errors import AdbError
from adapterdb.merging.layers import (
    LowRank,
    State,
    Term,
    register_continual,
    svd_of_factors,
    svd_plus,
)
from adapterdb.merging.registry import Params


@dataclass(frozen=True)
class OpcmParams(Params):
    """alpha: the cumulative-σ fraction that bounds the protected principal block (paper and
    FusionBench: 0.5)."""

    alpha: float = 0.5

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise AdbError(f"alpha={self.alpha} must be in [0, 1] (the paper's is 0.5)")


def term_norm(term: Term) -> float:
    """‖s·B·A‖_F from the factors: ‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ)."""
    a, b = term.a.double(), term.b.double()
    return abs(term.scale) * float((b.T @ b * (a @ a.T)).sum().clamp_min(0.0)) ** 0.5


def split_index(s: torch.Tensor, alpha: float) -> int:
    """The first i with Σ_{j≤i} σ_j / Σ σ > alpha (0 if none, as argmax of all-False)."""
    above = (s.cumsum(0) / s.sum()) > alpha
    return int(above.float().argmax()) if bool(above.any()) else 0


def project_out(prev: LowRank, new: Term, alpha: float) -> torch.Tensor:
    """C (k × k): the coordinates Uᵀ τ V that OPCM removes (the top-left split block and the
    diagonal inside the rank)."""
    p = (new.scale * (prev.u.T @ new.b.double())) @ (new.a.double() @ prev.vh.T)
    split = split_index(prev.s, alpha)
    keep = torch.eye(prev.rank, dtype=torch.bool)
    keep[:split, :split] = True
    return p * keep


@register_continual("opcm", params=OpcmParams)
def opcm(
    state: Mapping[str, torch.Tensor] | None, new: Term, t: int, p: OpcmParams
) -> tuple[LowRank, State]:
    """Fold task t into the running OPCM merge of one LoRA layer (see the module doc)."""
    norm_sum = float(state["norm_sum"]) if state else 0.0
    norm_sum += term_norm(new)
    b_new, a_new = new.b.double() * new.scale, new.a.double()
    if state is None or state["s"].numel() == 0:
        total = svd_of_factors(b_new, a_new)
    else:
        prev = LowRank(state["u"], state["s"], state["vh"])
        core = torch.diag(prev.s) - project_out(prev, new, p.alpha)
        total = svd_plus(prev.u, core, prev.vh.T, b_new, a_new)
    energy = float(total.s.square().sum()) ** 0.5
    scale = (norm_sum / t) / energy if energy > 0 else 0.0
    merged = LowRank(total.u, total.s * scale, total.vh)
    return merged, {
        "u": total.u,
        "s": total.s,
        "vh": total.vh,
        "norm_sum": torch.tensor(norm_sum, dtype=torch.float64),
    }
