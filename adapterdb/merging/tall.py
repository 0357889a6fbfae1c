"""TALL masks and consensus merging (Wang et al. 2024, "Localizing Task Information for
Improved Model Merging and Compression").

τ_MTL = Σ_t τ_t is the task-arithmetic multi-task vector. Task t's mask keeps the entries where
τ_t matters relative to what the other tasks put there:  m_t = |τ_t| >= λ_m·|τ_MTL − τ_t|.
- Expert rebuild (compression): θ_t = θ0 + m_t ⊙ τ_MTL (`tall_experts`).
- Consensus merging (`tall`): drop the "selfish" entries that fewer than k tasks need,
  θ = θ0 + λ·τ_MTL ⊙ [Σ_t m_t >= k]  (k = 2 in the paper).
λ_m (`mask_lambda`) is tuned per task in the paper from {0.2, ..., 0.6}; the default is the
middle, 0.4. `lambda` scales the merged vector (default 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapterdb.errors import AdbError, MismatchError
from adapterdb.merging.basic import map_chunks, sum_rows
from adapterdb.merging.registry import NO_CONTEXT, Context, Params, check_tensors, register


@dataclass(frozen=True)
class TallParams(Params):
    """mask_lambda: λ_m of the masks; k: tasks that must need an entry; lam: final scale."""

    mask_lambda: float = 0.4
    k: int = 2
    lam: float = 1.0

    def validate(self) -> None:
        if self.mask_lambda < 0:
            raise AdbError(f"mask_lambda={self.mask_lambda} must be >= 0")
        if self.k < 1:
            raise AdbError(f"k={self.k} must be >= 1 (tasks that must agree to keep an entry)")


def tall_chunk(x: torch.Tensor, mask_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_MTL, masks as float 0/1 in x) of a (T, c) float32 chunk.

    a − b >= 0 exactly when a >= b (IEEE subtraction keeps the sign), so the mask is
    sign(|τ_t| − λ|τ_MTL − τ_t|) mapped {−1, 0, 1} -> {0, 1, 1}: float ops only, as
    bool-producing comparisons are several times slower on CPU."""
    mtl = sum_rows(x)
    rest = torch.sub(mtl, x).abs_().mul_(mask_lambda)
    return mtl, x.abs_().sub_(rest).sign_().add_(1).sign_()


def tall_masks(
    tensors: Sequence[torch.Tensor], mask_lambda: float = 0.4, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_MTL in the sources' dtype, masks bool (T, *shape)) for the T sources of one tensor."""
    check_tensors(tensors, name)
    masks = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.bool)
    flat = masks.view(len(tensors), -1)

    def chunk(x: torch.Tensor, span: slice) -> torch.Tensor:
        mtl, m = tall_chunk(x, mask_lambda)
        flat[:, span].copy_(m)
        return mtl

    return map_chunks(tensors, chunk), masks


def tall_experts(mtl: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Rebuilt task vectors m_t ⊙ τ_MTL, (T, *shape) in τ_MTL's dtype (masks widened through
    a uint8 view: CPU bool -> float casts are ~4x slower)."""
    if masks.shape[1:] != mtl.shape:
        raise MismatchError(
            f"masks {tuple(masks.shape)} do not fit tensor {tuple(mtl.shape)}; pass (T, *shape)"
        )
    return masks.view(torch.uint8).to(mtl.dtype).mul_(mtl)


@register("tall", params=TallParams)
def tall(tensors: Sequence[torch.Tensor], p: TallParams, ctx: Context = NO_CONTEXT) -> torch.Tensor:
    """Consensus merge: λ·τ_MTL where at least k tasks' TALL masks are on."""
    check_tensors(tensors, ctx.name)
    if p.k > len(tensors):
        raise AdbError(
            f"tall: k={p.k} needs at least {p.k} sources, tensor {ctx.name!r} has "
            f"{len(tensors)}; lower k"
        )

    def chunk(x: torch.Tensor, _: slice) -> torch.Tensor:
        mtl, m = tall_chunk(x, p.mask_lambda)
        consensus = sum_rows(m).sub_(p.k - 0.5).sign_().clamp_min_(0)  # 1 where >= k masks on
        return mtl.mul_(consensus).mul_(p.lam)

    return map_chunks(tensors, chunk, ctx.out)
