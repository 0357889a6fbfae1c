"""EMR-Merging / ConDU unify and decouple (Huang et al. 2024; ConDU, ICLR 2026).

Unify the task vectors τ_1..τ_T of a model into one unified vector plus per-task triggers:
    γ = sign(Σ_t τ_t), a zero sum giving −1 (as the EMR and ConDU code do: `(sum > 0)*2 − 1`)
    M_t = (τ_t·γ > 0)                     task t agrees with the elected sign (bool mask)
    τ_uni = γ ⊙ max_t |M_t ⊙ τ_t|         the largest agreeing magnitude, elected sign
    λ_t = Σ_n mean|τ_t,n| / Σ_n mean|M_t,n ⊙ τ_uni,n|    (scale="tensor", the reference code:
          per-tensor means summed over the tensors n), or Σ|τ_t| / Σ|M_t ⊙ τ_uni| over all
          elements (scale="global"). A task whose mask is empty everywhere gets λ_t = 1: its
          rebuilt expert is zero whatever λ_t is.
Decouple: τ̃_t = λ_t·M_t ⊙ τ_uni.

λ_t sums over every tensor, so unification streams: feed a `Unifier` tensor by tensor (it
returns τ_uni and the masks at once and accumulates the sums), then read `.scales()`.
ConDU's continual step at task t (`continual_unify`) decouples the t−1 stored experts of one
tensor, unifies them with the new τ_t and returns the new unified tensor and t masks; peak
memory is O(t x the tensor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from adapterdb.errors import AdbError, MismatchError
from adapterdb.merging.basic import map_chunks, sum_rows
from adapterdb.merging.registry import NO_CONTEXT, Context, Params, check_tensors, register

ScaleMode = Literal["tensor", "global"]


def elected_sign(x: torch.Tensor) -> torch.Tensor:
    """γ = sign(Σ_t τ_t) per entry of a (T, c) chunk, a zero sum giving −1."""
    return sum_rows(x).sign_().sub_(0.5).sign_()


def unified_chunk(x: torch.Tensor) -> torch.Tensor:
    """τ_uni of a (T, c) float32 chunk (overwritten) alone: γ ⊙ max_t max(τ_t·γ, 0), the same
    operations as `unify_chunk` without the masks and sums that only the triggers need."""
    gamma = elected_sign(x)
    return x.mul_(gamma).clamp_min_(0).amax(0).mul_(gamma)


def unify_chunk(
    x: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unify a (T, c) float32 chunk in place: writes M into `masks` (bool (T, c)) and returns
    (τ_uni chunk, Σ|τ_t| (T,), Σ M_t ⊙ |τ_uni| (T,)).

    y = x·γ is > 0 exactly where task t agrees, so clamped at 0 it is M_t ⊙ |τ_t|: one
    in-place pass gives the masks and the magnitudes to max over. Σ|y| = 2·Σ max(y, 0) − Σ y
    avoids an |.| temporary. Bool-producing comparisons are slow on CPU, so masks come from
    float -> bool casts and 0/1 floats from sign().
    """
    gamma = elected_sign(x)
    x.mul_(gamma)
    signed = x.sum(1)
    x.clamp_min_(0)
    masks.copy_(x)
    uni = x.amax(0)
    magnitude = x.sum(1).mul_(2).sub_(signed)
    kept = x.sign_() @ uni
    return uni.mul_(gamma), magnitude, kept


class Unifier:
    """Streams the unification of T task vectors tensor by tensor; `.scales()` at the end."""

    def __init__(self, tasks: int, scale: ScaleMode = "tensor") -> None:
        if tasks < 1 or scale not in ("tensor", "global"):
            raise AdbError(
                f"Unifier needs tasks >= 1 and scale tensor|global, got {tasks}, {scale}"
            )
        self.tasks, self.scale = tasks, scale
        self._num = torch.zeros(tasks, dtype=torch.float64)
        self._den = torch.zeros(tasks, dtype=torch.float64)
        self._seen: set[str] = set()

    def unify_tensor(
        self, name: str, deltas: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(τ_uni in the deltas' dtype, masks bool (T, *shape)) for one tensor name."""
        check_tensors(deltas, name)
        if len(deltas) != self.tasks:
            raise MismatchError(
                f"tensor {name!r} has {len(deltas)} task vectors but the unifier was made for "
                f"{self.tasks}; pass one per task"
            )
        if name in self._seen:
            raise AdbError(f"tensor {name!r} was unified twice; feed each tensor name once")
        self._seen.add(name)
        masks = torch.empty((self.tasks, *deltas[0].shape), dtype=torch.bool)
        flat = masks.view(self.tasks, -1)
        num = torch.zeros(self.tasks, dtype=torch.float64)
        den = torch.zeros(self.tasks, dtype=torch.float64)

        def chunk(x: torch.Tensor, span: slice) -> torch.Tensor:
            uni, magnitude, kept = unify_chunk(x, flat[:, span])
            num.add_(magnitude)
            den.add_(kept)
            return uni

        unified = map_chunks(deltas, chunk)
        per = 1.0 / max(unified.numel(), 1) if self.scale == "tensor" else 1.0
        self._num.add_(num, alpha=per)
        self._den.add_(den, alpha=per)
        return unified, masks

    def scales(self) -> list[float]:
        """λ_t per task, from every tensor fed so far."""
        safe = torch.where(self._den > 0, self._den, 1.0)
        return torch.where(self._den > 0, self._num / safe, 1.0).tolist()


def decouple(unified: torch.Tensor, masks: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """The experts τ̃_t = λ_t·M_t ⊙ τ_uni of one tensor, (T, *shape) in τ_uni's dtype.

    The masks are widened through a uint8 view: CPU bool -> float casts are ~4x slower."""
    if masks.dtype != torch.bool or masks.shape[1:] != unified.shape or len(scales) != len(masks):
        raise MismatchError(
            f"triggers do not fit: masks {masks.dtype} {tuple(masks.shape)}, {len(scales)} "
            f"scales, unified {tuple(unified.shape)}; pass bool masks (T, *shape) and T scales"
        )
    lam = torch.tensor(scales, dtype=torch.float32).view(-1, *([1] * unified.dim()))
    experts = masks.view(torch.uint8).to(torch.float32).mul_(lam).mul_(unified)
    return experts.to(unified.dtype)


def continual_unify(
    unifier: Unifier,
    name: str,
    unified: torch.Tensor,
    masks: torch.Tensor,
    scales: Sequence[float],
    delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ConDU at task t for one tensor: decouple experts 1..t−1 from the stored unified tensor
    and triggers, unify them with τ_t; returns (new unified, t masks). `scales` are the
    previous step's (final); the new ones come from `unifier.scales()` after the last tensor."""
    return unifier.unify_tensor(name, [*decouple(unified, masks, scales), delta])


@dataclass(frozen=True)
class EmrParams(Params):
    """scale: how `Unifier` computes λ_t (module doc). The unified vector itself does not depend
    on it; the ConDU workflow (`adb merge --method condu`) passes it to its Unifier."""

    scale: ScaleMode = "tensor"


@register("emr", params=EmrParams)
def emr(tensors: Sequence[torch.Tensor], p: EmrParams, ctx: Context = NO_CONTEXT) -> torch.Tensor:
    """The unified vector τ_uni alone (the single merged model; experts need the triggers)."""
    check_tensors(tensors, ctx.name)
    return map_chunks(tensors, lambda x, _: unified_chunk(x), ctx.out)
