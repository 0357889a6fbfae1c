"""Back from product space to LoRA factors: best rank-r factorisations of merged ΔW.

A linear merge of LoRAs, ΔW = Σ_t c_t · B_t A_t, has rank <= Σ_t r_t but lives in an n×m
matrix (2048×16384 for one Gemma MLP projection). `refactor` finds its exact truncated SVD
from the factors alone: with U = [c_1 B_1 | ... | c_T B_T] and V = [A_1; ...; A_T],
U = Q_u R_u and Vᵀ = Q_v R_v give ΔW = Q_u (R_u R_vᵀ) Q_vᵀ, so the SVD of the small
(Σr × Σr) core gives the SVD of ΔW. Cost O((n + m)(Σr)²), never O(n·m).
`dense_refactor` is the fallback for merges that are not linear in the factors (TIES,
MagMax, ... in product space) and so already hold a dense ΔW.

Both return float32 factors (A', B') with ΔW ≈ B'·A' (scale 1: the LoRA scaling is folded
in, singular values split as sqrt into both factors so they have equal norms) and the relative
Frobenius error ||ΔW − B'A'||_F / ||ΔW||_F (0 for ΔW = 0). Conv LoRA shapes are kept:
A' (rank, in, kh, kw), B' (out, rank, 1, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from adapterdb.errors import AdbError, MismatchError

Factors = tuple[torch.Tensor, torch.Tensor, float]
_OVERSAMPLE, _POWER_ITERS = 32, 4


def refactor(
    terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]], rank: int, name: str = "tensor"
) -> Factors:
    """Exact best rank-`rank` factors of ΔW = Σ_t c_t · B_t A_t, without forming ΔW.

    `terms` are (A_t, B_t, c_t); ranks r_t may differ, in/out shapes must agree. `name` only
    labels error messages. Ranks beyond rank(ΔW) are zero-padded.
    """
    _check_rank(rank, name)
    if not terms:
        raise ValueError("refactor needs at least one (A, B, scale) term")
    a0, b0, _ = terms[0]
    for i, (a, b, _) in enumerate(terms):
        if a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] or a.shape[0] != b.shape[1]:
            raise MismatchError(
                f"tensor '{name}': LoRA term {i} has A {tuple(a.shape)}, B {tuple(b.shape)}, "
                f"incompatible with A {tuple(a0.shape)}, B {tuple(b0.shape)}; "
                "merge adapters of the same base model and target modules"
            )
    # float64: the QRs are thin (Σr columns), so exactness costs little
    u = torch.cat([b.flatten(1).double() * c for a, b, c in terms], dim=1)
    v = torch.cat([a.flatten(1).double() for a, b, c in terms], dim=0)
    q_u, r_u = torch.linalg.qr(u)
    q_v, r_v = torch.linalg.qr(v.T)
    p, s, qh = torch.linalg.svd(r_u @ r_v.T, full_matrices=False)
    a, b = _truncate(q_u @ p, s, qh @ q_v.T, rank)
    # Eckart–Young: the optimal error is the energy of the dropped singular values
    energy = float(s.square().sum())
    error = math.sqrt(float(s[rank:].square().sum()) / energy) if energy > 0 else 0.0
    return _lora_shaped(a, b, a0.shape[1:], b0.shape[2:], error)


def dense_refactor(delta: torch.Tensor, rank: int, name: str = "tensor") -> Factors:
    """Rank-`rank` factors of a dense ΔW ((out, in) or conv (out, in, kh, kw)).

    A full SVD of a 2048×16384 layer costs O(n²m) and tens of seconds on a CPU, so this is a
    seeded randomized SVD (Halko et al.: range finder with `_OVERSAMPLE` extra columns and
    `_POWER_ITERS` power iterations, O(nm·(rank + 32))). It is exact whenever
    rank + 32 >= min(n, m) (the sketch then spans ΔW's whole range) and near-optimal otherwise.
    The error is measured on the residual (one layer-sized temporary): deriving it from the
    singular values would cancel catastrophically in float32 when the fit is good.
    """
    _check_rank(rank, name)
    if delta.dim() not in (2, 4):
        raise MismatchError(
            f"tensor '{name}': a dense ΔW must be 2-D or 4-D (conv), got {tuple(delta.shape)}"
        )
    x = delta.flatten(1).float()
    basis = _range_basis(x, min(rank + _OVERSAMPLE, *x.shape))
    p, s, vh = torch.linalg.svd(basis.T @ x, full_matrices=False)
    a, b = _truncate(basis @ p, s, vh, rank)
    norm = float(torch.linalg.vector_norm(x, dtype=torch.float64))
    residual = float(torch.linalg.vector_norm(x - b @ a, dtype=torch.float64))
    error = residual / norm if norm > 0 else 0.0
    return _lora_shaped(a, b, delta.shape[1:], (1, 1) if delta.dim() == 4 else (), error)


def _range_basis(x: torch.Tensor, width: int) -> torch.Tensor:
    """Orthonormal (n, width) basis approximately spanning x's dominant column space (seeded)."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    probe = torch.randn(x.shape[1], width, generator=gen, device=x.device)
    basis = torch.linalg.qr(x @ probe).Q
    for _ in range(_POWER_ITERS):  # re-orthonormalise each half step for stability
        basis = torch.linalg.qr(x @ torch.linalg.qr(x.T @ basis).Q).Q
    return basis


def _truncate(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') in float32 from an SVD u·diag(s)·vh: top `rank` triplets, sqrt(s) into both
    factors, zero-padded when fewer than `rank` singular values exist."""
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    a = torch.zeros(rank, vh.shape[1], dtype=torch.float32, device=vh.device)
    b = torch.zeros(u.shape[0], rank, dtype=torch.float32, device=u.device)
    a[:keep] = root.unsqueeze(1) * vh[:keep]
    b[:, :keep] = u[:, :keep] * root
    return a, b


def _lora_shaped(
    a: torch.Tensor, b: torch.Tensor, a_tail: Sequence[int], b_tail: Sequence[int], error: float
) -> Factors:
    """Reshape 2-D factors to the LoRA layout (conv: A (r, in, kh, kw), B (out, r, 1, 1))."""
    return a.reshape(a.shape[0], *a_tail), b.reshape(b.shape[0], b.shape[1], *b_tail), error


def _check_rank(rank: int, name: str) -> None:
    if rank < 1:
        raise AdbError(f"tensor '{name}': target rank must be >= 1, got {rank}")
