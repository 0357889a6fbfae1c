"""Isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces", arXiv 2502.04959) on one LoRA layer, as FusionBench's
`isotropic_merging` (`iso_utils.iso_c`, `iso_utils.iso_cts`) does on dense task matrices.

Iso-C: SVD of the sum Σ_t ΔW_t = U S Vᵀ, then every singular value is set to their mean
(a flat, isotropic spectrum in the same subspace): ΔW = α · mean(S) · U Vᵀ.

Iso-CTS: the top k_c directions of the sum's SVD are the common subspace; each task adds its
top d directions of (I − U_c U_cᵀ) ΔW_t (what the common subspace misses). The common and
task-specific U's (and Vᵀ's) are concatenated, orthogonalised by their polar factor, and
given one flat spectrum: ΔW = α · mean(s) · Û V̂ᵀ. k_c = ⌊n · common_space_fraction⌋, then
rounded so that the remaining n − k_c directions split evenly: d = round((n − k_c) / T),
k_c = n − T·d (d capped at ⌊n / T⌋ so that k_c ≥ 0, where FusionBench's slice would wrap).

LoRA differences: n, the size of "the spectrum", is the rank of the low-rank sum (≤ Σ r_t),
not min(out, in) as on a dense matrix: past that rank the singular values are zero and the
singular vectors an arbitrary null-space basis, so flattening all min(out, in) values (as
FusionBench does) would write the mean onto arbitrary directions. So every mean is over the
non-zero spectrum: the sum's non-zero singular values (Iso-C), and the kept non-zero ones
(Iso-CTS: a task residual of rank < d keeps only its non-zero triplets). Orthogonalisation
is `tsv.partial_isometry`, for the same reason as in TSV.

Speed: Iso-C's flat spectrum keeps the sum's orthonormal singular vectors, so it is one SVD
of the sum (`from_orthonormal`, no second factorisation); Iso-CTS runs, like TSV, in the
tasks' `SharedBasis` and rotates its result out once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapterdb.errors import AdbError
from adapterdb.merging.layers import (
    LowRank,
    SharedBasis,
    Term,
    from_orthonormal,
    register_layer,
    svd_of_factors,
    svd_of_sum,
)
from adapterdb.merging.registry import Params
from adapterdb.merging.tsv import rebuild

# a task residual's singular values below this fraction of ‖s·B‖·‖A‖ are projection noise
_RESIDUAL_TOL = 1e-10


@dataclass(frozen=True)
class IsoCParams(Params):
    """alpha: scales the merged update (FusionBench's `scaling_factor`, the paper's α)."""

    alpha: float = 1.0


@dataclass(frozen=True)
class IsoCtsParams(IsoCParams):
    """common_space_fraction: share of the spectrum given to the common subspace
    (FusionBench's default 0.8; 1 is Iso-C)."""

    common_space_fraction: float = 0.8

    def validate(self) -> None:
        if not 0 <= self.common_space_fraction <= 1:
            raise AdbError(
                f"common_space_fraction={self.common_space_fraction} must be in [0, 1] "
                "(the share of the merged spectrum kept for the common subspace)"
            )


def flat_spectrum(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """α times the mean of the (non-zero: `LowRank` keeps no others) singular values, for
    each of them."""
    return torch.full_like(s, alpha * float(s.mean())) if s.numel() else s


@register_layer("iso_c", params=IsoCParams)
def iso_c(terms: Sequence[Term], p: IsoCParams) -> LowRank:
    """Iso-C: the sum's singular vectors with a flat spectrum (see the module doc)."""
    total = svd_of_sum(terms)
    return from_orthonormal(total.u, flat_spectrum(total.s, p.alpha), total.vh)


def split_spectrum(n: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(k_c, d): common directions and directions per task, k_c + T·d = n (module doc)."""
    common = int(n * fraction)
    per_task = min(round((n - common) / tasks), n // tasks)
    return n - tasks * per_task, per_task


def residual(b: torch.Tensor, a: torch.Tensor, common: torch.Tensor, per_task: int) -> LowRank:
    """The top `per_task` non-zero triplets of (I − U_c U_cᵀ) ΔW_t, from ΔW_t = b aᵀ (in
    `SharedBasis` coordinates, where U_c is too)."""
    part = svd_of_factors(b - common @ (common.T @ b), a.T)
    noise = _RESIDUAL_TOL * float(b.norm()) * float(a.norm())
    return part.truncated(min(per_task, int((part.s > noise).sum())))


@register_layer("iso_cts", params=IsoCtsParams)
def iso_cts(terms: Sequence[Term], p: IsoCtsParams) -> LowRank:
    """Iso-CTS: common plus task-specific directions, one flat spectrum (see the module doc)."""
    basis = SharedBasis.of(terms)
    total = basis.total()
    common, per_task = split_spectrum(total.rank, len(terms), p.common_space_fraction)
    pairs = zip(basis.b, basis.a, strict=True)
    parts = [residual(b, a, total.u[:, :common], per_task) for b, a in pairs]
    parts.append(total.truncated(common))
    return basis.lift(rebuild(parts, flat_spectrum(torch.cat([x.s for x in parts]), p.alpha)))
