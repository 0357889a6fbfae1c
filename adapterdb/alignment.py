"""PAM parameter alignment: reset expert weights whose sign disagrees with important global ones.

While an expert W' trains on task t, every s steps PAM finds the elements where
sign(w') != sign(w_G) and |w_G| is in the top p% of |W_G,t-1| and re-initialises them (to w_G,
or to 0). W_G is frozen for the whole task, so τ is computed once per task
(`alignment_thresholds`); each check is then one elementwise pass per tensor (`align_adapter_`),
in place, allocating only temporaries the size of one tensor, with one host sync per check.

Sign rule: an element is a *sign conflict* iff w_G != 0 and torch.sign(w') != torch.sign(w_G).
This is the paper's literal sign(w') != sign(w_G) with sign(0) = 0, so a zero w' against a
nonzero w_G is a conflict (a zero weight carries no direction; resetting it to w_G is the same
as PAM's init W' = W_G). A zero w_G is never a conflict: there is no direction to align to,
and the paper's strict |w_G| > τ never selects it either. Hence, with p = 100 and
reinit="global", after a check every expert sign equals the global sign wherever w_G != 0.
With reinit="zero" the reset weights are 0 and count as conflicts again until training moves
them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

from adapterdb.errors import AdbError, MismatchError
from adapterdb.topk import magnitude_threshold

Reinit = Literal["global", "zero"]
Scope = Literal["global", "tensor"]


@dataclass(frozen=True)
class AlignStats:
    """Counts for one tensor (or a sum of tensors), taken before any reset."""

    numel: int
    sign_conflicts: int  # w_G != 0 and the signs differ, at any |w_G|
    misaligned: int  # sign conflicts with |w_G| >= τ: the elements PAM re-initialises
    top_p: int  # elements with w_G != 0 and |w_G| >= τ

    @property
    def conflict_fraction(self) -> float:
        return self.sign_conflicts / self.numel if self.numel else 0.0

    @property
    def misaligned_fraction(self) -> float:
        """Misaligned share of the top-p% elements (what `adb align --report` shows)."""
        return self.misaligned / self.top_p if self.top_p else 0.0

    def __add__(self, other: AlignStats) -> AlignStats:
        return AlignStats(
            self.numel + other.numel,
            self.sign_conflicts + other.sign_conflicts,
            self.misaligned + other.misaligned,
            self.top_p + other.top_p,
        )


@dataclass(frozen=True)
class AlignReport:
    """Per-tensor `AlignStats` of one alignment check, and their sum."""

    tensors: dict[str, AlignStats]

    @property
    def total(self) -> AlignStats:
        return sum(self.tensors.values(), AlignStats(0, 0, 0, 0))

    @property
    def reset_fraction(self) -> float:
        """Share of all parameters re-initialised by this check."""
        total = self.total
        return total.misaligned / total.numel if total.numel else 0.0


def alignment_thresholds(
    global_tensors: Mapping[str, torch.Tensor], p: float, scope: Scope = "global"
) -> dict[str, float]:
    """τ per tensor name: the k-th largest |w_G|, k = ceil(p/100 · n) (p in percent, 0..100).

    scope="global" ranks all given tensors together (one τ for all, the design's default),
    scope="tensor" ranks each tensor alone. p = 0 gives τ = +inf (nothing is aligned).
    Pass exactly the tensors to align (e.g. only the LoRA factors).
    """
    if not 0 <= p <= 100:
        raise AdbError(f"alignment percent p={p} is out of range; use a value in [0, 100]")
    fraction = Fraction(repr(float(p))) / 100
    if scope == "global":
        tau = magnitude_threshold(global_tensors.values(), fraction)
        return dict.fromkeys(global_tensors, tau)
    if scope == "tensor":
        return {name: magnitude_threshold(t, fraction) for name, t in global_tensors.items()}
    raise AdbError(f"unknown alignment scope {scope!r}; use 'global' or 'tensor'")


def misaligned(w: torch.Tensor, wg: torch.Tensor, tau: float) -> torch.Tensor:
    """Bool mask of the elements PAM re-initialises: a sign conflict with |w_G| >= τ."""
    _check_pair("tensor", w, wg)
    return _conflicts(w, wg) & _important(wg, tau)


def align_(w: torch.Tensor, wg: torch.Tensor, tau: float, reinit: Reinit = "global") -> AlignStats:
    """Re-initialise the misaligned elements of `w` in place (to w_G or 0); return the counts.

    Works on live parameters (under no_grad) of any float dtype; w_G is cast to w's dtype.
    """
    _check_pair("tensor", w, wg)
    return _stats(w, _counts(w, wg, tau, _checked(reinit)).tolist())


def align_adapter_(
    expert: Mapping[str, torch.Tensor],
    global_: Mapping[str, torch.Tensor],
    thresholds: Mapping[str, float],
    reinit: Reinit = "global",
) -> AlignReport:
    """One PAM check over every tensor named in `thresholds`, in place on `expert`."""
    return _check_all(expert, global_, thresholds, _checked(reinit))


def alignment_report(
    expert: Mapping[str, torch.Tensor],
    global_: Mapping[str, torch.Tensor],
    p: float,
    scope: Scope = "global",
) -> AlignReport:
    """What a check would find, without changing anything (for `adb align --report`)."""
    return _check_all(expert, global_, alignment_thresholds(global_, p, scope), None)


def _check_all(
    expert: Mapping[str, torch.Tensor],
    global_: Mapping[str, torch.Tensor],
    thresholds: Mapping[str, float],
    reinit: Reinit | None,
) -> AlignReport:
    """Count (and reset, unless reinit is None) tensor by tensor; one host sync at the end."""
    counts = []
    for name, tau in thresholds.items():
        for side, tensors in (("expert", expert), ("global", global_)):
            if name not in tensors:
                raise MismatchError(
                    f"tensor '{name}' is missing from the {side} adapter; align adapters "
                    "with the same LoRA modules (same target_modules)"
                )
        _check_pair(name, expert[name], global_[name])
        counts.append(_counts(expert[name], global_[name], tau, reinit))
    rows = torch.stack([c.to(counts[0].device) for c in counts]).tolist() if counts else []
    return AlignReport(
        {name: _stats(expert[name], row) for name, row in zip(thresholds, rows, strict=True)}
    )


@torch.no_grad()
def _counts(w: torch.Tensor, wg: torch.Tensor, tau: float, reinit: Reinit | None) -> torch.Tensor:
    """[sign_conflicts, misaligned, top_p] as a device tensor; resets w if reinit is given."""
    conflicts = _conflicts(w, wg)
    important = _important(wg, tau)
    mis = conflicts & important
    if reinit == "global":
        torch.where(mis, wg.to(w.dtype), w, out=w)
    elif reinit == "zero":
        w.masked_fill_(mis, 0)
    return torch.stack([conflicts.sum(), mis.sum(), important.sum()])


def _conflicts(w: torch.Tensor, wg: torch.Tensor) -> torch.Tensor:
    sign_g = torch.sign(wg)
    return (torch.sign(w) != sign_g) & (sign_g != 0)


def _important(wg: torch.Tensor, tau: float) -> torch.Tensor:
    """|w_G| >= τ and w_G != 0, with τ rounded *up* to wg's dtype so the comparison is exact."""
    if tau <= 0:
        return wg != 0
    if tau == math.inf:  # p = 0: nothing is important, not even an infinite w_G
        return torch.zeros_like(wg, dtype=torch.bool)
    return wg.abs() >= _ceil_to_dtype(tau, wg.dtype)


def _ceil_to_dtype(tau: float, dtype: torch.dtype) -> float:
    """The smallest value of `dtype` that is >= τ (a tensor compares a Python float in its dtype,
    rounding to nearest, which could admit values just below τ)."""
    t = torch.tensor(tau, dtype=torch.float64).to(dtype)
    if float(t) < tau:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    return float(t)


def _stats(w: torch.Tensor, row: list[int]) -> AlignStats:
    return AlignStats(w.numel(), *row)


def _check_pair(name: str, w: torch.Tensor, wg: torch.Tensor) -> None:
    if w.shape != wg.shape:
        raise MismatchError(
            f"tensor '{name}': expert shape {tuple(w.shape)} != global {tuple(wg.shape)}; "
            "the expert must be trained from the global adapter (same rank and modules)"
        )


def _checked(reinit: str) -> Reinit:
    if reinit not in ("global", "zero"):
        raise AdbError(f"unknown reinit {reinit!r}; use 'global' or 'zero'")
    return reinit  # type: ignore[return-value]
