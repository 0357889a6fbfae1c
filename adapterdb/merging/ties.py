"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

1. Trim: keep the top-`density` fraction of each τ_t by magnitude (|x| >= the exact k-th
   largest |x|, k = ceil(density·n), via `adapterdb.topk`; ties at the threshold are all kept).
   - trim="global" (default, the paper): one threshold per source over its WHOLE task vector
     (all tensors). `merge_adapters` computes it in a cheap first pass (`ties_thresholds`);
     calling `ties` on a lone tensor treats that tensor as the whole vector.
   - trim="tensor" (PEFT, mergekit): a threshold per source per tensor.
2. Elect: γ = sign(Σ_t τ̂_t) (elect="sum", PEFT's "total") or sign(Σ_t sign τ̂_t)
   (elect="count", PEFT's "frequency"); a zero vote elects +1, as PEFT and mergekit do (the
   paper's sgn gives 0 there; its code uses the whole vector's majority sign).
3. Disjoint merge: λ·Σ_t w_t τ̂_t [sign τ̂_t = γ] / #{t : sign τ̂_t = γ} (0 where none agree).
   Weights scale after election and do not enter the count, as in PEFT (the paper has none).
With trim="tensor" and elect="sum" this equals `peft.utils.merge_utils.ties` (up to which of
several tied magnitudes at the threshold PEFT's topk keeps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from adapterdb.errors import AdbError
from adapterdb.merging.basic import WeightedParams, map_chunks, sum_rows, weight_list
from adapterdb.merging.registry import NO_CONTEXT, Context, check_tensors, register
from adapterdb.topk import magnitude_threshold

Elect = Literal["sum", "count"]


def check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise AdbError(f"density={density} must be in (0, 1] (the fraction of entries kept)")


@dataclass(frozen=True)
class TiesParams(WeightedParams):
    """density: fraction kept per source (paper k = 20%); elect, trim: see the module doc."""

    density: float = 0.2
    elect: Elect = "sum"
    trim: Literal["global", "tensor"] = "global"

    def validate(self) -> None:
        check_density(self.density)


def ties_thresholds(
    sources: Sequence[Mapping[str, torch.Tensor]], p: TiesParams
) -> torch.Tensor | None:
    """The global pass: one exact trim threshold per source over all its tensors (T,).

    `s.values` is handed over as a callable, so a lazily loading Mapping is streamed tensor by
    tensor (read once per radix pass) instead of being held in memory whole."""
    if p.trim != "global" or p.density >= 1:
        return None
    return torch.tensor([magnitude_threshold(s.values, p.density) for s in sources])


def trim_rows(x: torch.Tensor, thresholds: Sequence[float]) -> None:
    """Zero, in place, the entries of each row below its threshold (keep |x| >= τ).

    hardshrink keeps |x| > λ; with λ the float32 just below τ that is |x| >= τ, in one
    vectorised pass (CPU comparisons producing bool masks are several times slower)."""
    for row, tau in zip(x, thresholds, strict=True):
        if tau > 0:
            below = float(np.nextafter(np.float32(tau), np.float32(0)))
            torch.hardshrink(row, below, out=row)


def disjoint_merge(
    x: torch.Tensor, weights: Sequence[float], elect: Elect, lam: float
) -> torch.Tensor:
    """TIES steps 2–3 on a (T, c) float32 chunk (overwritten): elect γ per entry, then λ times
    the weighted sum over agreeing sources divided by their count. Zeros never agree.

    x·γ clamped at 0 is the agreeing magnitudes. Equal weights (the default) scale the plain
    sum once, with λ. Two sources count 2 exactly where both agree, so there the sum is halved
    (exactly, as a division by 2 would) instead of dividing by a counted vector."""
    votes = sum_rows(x.sign()) if elect == "count" else sum_rows(x)
    gamma = votes.sign_().add_(0.5).sign_()  # 0 -> +1
    x.mul_(gamma).clamp_min_(0)
    if len(set(weights)) == 1:
        total, scale = sum_rows(x), lam * weights[0]
    else:
        total, scale = torch.tensor(weights, dtype=torch.float32) @ x, lam
    if x.shape[0] == 2:
        total.addcmul_(total, torch.minimum(x[0], x[1]).sign_(), value=-0.5)
    else:
        total.div_(sum_rows(x.sign_()).clamp_min_(1))
    total.mul_(gamma)
    return total.mul_(scale) if scale != 1 else total


@register("ties", params=TiesParams, prepare=ties_thresholds)
def ties(tensors: Sequence[torch.Tensor], p: TiesParams, ctx: Context = NO_CONTEXT) -> torch.Tensor:
    """TIES-merge the T sources of one tensor (see the module doc for the definitions)."""
    check_tensors(tensors, ctx.name)
    weights = weight_list(p.weights, len(tensors), ctx.name)
    if p.density >= 1:
        taus = [0.0] * len(tensors)
    elif ctx.thresholds is not None and p.trim == "global":
        taus = ctx.thresholds.tolist()
    else:
        taus = [magnitude_threshold(t, p.density) for t in tensors]

    def chunk(x: torch.Tensor, _: slice) -> torch.Tensor:
        trim_rows(x, taus)
        return disjoint_merge(x, weights, p.elect, p.lam)

    return map_chunks(tensors, chunk, ctx.out)
