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

    argmax returns the first maximum, so it runs on the rows reversed."""
    pick = (x.shape[0] - 1) - x.abs().flip(0).argmax(0, keepdim=True)
    return x.gather(0, pick).squeeze(0)


@register("magmax", params=ScaleParams)
def magmax(
    tensors: Sequence[torch.Tensor], p: ScaleParams, ctx: Context = NO_CONTEXT
) -> torch.Tensor:
    """λ·τ_max over the T sources of one tensor."""
    check_tensors(tensors, ctx.name)
    return map_chunks(tensors, lambda x, _: max_magnitude(x).mul_(p.lam))
