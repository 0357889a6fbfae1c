"""Continual Task Arithmetic and continual TIES, per LoRA layer, from the factors.

FusionBench's `method/opcm/task_arithmetic.py` keeps one merged model and adds each new task
vector scaled by λ (`scaling_factor` 0.3): M_t = M_{t−1} + λ·τ_t, M_0 = 0.
`method/opcm/ties_merging.py` (λ = 0.5, `threshold` 20 %, `merge_func` sum) starts from
M_1 = λ·τ_1 and then adds λ·TIES(M_{t−1}, τ_t): both trimmed to their top 20 % entries by
magnitude, a sign elected per entry by the sum, and the agreeing entries SUMMED (not
averaged, as plain TIES does). Both are defined on whole weights; here per LoRA layer:

- continual_ta is linear, so it stays low rank: the state is M_{t−1} as a thin SVD and each
  step one incremental SVD (`svd_plus`), no dense matrix. Exact by default, its state has rank
  ≤ min(t·r, out, in): (out + in + 1)·min(t·r, out, in) float64 numbers per layer after task
  t, growing with the history (a 2048 × 16384 layer at r = 32: 4.7 MB more per task; the
  Gemma-shaped adapter: 314 MB more per task), and so does a step's cost, O((out + in)·t·r²)
  plus a rotation O((out + in)·(t·r)²). `state_rank` caps it (Eckart–Young truncation; the
  error goes in the state, `STATE_ERROR`); the default stays exact, as FusionBench's.
- continual_ties is element-wise, so, as adb's `ties`, it runs in one of two spaces
  (`ties_space`):
  - factors (default, as `ties` runs in `adb run`): the rule on the A and B tensors separately
    (s folded into B), as if each factor were a weight: A_m ← A_m + λ·TIES(A_m, A_t), same for
    B. The state is (A_m, B_m), rank r, exact; ΔW = B_m A_m (so ΔW_1 = λ²·s·B_1 A_1, as in
    adb's factor-space task arithmetic). Needs equal ranks across the tasks.
  - product: the rule on ΔW. The dense ΔW of ONE layer exists during the step (the trim and
    the sign election need every entry); the state is the result refactored by the
    randomized SVD (`adapterdb.lowrank.dense_refactor`, O(out·in·(k + 32))) to rank
    k = `state_rank`. The next step continues from that rank-k L_t, and ‖M_t − L_t‖ / ‖M_t‖
    is kept in the state (`STATE_ERROR`) and folded into the error the workflow records
    (`layers.output_error`). Default k = r: the state is then the published rank-r adapter
    (what is evaluated is what the next step continues from) at the adapter's size. A larger
    k keeps the state closer to the dense chain but hardly the output: on the Gemma-shaped
    q/k projections after 5 tasks, the rank-32 output is 0.702 / 0.663 (relative Frobenius)
    from FusionBench's dense M_5 at k = 32 and 0.697 / 0.648 at k = 128, against 0.687 / 0.638
    for the best rank-32 approximation of M_5 itself, for 4x the state and time.
  The trim is per tensor (factors) or per layer (product); FusionBench trims over the whole
  model's vector, but these functions see one layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from adapterdb.errors import AdbError, MismatchError
from adapterdb.lowrank import dense_refactor
from adapterdb.merging.layers import (
    STATE_ERROR,
    LowRank,
    State,
    Term,
    register_continual,
    svd_of_factors,
    svd_plus,
)
from adapterdb.merging.registry import Params
from adapterdb.merging.ties import check_density


def check_state_rank(state_rank: int | None) -> None:
    if state_rank is not None and state_rank < 1:
        raise AdbError(f"state_rank={state_rank} must be >= 1, or none for the default")


@dataclass(frozen=True)
class ContinualTaParams(Params):
    """lam (`lambda`): the scaling of each added task vector (FusionBench: 0.3); state_rank:
    cap on the rank of the stored running merge (none: exact, rank ≤ t·r)."""

    lam: float = 0.3
    state_rank: int | None = None

    def validate(self) -> None:
        check_state_rank(self.state_rank)


@dataclass(frozen=True)
class ContinualTiesParams(Params):
    """lam (`lambda`): scaling of each added TIES vector (FusionBench: 0.5); density: the
    fraction of entries each side keeps (FusionBench `threshold` 20 → 0.2); ties_space: TIES
    on the LoRA factors or on ΔW (see the module doc); state_rank: product space's state rank
    (none: the task's LoRA rank r). Not `space`: that name is the merge's own output-space
    option (`--space`, `space=` in Python), recorded in the same commit params."""

    lam: float = 0.5
    density: float = 0.2
    ties_space: Literal["factors", "product"] = "factors"
    state_rank: int | None = None

    def validate(self) -> None:
        check_density(self.density)
        check_state_rank(self.state_rank)
        if self.state_rank is not None and self.ties_space == "factors":
            raise AdbError(
                "state_rank applies to ties_space=product only; factor space keeps the rank-r "
                "factors exactly"
            )


def lowrank_state(m: LowRank, error: float = 0.0) -> State:
    """A running merge held as a thin SVD, with how far this step's truncation put it from
    the step's exact merge (0: not truncated)."""
    return {"u": m.u, "s": m.s, "vh": m.vh, STATE_ERROR: torch.tensor(error, dtype=torch.float64)}


@register_continual("continual_ta", params=ContinualTaParams)
def continual_ta(
    state: Mapping[str, torch.Tensor] | None, new: Term, t: int, p: ContinualTaParams
) -> tuple[LowRank, State]:
    """M_t = M_{t−1} + λ·s·B·A, from the factors; truncated to `state_rank` if set."""
    b_new, a_new = new.b.double() * (p.lam * new.scale), new.a.double()
    if state is None:
        merged = svd_of_factors(b_new, a_new)
    else:
        merged = svd_plus(state["u"], torch.diag(state["s"]), state["vh"].T, b_new, a_new)
    if p.state_rank is None or merged.rank <= p.state_rank:
        return merged, lowrank_state(merged)
    error = merged.truncation_error(p.state_rank)
    kept = merged.truncated(p.state_rank)
    return kept, lowrank_state(kept, error)


def trimmed(x: torch.Tensor, density: float) -> torch.Tensor:
    """x with all but its top ⌈density·n⌉ magnitudes zeroed (ties at the threshold kept)."""
    if density >= 1 or x.numel() == 0:
        return x
    k = max(1, math.ceil(density * x.numel()))
    tau = x.abs().flatten().kthvalue(x.numel() - k + 1).values
    return torch.where(x.abs() >= tau, x, torch.zeros_like(x))


def ties_sum(x: torch.Tensor, y: torch.Tensor, density: float) -> torch.Tensor:
    """TIES of two tensors with `merge_func` sum: trim both, elect the sign of the sum (+ on a
    tie, as adb's `ties`), sum the entries that agree with it."""
    x, y = trimmed(x, density), trimmed(y, density)
    gamma = torch.where(x + y >= 0, 1.0, -1.0).to(x.dtype)
    return (x * gamma).clamp_min(0) * gamma + (y * gamma).clamp_min(0) * gamma


def ties_step(prev: torch.Tensor | None, new: torch.Tensor, p: ContinualTiesParams) -> torch.Tensor:
    """One step of FusionBench's rule on one tensor: λ·new first, then prev + λ·TIES(prev, new)."""
    if prev is None:
        return p.lam * new
    return prev + p.lam * ties_sum(prev, new, p.density)


@register_continual("continual_ties", params=ContinualTiesParams)
def continual_ties(
    state: Mapping[str, torch.Tensor] | None, new: Term, t: int, p: ContinualTiesParams
) -> tuple[LowRank, State]:
    """Fold task t into the running continual TIES merge of one LoRA layer (module doc)."""
    if p.ties_space == "factors":
        return ties_in_factors(state, new, t, p)
    return ties_in_product(state, new, p)


def ties_in_factors(
    state: Mapping[str, torch.Tensor] | None, new: Term, t: int, p: ContinualTiesParams
) -> tuple[LowRank, State]:
    """The rule on A and s·B separately; ΔW = B_m A_m, rank ≤ r, so the SVD is exact."""
    a_new, b_new = new.a.double(), new.b.double() * new.scale
    if state is not None and state["a"].shape[0] != a_new.shape[0]:
        raise MismatchError(
            f"continual_ties: task {t} has LoRA rank {a_new.shape[0]} but the merge holds rank "
            f"{state['a'].shape[0]}; factor space needs equal ranks, use ties_space=product"
        )
    a = ties_step(None if state is None else state["a"], a_new, p)
    b = ties_step(None if state is None else state["b"], b_new, p)
    return svd_of_factors(b, a), {"a": a, "b": b}


def ties_in_product(
    state: Mapping[str, torch.Tensor] | None, new: Term, p: ContinualTiesParams
) -> tuple[LowRank, State]:
    """The rule on this layer's dense ΔW (transient), the result kept at rank `state_rank`."""
    prev = None if state is None else state["b"].double() @ state["a"].double()
    dense = ties_step(prev, new.dense(), p)
    rank = p.state_rank or new.a.shape[0]
    a, b, error = dense_refactor(dense, min(rank, *dense.shape))
    state_out = {"a": a, "b": b, STATE_ERROR: torch.tensor(error, dtype=torch.float64)}
    return svd_of_factors(b, a), state_out
