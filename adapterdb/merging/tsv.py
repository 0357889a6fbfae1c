"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
Merging", CVPR 2025) on one LoRA layer, as FusionBench's `task_singular_vector`
(`TSVM_utils.compute_and_sum_svd_mem_reduction`) does on dense task matrices:

1. each task keeps the top k = ⌊min(out, in) / T⌋ singular triplets of its own ΔW_t;
2. the kept U's are concatenated side by side (out × K), the kept Vᵀ's likewise (K × in), and
   each concatenation is replaced by its orthonormal polar factor (P Qᵀ of its SVD P S Qᵀ);
3. ΔW = α · Û diag(s) V̂ᵀ with the kept singular values s in the same order.

LoRA differences, so that the result is well defined: ΔW_t has rank ≤ r_t, and its singular
vectors past that rank are an arbitrary basis of the null space (FusionBench would keep them
with σ = 0, and they would still steer the polar factor), so a task keeps only its non-zero
triplets, min(k, rank ΔW_t). For the same reason the polar factor is the partial isometry:
it drops the directions of zero singular value (e.g. two identical tasks give a
rank-deficient concatenation; with this choice T identical tasks merge to that task's own
top-k part, not to T times it nor to arbitrary extra directions).
Everything runs in the tasks' `SharedBasis` (one QR of the stacked B's, one of the A's): each
ΔW_t's SVD, the polar factors of the concatenations (their column spaces lie in the basis, so
the polar factor of Q·C is Q times that of C) and the rebuild are all on ≤ Σr-row coordinates,
and the result is rotated out once. Factoring each task and each concatenation on the full
out × K matrices cost 4× more on a 16384-row layer (bench/continual_bench.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapterdb.merging.layers import LowRank, SharedBasis, Term, register_layer, svd_of_factors
from adapterdb.merging.registry import Params

# singular values of a concatenation of unit vectors below this are duplicates' rounding noise
_ISOMETRY_TOL = 1e-10


@dataclass(frozen=True)
class TsvParams(Params):
    """alpha: scales the merged update (FusionBench's scalar `alpha`, default 1)."""

    alpha: float = 1.0


def partial_isometry(m: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor P Qᵀ of m = P S Qᵀ over the non-zero S only: the nearest
    matrix with orthonormal columns (rows) when m has full rank, and still unique when it has
    not (FusionBench's full polar factor then depends on arbitrary null-space vectors)."""
    p, s, qh = torch.linalg.svd(m, full_matrices=False)
    keep = s > _ISOMETRY_TOL * s[0] if s.numel() else s > 0
    return p[:, keep] @ qh[keep]


def rebuild(parts: Sequence[LowRank], s: torch.Tensor) -> LowRank:
    """ΔW = Û diag(s) V̂ᵀ from the parts' concatenated, orthogonalised singular vectors,
    returned as a thin SVD (`s` pairs with the concatenated columns, in order). The parts may
    be in any orthonormal coordinates (a `SharedBasis`'s): the result is in the same ones."""
    u = torch.cat([x.u for x in parts], 1)
    vh = torch.cat([x.vh for x in parts], 0)
    if not s.numel():
        return svd_of_factors(u, vh)
    return svd_of_factors(partial_isometry(u) * s, partial_isometry(vh))


@register_layer("tsv", params=TsvParams)
def tsv(terms: Sequence[Term], p: TsvParams) -> LowRank:
    """TSV-Merge of the T tasks of one layer (see the module doc)."""
    basis = SharedBasis.of(terms)
    out, inp = terms[0].b.shape[0], terms[0].a.shape[1]
    per_task = min(out, inp) // len(terms)
    parts = [basis.task(i).truncated(per_task) for i in range(len(terms))]
    return basis.lift(rebuild(parts, torch.cat([x.s for x in parts]) * p.alpha))
