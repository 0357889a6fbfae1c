"""Training health checks: catch a run that learned nothing before its expert is trusted.

A collapsed run is finite, so the NaN/inf guard never fires, and its expert still merges and
still lands in `adb run`'s table as if it were a data point. Four symptoms are watched, each
cheap and each with a threshold that a run which learned anything stays clear of:

- `loss_at_uniform`: the training loss of the last quarter of the steps stays at the
  uniform-guess level ln(k) (a classifier that outputs the same logits for every input);
- `diverging`: the loss of the last few steps is far above where it started, before it ever
  becomes NaN (the usual prelude to a blow-up with too high a learning rate);
- `features_collapsed`: the mean pairwise cosine of the features of a fixed probe batch is
  near 1, so every input looks alike to the head (it was 0.999–1.000 in the collapsed runs
  that motivated this module, against 0.4–0.7 for the base model);
- `at_chance`: the expert's accuracy on its own task is within two standard errors of the
  majority-class rate of the eval split.

Each flag is one line with the step, the figure and what to try; `optim.on_collapse` decides
whether a flag only warns or stops before anything is committed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

UNIFORM_BAND = 0.05  # the loss counts as "at ln k" within 5% of it
DIVERGE_FACTOR = 3.0  # the loss counts as diverging at 3x its starting level
COLLAPSE_COSINE = 0.98  # probe features this aligned are indistinguishable to a cosine head
PROBE_SIZE = 64
PROBES = 5  # probe checks per run (plus one before the first step)


@dataclass(frozen=True)
class Flag:
    """One failed check: which, at what step, the figure, and the one-line advice."""

    check: str
    step: int
    value: float
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "step": self.step, "value": self.value}


@dataclass
class Health:
    """Figures gathered while training; `flags()` turns them into verdicts.

    `classes` is k for a classifier (None for a generative model: no uniform level, no chance
    rate, no feature probe); `lr` goes into the advice.
    """

    task: str
    lr: float
    classes: int | None
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    delta_norms: list[float] = field(default_factory=list)
    probe_cosine: list[tuple[int, float]] = field(default_factory=list)
    accuracy: float | None = None
    chance: float | None = None
    eval_size: int = 0

    def record_step(self, loss: float, grad_norm: float | None) -> None:
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)

    def record_probe(self, step: int, cosine: float) -> None:
        self.probe_cosine.append((step, cosine))

    def record_accuracy(self, accuracy: float, labels: torch.Tensor | None) -> None:
        """A_t and the majority-class rate of the eval labels it was measured on."""
        self.accuracy = accuracy
        if labels is not None and labels.numel():
            self.chance = float(torch.bincount(labels.long()).max()) / labels.numel()
            self.eval_size = labels.numel()

    def flags(self) -> list[Flag]:
        found = [self._uniform(), self._diverging(), self._collapsed(), self._at_chance()]
        return [f for f in found if f is not None]

    def to_json(self) -> dict[str, Any]:
        """The figures the commit records (`stats.health`)."""
        tail = self._tail()
        return {
            "uniform_loss": math.log(self.classes) if self.classes else None,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last_quarter": statistics.fmean(tail) if tail else None,
            "grad_norm_max": max(self.grad_norms, default=None),
            "probe_cosine": [[s, c] for s, c in self.probe_cosine],
            "delta_norm_max": max(self.delta_norms, default=None),
            "delta_norm_sum": sum(self.delta_norms) if self.delta_norms else None,
            "chance": self.chance,
            "eval_size": self.eval_size,
            "flags": [f.to_json() for f in self.flags()],
        }

    def _tail(self) -> list[float]:
        return self.losses[-max(1, len(self.losses) // 4) :]

    def _uniform(self) -> Flag | None:
        if not self.classes or self.classes < 2 or len(self.losses) < 4:
            return None
        level, tail = math.log(self.classes), self._tail()
        mean = statistics.fmean(tail)
        if abs(mean - level) > UNIFORM_BAND * level or min(tail) < (1 - UNIFORM_BAND) * level:
            return None
        return Flag(
            "loss_at_uniform",
            len(self.losses),
            mean,
            f"task {self.task}: the loss stayed at the uniform-guess level ln({self.classes}) = "
            f"{level:.3f} (mean {mean:.3f} over the last {len(tail)} steps, step "
            f"{len(self.losses)}): the model learned nothing; {self._advice()}",
        )

    def _diverging(self) -> Flag | None:
        if len(self.losses) < 8:
            return None
        start = statistics.fmean(self.losses[:4])
        window = self.losses[-4:]
        now = statistics.fmean(window)
        if now <= DIVERGE_FACTOR * max(start, math.log(self.classes or 2)):
            return None
        return Flag(
            "diverging",
            len(self.losses),
            now,
            f"task {self.task}: the loss is diverging (mean {now:.3g} over steps "
            f"{len(self.losses) - 3}-{len(self.losses)}, {now / start:.1f}x its start "
            f"{start:.3g}); {self._advice()}",
        )

    def _collapsed(self) -> Flag | None:
        if not self.probe_cosine:
            return None
        base = self.probe_cosine[0][1]
        collapsed = [(s, c) for s, c in self.probe_cosine[1:] if c >= COLLAPSE_COSINE > base]
        if not collapsed:
            return None
        step, cosine = collapsed[0]
        return Flag(
            "features_collapsed",
            step,
            cosine,
            f"task {self.task}: features collapsed at step {step} (mean pairwise cosine of "
            f"the probe batch {cosine:.4f}, {base:.2f} before training): every input looks "
            f"alike to the head; {self._advice()}",
        )

    def _at_chance(self) -> Flag | None:
        if self.accuracy is None or self.chance is None or not self.eval_size:
            return None
        band = 2 * math.sqrt(self.chance * (1 - self.chance) / self.eval_size)
        if self.accuracy > self.chance + band:
            return None
        return Flag(
            "at_chance",
            len(self.losses),
            self.accuracy,
            f"task {self.task}: A_t = {self.accuracy:.3f} after step {len(self.losses)} is at "
            f"chance (majority class {self.chance:.3f} ± {band:.3f} on {self.eval_size} "
            f"examples); {self._advice()}",
        )

    def _advice(self) -> str:
        return f"try a lower optim.lr (now {self.lr:g}) or more optim.steps"


def delta_norms(peft_model: torch.nn.Module) -> list[float]:
    """‖ΔW‖_F = ‖B·A·scale‖ of every LoRA layer: the update scale a LoRA accumulates when it
    keeps training over many tasks."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        return [
            float(torch.linalg.vector_norm(m.get_delta_weight(name).float()))
            for m in peft_model.modules()
            if isinstance(m, LoraLayer)
            for name in m.lora_A
        ]


def probe_steps(total: int) -> set[int]:
    """The steps after which the probe batch is measured: PROBES evenly spaced, last included."""
    return {max(1, round(total * (i + 1) / PROBES)) for i in range(PROBES)}


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows (float64: near 1 the digits matter)."""
    unit = F.normalize(features.detach().double(), dim=1)
    n = unit.shape[0]
    if n < 2:
        return 0.0
    total = unit.sum(0)
    return float((total @ total - n) / (n * (n - 1)))


def feature_probe(
    features: Callable[[dict[str, Any]], torch.Tensor], batch: dict[str, Any]
) -> Callable[[], float]:
    """A closure measuring `mean_pairwise_cosine` of `features(batch)` without gradients."""

    def measure() -> float:
        with torch.no_grad():
            return mean_pairwise_cosine(features(batch))

    return measure
