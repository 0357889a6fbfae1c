"""KnOTS (Stoica et al., "Model merging with SVD to tie the Knots", arXiv 2410.19735), made
for LoRA: align the tasks' updates in one shared basis, then merge their coordinates.

One SVD of the side-by-side concatenation [ΔW_1 … ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ] (the alignment
FusionBench's `knots_utils.subspace_alignment` computes) writes every task in the same
basis, ΔW_t = U Σ V_tᵀ; the coordinate matrices V_tᵀ (k × in) are merged entrywise with an
existing method (TIES by default, as the paper's KnOTS-TIES; or DARE's drop-and-rescale),
and ΔW = U Σ V_mergedᵀ. `lam` is the merge's λ (the paper's scaling coefficient).

From the factors: [s_1 B_1 A_1 | … | s_T B_T A_T] = [s_1 B_1 … s_T B_T] · blockdiag(A_1 … A_T),
a (Σr) -inner-dimension product whose SVD U Σ Vᵀ is exact, with only the k ≤ Σ r_t non-zero
directions (FusionBench keeps σ > 1e-4; here the numerical rank). The QR of the block
diagonal is the block diagonal of the tasks' own QRs: T thin (in × r_t) QRs, never the
(T·in × Σr) one (5× the work on a 16384-input layer). The
coordinates go to adb's registered `ties` / `dare_ties` / `dare` kernels in float32 (their
working precision), TIES trimming per coordinate matrix (the layer is the whole vector
here, where the paper trims over the whole model). DARE's masks are seeded by (seed,
"knots", task index): a layer method does not see the layer's name, so layers with equal
coordinate shapes draw equal masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from adapterdb.merging.dare import DareParams, DareTiesParams
from adapterdb.merging.layers import (
    LowRank,
    Term,
    register_layer,
    rotate,
    stacked_b,
    svd_in_bases,
    svd_of_core,
)
from adapterdb.merging.registry import Context, Params, get
from adapterdb.merging.ties import Elect, TiesParams, check_density

Merge = Literal["ties", "dare_ties", "dare"]


@dataclass(frozen=True)
class KnotsParams(Params):
    """merge: the method applied to the aligned coordinates; density, elect, seed, lam
    (`lambda`): its parameters (TIES' defaults: keep 20%, elect by sum, λ = 1)."""

    merge: Merge = "ties"
    density: float = 0.2
    elect: Elect = "sum"
    seed: int = 0
    lam: float = 1.0

    def validate(self) -> None:
        check_density(self.density)

    def coordinate_params(self) -> Params:
        """The parameters of the `merge` method, from the shared fields."""
        if self.merge == "ties":
            return TiesParams(density=self.density, elect=self.elect, trim="tensor", lam=self.lam)
        if self.merge == "dare_ties":
            return DareTiesParams(
                density=self.density, seed=self.seed, elect=self.elect, lam=self.lam
            )
        return DareParams(density=self.density, seed=self.seed, lam=self.lam)


@dataclass(frozen=True)
class Aligned:
    """U Σ [V_1ᵀ … V_Tᵀ]: the shared basis U (float64, orthonormal), Σ, and each task's
    coordinates V_tᵀ (k × in) in float32, the merge kernels' working precision (cast block by
    block: the whole (k × T·in) float64 concatenation is never formed)."""

    u: torch.Tensor
    s: torch.Tensor
    coords: list[torch.Tensor]


def aligned(terms: Sequence[Term]) -> Aligned:
    """The thin SVD U Σ [V_1ᵀ … V_Tᵀ] of the concatenation [ΔW_1 … ΔW_T], from the factors,
    each column of U signed so that its largest-magnitude entry is positive.

    An SVD fixes each (u_i, v_i) pair only up to a joint sign flip, and TIES is not odd in
    its inputs (a tied vote elects +1), so without a convention the merge would depend on the
    LAPACK build; this one is sklearn's `svd_flip`."""
    q_u, r_u = torch.linalg.qr(stacked_b(terms))
    sides = [torch.linalg.qr(t.a.double().T) for t in terms]  # A_tᵀ = Q_t R_t
    r_blocks = r_u.split([t.a.shape[0] for t in terms], 1)
    core = svd_of_core(
        torch.cat([r @ r_a.T for r, (_, r_a) in zip(r_blocks, sides, strict=True)], 1)
    )
    u = rotate(q_u, core.u)
    signs = u.gather(0, u.abs().argmax(0).unsqueeze(0)).sign().squeeze(0)
    heads = (core.vh * signs.unsqueeze(1)).split([q.shape[1] for q, _ in sides], 1)
    coords = [(h @ q.T).float() for h, (q, _) in zip(heads, sides, strict=True)]
    return Aligned(u * signs, core.s, coords)


@register_layer("knots", params=KnotsParams)
def knots(terms: Sequence[Term], p: KnotsParams) -> LowRank:
    """KnOTS: merge the tasks' coordinates in their shared SVD basis (see the module doc)."""
    basis = aligned(terms)
    if not basis.s.numel():
        return LowRank(basis.u, basis.s, basis.coords[0].double())
    merged = get(p.merge).merge(basis.coords, p.coordinate_params(), Context(name="knots"))
    # U orthonormal: ΔW = U (Σ V_merged) = U R_mᵀ Q_mᵀ needs only the QR of (Σ V_merged)ᵀ
    q_m, r_m = torch.linalg.qr((basis.s.unsqueeze(1) * merged.double()).T)
    return svd_in_bases(basis.u, r_m.T, q_m)
