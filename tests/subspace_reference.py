"""Slow, obviously-right float64 DENSE references for the LoRA-native subspace and continual
methods (`adapterdb.merging.layers` and its methods): each works on dense ΔW_t = s·B·A straight
from the paper's / FusionBench's formula; adb's factor-space results must agree with them.
One section per method, each owned by the helper that wrote the method.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import merge_reference
import torch

from adapterdb.merging.dare import keep_mask

# ---------------------------------------------------------------- DOP (adapterdb.merging.dop)


def dop_heads(tau: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) of τ's head: full dense SVD as FusionBench does, singular values below 1e-12 of
    the largest dropped as numerically zero, then the fewest leading ones holding ≥ ε of Σs."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=True)
    real = [x for x in s.tolist() if s.numel() and x > 1e-12 * float(s[0])]
    total, k = sum(real), 0
    while k < len(real) and sum(real[:k]) < epsilon * total:
        k += 1
    return u[:, :k], s[:k], vh[:k].T


def dop_objective(
    taus: Sequence[torch.Tensor], alpha: float, epsilon: float = 0.99999, space: str = "uv"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """X -> FusionBench's `cal_loss_i` summed with the fixed weights (α, 1 − α) (its
    `mgda: false` branch), over the tasks' heads (`dop_heads`, computed once)."""
    heads = [dop_heads(tau, epsilon) for tau in taus]

    def loss(x: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for w, tau, (u, s, v) in zip((alpha, 1.0 - alpha), taus, heads, strict=True):
            delta = x - tau
            loss_u = (torch.diag(s) @ u.T @ delta).square().sum()
            loss_v = (delta @ v @ torch.diag(s)).square().sum()
            total = total + w * {"uv": loss_u + loss_v, "u": loss_u, "v": loss_v}[space]
        return total

    return loss


def dop_step(
    prev: torch.Tensor, tau: torch.Tensor, alpha: float, epsilon: float = 0.99999, space: str = "uv"
) -> torch.Tensor:
    """The minimiser of the DOP loss nearest FusionBench's start (prev + tau)/2: the loss is
    quadratic, so one Newton step with the pseudo-inverse of its autograd Hessian reaches it
    (and leaves the start alone where the loss is flat, as gradient descent does)."""
    x0 = (prev + tau) / 2
    loss = dop_objective((prev, tau), alpha, epsilon, space)
    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(x), x)
    hess = torch.autograd.functional.hessian(loss, x0).reshape(x0.numel(), x0.numel())
    step = torch.linalg.pinv(hess, rtol=1e-11, hermitian=True) @ grad.reshape(-1)
    return x0 - step.reshape(x0.shape)


def dop_sequence(
    taus: Sequence[torch.Tensor], alpha: float, epsilon: float, space: str
) -> torch.Tensor:
    """DOP over a task sequence: the first task is the merge, then `dop_step` per task."""
    merged = taus[0]
    for tau in taus[1:]:
        merged = dop_step(merged, tau, alpha, epsilon, space)
    return merged


def dop_iterative(
    prev: torch.Tensor, tau: torch.Tensor, alpha: float, optimizer: str, steps: int
) -> torch.Tensor:
    """FusionBench's optimisation loop (`mgda: false`, default ε and "uv") in float64, from the
    simple average: "adam" as FusionBench (a larger lr, decayed so that it settles), or "gd"
    (plain gradient descent with step 1/L, L the loss's largest curvature)."""
    loss = dop_objective((prev, tau), alpha)
    x = ((prev + tau) / 2).clone().requires_grad_(True)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([x], lr=0.1)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1e-7 ** (1 / steps))
    else:
        hess = torch.autograd.functional.hessian(loss, x.detach())
        opt = torch.optim.SGD(
            [x], lr=1.0 / float(torch.linalg.eigvalsh(hess.reshape(x.numel(), -1))[-1])
        )
        sched = None
    for _ in range(steps):
        opt.zero_grad()
        loss(x).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return x.detach()


# ------------------------------------------- TSV, Iso-C, Iso-CTS, KnOTS (tsv.py, iso.py, knots.py)

# a unit-vector concatenation's singular values below this are duplicates' rounding noise
ISOMETRY_TOL = 1e-10


def nonzero_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense thin SVD of m keeping only the non-zero singular triplets (> 1e-12 of the top)."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    if not s.numel() or s[0] == 0:
        return u[:, :0], s[:0], vh[:0]
    keep = s > 1e-12 * s[0]
    return u[:, keep], s[keep], vh[keep]


def polar(m: torch.Tensor) -> torch.Tensor:
    """Partial isometry of m: P Qᵀ over its non-zero singular values (m = P S Qᵀ)."""
    p, s, qh = torch.linalg.svd(m, full_matrices=False)
    keep = s > ISOMETRY_TOL * s[0] if s.numel() else s > 0
    return p[:, keep] @ qh[keep]


def orthogonalised(
    us: Sequence[torch.Tensor], ss: Sequence[torch.Tensor], vhs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """FusionBench's rebuild: polar(U_cat) @ diag(s_cat) @ polar(Vh_cat)."""
    u, s, vh = torch.cat(list(us), 1), torch.cat(list(ss)), torch.cat(list(vhs), 0)
    if not s.numel():
        return torch.zeros(u.shape[0], vh.shape[1], dtype=torch.float64)
    return polar(u) @ torch.diag(s) @ polar(vh)


def tsv(deltas: Sequence[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """TSV-Merge: each task's top ⌊min(out, in)/T⌋ non-zero triplets, concatenated,
    orthogonalised, rebuilt, times alpha."""
    k = min(deltas[0].shape) // len(deltas)
    parts = [nonzero_svd(d) for d in deltas]
    return alpha * orthogonalised(
        [u[:, :k] for u, _, _ in parts], [s[:k] for _, s, _ in parts], [v[:k] for _, _, v in parts]
    )


def iso_c(deltas: Sequence[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """Iso-C: U (mean of the non-zero σ) Vᵀ of the sum, times alpha."""
    u, s, vh = nonzero_svd(sum(deltas))
    return alpha * float(s.mean()) * (u @ vh) if s.numel() else u @ vh


def iso_cts(
    deltas: Sequence[torch.Tensor], alpha: float = 1.0, fraction: float = 0.8
) -> torch.Tensor:
    """Iso-CTS: FusionBench's loop, with n = the rank of the sum instead of min(out, in)."""
    u, s, vh = nonzero_svd(sum(deltas))
    n, tasks = s.numel(), len(deltas)
    per_task = min(round((n - int(n * fraction)) / tasks), n // tasks)
    common = n - tasks * per_task
    uc = u[:, :common]
    us, ss, vhs = [uc], [s[:common]], [vh[:common]]
    for d in deltas:
        ur, sr, vr = torch.linalg.svd(d - uc @ uc.T @ d, full_matrices=False)
        keep = min(per_task, int((sr > 1e-10 * float(d.norm())).sum()))
        us.append(ur[:, :keep])
        ss.append(sr[:keep])
        vhs.append(vr[:keep])
    spectrum = torch.cat(ss)
    flat = [torch.full_like(x, float(spectrum.mean())) for x in ss] if spectrum.numel() else ss
    return alpha * orthogonalised(us, flat, vhs)


def knots(
    deltas: Sequence[torch.Tensor],
    merge: str = "ties",
    density: float = 0.2,
    elect: str = "sum",
    seed: int = 0,
    lam: float = 1.0,
) -> torch.Tensor:
    """KnOTS: SVD of [ΔW_1 … ΔW_T] (signed as `knots.aligned` does), the per-task blocks of
    Vᵀ merged by merge_reference's TIES / DARE loops on float32-rounded coordinates (adb's
    kernels compute in float32; the DARE masks are adb's, seeded by (seed, "knots", task)),
    rebuilt as U Σ V_mergedᵀ."""
    u, s, vh = nonzero_svd(torch.cat(list(deltas), 1))
    if not s.numel():
        return torch.zeros_like(deltas[0], dtype=torch.float64)
    for i in range(s.numel()):  # sign convention: the largest |entry| of each u_i is > 0
        if u[int(u[:, i].abs().argmax()), i] < 0:
            u[:, i], vh[i] = -u[:, i], -vh[i]
    coords = [c.float() for c in vh.split(deltas[0].shape[1], dim=1)]
    ones = [1.0] * len(coords)
    if merge == "ties":
        merged = merge_reference.ties(coords, density, ones, lam, elect)
    else:
        masks = [keep_mask(seed, "knots", t, c.shape, density) for t, c in enumerate(coords)]
        merged = merge_reference.dare(
            coords, masks, density, ones, lam, elect if merge == "dare_ties" else None
        )
    return (u * s) @ merged


# --------------------------------- OPCM, continual TA / TIES (opcm.py, continual.py; helper E1)


def opcm(deltas: Sequence[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """FusionBench's `OPCMForCLIP` loop on one layer, dense: full SVD of the running merge,
    P = Uᵀ τ V with its top-left split block and its diagonal zeroed, merge ← (λ_{t−1}·merge
    + U P Vᵀ) / λ_t with λ_t = ‖λ_{t−1}·merge + U P Vᵀ‖ / (mean ‖τ_i‖). Two changes, as adb's
    docstring says: the diagonal only inside the merge's numerical rank (beyond it U and V
    are an arbitrary null-space basis), and the norms per layer, not over the whole model."""
    merged = deltas[0].clone()
    norms, lam_prev = [float(deltas[0].norm())], 1.0
    for tau in deltas[1:]:
        norms.append(float(tau.norm()))
        u, s, vh = torch.linalg.svd(merged, full_matrices=True)
        v = vh.T
        rank = int((s > 1e-12 * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        p = u.T @ tau @ v
        if rank:
            frac = s.cumsum(0) / s.sum()
            above = [i for i in range(s.numel()) if frac[i] > alpha]
            split = above[0] if above else 0
            for i in range(rank):
                p[i, i] = 0.0
            p[:split, :split] = 0.0
        total = lam_prev * merged + u @ p @ v.T
        mean = sum(norms) / len(norms)  # 0 only when every update so far is 0 (merge 0)
        lam = float(total.norm()) / mean if mean > 0 else 0.0
        merged = total / lam if lam > 0 else torch.zeros_like(total)
        lam_prev = lam
    return merged


def continual_ta(deltas: Sequence[torch.Tensor], lam: float = 0.3) -> torch.Tensor:
    """FusionBench's `ContinualTaskArithmeticForCLIP`: merge ← merge + λ·τ_t from zero."""
    merged = torch.zeros_like(deltas[0])
    for tau in deltas:
        merged = merged + lam * tau
    return merged


def top_fraction(x: torch.Tensor, density: float) -> torch.Tensor:
    """x with entries below its ⌈density·n⌉-th largest magnitude zeroed (ties kept)."""
    k = max(1, math.ceil(density * x.numel()))
    tau = sorted(x.abs().flatten().tolist(), reverse=True)[k - 1]
    return torch.where(x.abs() >= tau, x, torch.zeros_like(x))


def ties_pair(x: torch.Tensor, y: torch.Tensor, density: float) -> torch.Tensor:
    """TIES_sum of two tensors, entry by entry: both trimmed to their top `density`, the sign
    elected by the sum of the trimmed pair (+ on a tie), the agreeing entries summed."""
    x, y = top_fraction(x, density), top_fraction(y, density)
    ties = torch.zeros_like(x)
    for idx in itertools.product(*(range(n) for n in x.shape)):
        sign = 1.0 if float(x[idx] + y[idx]) >= 0 else -1.0
        ties[idx] = sum(float(v) for v in (x[idx], y[idx]) if v * sign > 0)
    return ties


def continual_ties(
    deltas: Sequence[torch.Tensor], lam: float = 0.5, density: float = 0.2
) -> torch.Tensor:
    """FusionBench's `ContinualTiesMergingForCLIP` (merge_func sum) on one layer's dense ΔW
    (adb's ties_space=product): merge_1 = λ·τ_1, then merge ← merge + λ·ties_pair(merge, τ_t)."""
    merged = lam * deltas[0]
    for tau in deltas[1:]:
        merged = merged + lam * ties_pair(merged, tau, density)
    return merged


def continual_ties_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], lam: float = 0.5, density: float = 0.2
) -> torch.Tensor:
    """adb's ties_space=factors: the same loop on the A's and on the (s·B)'s separately, each
    factor a weight of its own (`factors`: (A_t, s_t·B_t) in float64); ΔW = B_m A_m."""
    a_m, b_m = lam * factors[0][0], lam * factors[0][1]
    for a, b in factors[1:]:
        a_m = a_m + lam * ties_pair(a_m, a, density)
        b_m = b_m + lam * ties_pair(b_m, b, density)
    return b_m @ a_m
