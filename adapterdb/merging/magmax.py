"""MagMax (Marczak et al. 2024): per entry, the task-vector value of largest magnitude.

θ = θ0 + λ·τ_max with τ_max[i] = τ_t[i] for the t maximising |τ_t[i]|; ties go to the later
task (the most recent knowledge wins, as in the sequential setting the paper targets).
The registry's default is λ = 1 (the merged vector as is); the MagMax code uses λ = 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapterdb.merging.basic import map_chunks
from adapterdb.merging.registry import NO_CONTEXT, Context, Params, check_tensors, register


@dataclass(frozen=True)
class ScaleParams(Params):
    """lam (`lambda`): scaling of the merged vector."""

    lam: float = 1.0


def max_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per column of a (T, c) chunk, the entry of largest |x|, ties to the last row.

    Row t+1 scores (t+1)·[|x_t| = max_s |x_s|] (sign(|x_t| − max) + 1 is that 0/1 flag, exact),
    so the largest score names the last maximal row. CPU argmax over dim 0 is ~20x slower."""
    score = x.abs()
    score.sub_(score.amax(0)).sign_().add_(1)
    score.mul_(torch.arange(1, x.shape[0] + 1, dtype=x.dtype).unsqueeze(1))
    pick = score.amax(0, keepdim=True).long().sub_(1)
    return x.gather(0, pick).squeeze(0)


@register("magmax", params=ScaleParams)
def magmax(
    tensors: Sequence[torch.Tensor], p: ScaleParams, ctx: Context = NO_CONTEXT
) -> torch.Tensor:
    """λ·τ_max over the T sources of one tensor."""
    check_tensors(tensors, ctx.name)
    return map_chunks(tensors, lambda x, _: max_magnitude(x).mul_(p.lam), ctx.out)
