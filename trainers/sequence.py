"""`adb run`: continual learning over a task sequence, per method and task order, as history.

For each method and order, branch `run/<method>/<order>`: for every task, train an expert
(alignment on for `pam` only; `condu` experts start from the base model, every other method
from the branch's global adapter) -> merge it with the method -> evaluate the merged adapter
on all tasks -> record. Each step's merge commit carries a key hashing the method, its
parameters and the task prefix, so re-running skips what exists and a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterdb.errors import AdbError
from adapterdb.merging import registry
from adapterdb.storage.store import Store
from adapterdb.trainers import evaluate as ev
from adapterdb.trainers.config import SequenceConfig, TaskConfig
from adapterdb.trainers.loop import train
from adapterdb.trainers.merge import ALIASES, EXPERTS, merge_into
from adapterdb.trainers.report import mean_std
from adapterdb.trainers.runtime import RuntimeCache

METHODS = ("finetune", "average", "pam", "ties", "magmax", "tall", "condu")
Say = Callable[[str], None]


@dataclass
class RunResult:
    """Per method: one accuracy matrix per order; plus the bounds."""

    matrices: dict[str, list[ev.Matrix]] = field(default_factory=dict)
    zero_shot: dict[str, float] = field(default_factory=dict)
    independent: dict[str, float] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)

    def table(self) -> dict[str, dict[str, tuple[float | None, float | None]]]:
        """method -> metric -> (mean, std over orders)."""
        out = {}
        for method, mats in self.matrices.items():
            rows = [m.metrics() for m in mats]
            out[method] = {
                k: mean_std([r[k] for r in rows])
                for k in ("ACC", "BWT", "FWT", "A_t", "A_m", "forgetting")
            }
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "orders": self.orders,
            "zero_shot": self.zero_shot,
            "independent": self.independent,
            "table": self.table(),
            "matrices": {m: [x.to_json() for x in mats] for m, mats in self.matrices.items()},
        }


def task_orders(tasks: Sequence[TaskConfig], count: int, seed: int) -> list[list[TaskConfig]]:
    """The given order, then `count − 1` seeded shuffles (distinct where possible)."""
    orders = [list(tasks)]
    rng = random.Random(seed)
    attempts = 0
    while len(orders) < count and attempts < 100 * count:
        attempts += 1
        order = list(tasks)
        rng.shuffle(order)
        if [t.name for t in order] not in [
            [t.name for t in o] for o in orders
        ] or attempts > 50 * count:
            orders.append(order)
    return orders


def method_task(task: TaskConfig, method: str) -> TaskConfig:
    """The task as `method`'s paper trains it: alignment only for PAM, ConDU from the base."""
    align = task.align.model_copy(update={"enabled": method == "pam"})
    init = "fresh" if method == "condu" else "global"
    return task.model_copy(update={"align": align, "init": init})


def step_key(method: str, params: registry.Params, prefix: Sequence[TaskConfig]) -> str:
    doc = {"method": method, "params": repr(params), "tasks": [t.fingerprint() for t in prefix]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def run_sequence(
    store: Store,
    seq: SequenceConfig,
    methods: Sequence[str],
    orders: int = 1,
    seed: int = 0,
    top_k: int = 4,
    say: Say = print,
) -> RunResult:
    """Run every method over every order (resuming), then assemble matrices and bounds."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise AdbError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    tasks = list(seq.tasks)
    cache = RuntimeCache()
    evaluator = ev.Evaluator(cache)
    result = RunResult()
    result.zero_shot = ev.zero_shot(store, tasks, evaluator)
    say(f"zero-shot: {_fmt(result.zero_shot)}")
    all_orders = task_orders(tasks, orders, seed)
    result.orders = [[t.name for t in o] for o in all_orders]
    for method in methods:
        params = registry.parse_params(ALIASES.get(method, method), [])
        for o, order in enumerate(all_orders):
            branch = f"run/{method}/{o}"
            for t in range(len(order)):
                _step(store, branch, method, params, order, t, tasks, top_k, cache, evaluator, say)
            routing = "condu" if method == "condu" else "none"
            result.matrices.setdefault(method, []).append(
                ev.accuracy_matrix(store, branch, routing)
            )
    result.independent = _independent(store, tasks, cache, say)
    return result


def _step(
    store: Store,
    branch: str,
    method: str,
    params: registry.Params,
    order: Sequence[TaskConfig],
    t: int,
    tasks: Sequence[TaskConfig],
    top_k: int,
    cache: RuntimeCache,
    evaluator: ev.Evaluator,
    say: Say,
) -> None:
    key = step_key(method, params, order[: t + 1])
    steps = ev.merge_steps(store, branch) if store.refs.read(f"refs/heads/{branch}") else []
    if len(steps) > t:
        if steps[t][1].extra.get("step_key") != key:
            raise AdbError(
                f"branch {branch} holds a different run (step {t + 1} differs); "
                f"delete it with `adb branch -d {branch}` or use another store"
            )
        merged = steps[t][0]
    else:
        task = method_task(order[t], method)
        result = train(task, store, branch, cache=cache)
        secs, acc = result.seconds, result.accuracy
        say(f"{branch} {t + 1}: {task.name} trained ({secs:.0f}s) A_t {acc:.3f}")
        assert result.commit_id is not None
        outcome = merge_into(
            store, branch, method, params, [result.commit_id], extra={"step_key": key}
        )
        merged = outcome.commit_id
    routing = "condu" if method == "condu" else "none"
    if set(ev.eval_records(store, merged, routing)) >= {x.name for x in tasks}:
        return
    res = ev.evaluate(store, merged, tasks, routing, top_k, evaluator)
    say(f"{branch} step {t + 1}: {_fmt(res.accuracy)}")


def _independent(
    store: Store, tasks: Sequence[TaskConfig], cache: RuntimeCache, say: Say
) -> dict[str, float]:
    """Upper bound: one expert per task from the base model, on its own task only.

    ConDU's experts are exactly these (fresh LoRA, no alignment, the task's seed), so they are
    reused when present; otherwise the experts are trained on `run/independent`.
    """
    out = {}
    for task in tasks:
        solo = method_task(task, "condu")
        found = _expert_with(store, solo.fingerprint(), task.name)
        if found is None:
            result = train(solo, store, "run/independent", cache=cache)
            say(f"independent {task.name}: {result.accuracy:.3f}")
            out[task.name] = result.accuracy
        else:
            out[task.name] = found
    return out


def _expert_with(store: Store, fingerprint: str, task: str) -> float | None:
    """A_t of any expert of `task` trained with exactly this task file, if one exists."""
    for name, oid in store.refs.list(EXPERTS).items():
        if name.endswith(f"/{task}"):
            c = store.read_commit(oid)
            if c.params.get("fingerprint") == fingerprint:
                return c.eval["accuracy"][task]
    return None


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())
