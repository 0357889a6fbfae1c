"""`adb run`'s learning-rate protocol: one value per sequence, the same for every method.

A sequence may list candidates (`optim: {lr: [1e-3, 3e-3]}`). Each candidate trains the
independent experts (fresh LoRA, no alignment: what no method's trick touches) on the training
data minus a validation part carved from it, and is scored by their pooled accuracy on that
part. The test split is never looked at, and no method gets a value tuned for it, so the
comparison stays fair; the cost is one independent expert per task and candidate.

The choice follows the one-standard-error rule: the smallest rate whose score is within one
binomial standard error of the best. Candidates that close are a statistical tie, and a tie
decided by one validation example would flip with float rounding on another CPU, changing
every number of the run; the smaller rate is the one less likely to collapse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterdb.errors import AdbError
from adapterdb.storage.store import Store
from adapterdb.trainers.config import TaskConfig
from adapterdb.trainers.loop import train
from adapterdb.trainers.merge import trained_expert
from adapterdb.trainers.runtime import RuntimeCache

VALIDATION = 0.2  # of each task's training data, held out to score the candidates
BRANCH = "run/select"


@dataclass(frozen=True)
class Score:
    """Validation accuracy of one candidate's expert on one task, and how many examples."""

    accuracy: float
    size: int


@dataclass
class LrChoice:
    """The candidates, each one's validation scores per task, and the value chosen."""

    candidates: list[float]
    chosen: float
    validation: dict[float, dict[str, Score]] = field(default_factory=dict)

    def pooled(self, lr: float) -> tuple[float, float]:
        """(accuracy over all validation examples of every task, its standard error)."""
        scores = self.validation[lr].values()
        n = sum(s.size for s in scores)
        acc = sum(s.accuracy * s.size for s in scores) / n
        return acc, math.sqrt(acc * (1 - acc) / n)

    def decide(self) -> float:
        """The smallest rate within one standard error of the best pooled accuracy."""
        best = max(self.candidates, key=lambda lr: self.pooled(lr)[0])
        acc, se = self.pooled(best)
        self.chosen = min(lr for lr in self.candidates if self.pooled(lr)[0] >= acc - se)
        return self.chosen

    def to_json(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "chosen": self.chosen,
            "rule": "smallest lr within one standard error of the best",
            "split": f"{VALIDATION:.0%} of each task's training data",
            "validation": {
                f"{lr:g}": {
                    "accuracy": self.pooled(lr)[0],
                    "standard_error": self.pooled(lr)[1],
                    "tasks": {t: s.accuracy for t, s in scores.items()},
                }
                for lr, scores in self.validation.items()
            },
        }


def candidates(tasks: Sequence[TaskConfig]) -> list[float]:
    """The sequence's candidate learning rates: every task must list the same ones."""
    found = {tuple(t.optim.candidates) for t in tasks}
    if len(found) > 1:
        raise AdbError(
            "tasks list different optim.lr candidates; give them in the sequence's defaults "
            "so that one value is chosen for the whole sequence"
        )
    return list(found.pop())


def with_lr(task: TaskConfig, lr: float) -> TaskConfig:
    optim = task.optim.model_copy(update={"lr": lr})
    return task.model_copy(update={"optim": optim})


def validation_task(task: TaskConfig, lr: float) -> TaskConfig:
    """The independent expert of `task` at `lr`, trained and scored inside the training data."""
    data = task.data.model_copy(update={"validation": VALIDATION})
    align = task.align.model_copy(update={"enabled": False})
    return with_lr(task, lr).model_copy(update={"data": data, "align": align, "init": "fresh"})


def validation_score(store: Store, task: TaskConfig, lr: float, cache: RuntimeCache) -> Score:
    """The candidate's expert on `task`: found in the store (a re-run or resumed run trains
    nothing twice), else trained now on its own branch."""
    solo = validation_task(task, lr)
    oid = trained_expert(store, solo.fingerprint(), task.name)
    if oid is None:
        branch = f"{BRANCH}/{lr:g}".replace("+", "")
        oid = train(solo, store, branch, cache=cache).commit_id
        assert oid is not None  # `adb run` trains in one process
    found = store.read_commit(oid)
    size = (found.stats.get("health") or {}).get("eval_size") or 1
    return Score(found.eval["accuracy"][task.name], size)


def choose_lr(
    store: Store, tasks: Sequence[TaskConfig], cache: RuntimeCache, say: Callable[[str], None]
) -> LrChoice:
    """Score every candidate and decide (module docstring); one candidate is simply used."""
    lrs = candidates(tasks)
    choice = LrChoice(lrs, lrs[0])
    if len(lrs) == 1:
        return choice
    for lr in lrs:
        choice.validation[lr] = {t.name: validation_score(store, t, lr, cache) for t in tasks}
        acc, se = choice.pooled(lr)
        say(f"lr {lr:g}: validation accuracy {acc:.4f} ± {se:.4f} (independent experts)")
    say(f"lr {choice.decide():g} chosen for every method (smallest within one SE of the best)")
    return choice
