"""`adb run`: continual learning over a task sequence, per method and task order, as history.

For each method and order, branch `run/<method>/<order>`: for every task, train an expert
(alignment on for `pam` only; `condu` experts start from the base model, every other method
from the branch's global adapter) -> merge it with the method -> evaluate the merged adapter
on all tasks -> record. Each step's merge commit carries a key hashing the method, its
parameters and the task prefix, so re-running skips what exists and a killed run resumes.

With `jobs` > 1 the branches run in worker processes (trainers/parallel.py). They share the
store safely: objects are content-addressed and written by atomic rename, every ref moves by
compare-and-swap under a lock, and no two jobs write the same ref: each branch owns its head,
its experts' refs and its merges' eval records; zero-shot records are written by the main
process before any job starts, and the independent experts, one ref per task, are jobs of
their own only when no ConDU branch trains them anyway.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterdb.errors import AdbError
from adapterdb.merging import registry
from adapterdb.merging.layers import LAYER_METHODS
from adapterdb.storage.store import Store
from adapterdb.trainers import evaluate as ev
from adapterdb.trainers.config import SequenceConfig, TaskConfig
from adapterdb.trainers.loop import reuse_expert, train
from adapterdb.trainers.merge import ALIASES, merge_into, trained_expert
from adapterdb.trainers.parallel import Job, run_jobs
from adapterdb.trainers.runtime import RuntimeCache
from adapterdb.trainers.summary import Runs, mean_std, summary_json
from adapterdb.trainers.tuning import LrChoice, choose_lr, with_lr

# the whole-layer methods (OPCM, TSV, ...) merge independently fine-tuned experts, as ConDU
METHODS = ("finetune", "average", "pam", "ties", "magmax", "tall", "condu", *sorted(LAYER_METHODS))
Say = Callable[[str], None]


@dataclass
class RunResult:
    """Per method: one accuracy matrix per order; plus the bounds."""

    matrices: dict[str, list[ev.Matrix]] = field(default_factory=dict)
    zero_shot: dict[str, float] = field(default_factory=dict)
    independent: dict[str, float] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)
    lr: LrChoice | None = None  # the learning rate every method trained with, and why

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

    def runs(self) -> Runs:
        """method -> order index (as a label) -> matrix: what the summaries pair orders by."""
        return {m: {str(o): x for o, x in enumerate(mats)} for m, mats in self.matrices.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "orders": self.orders,
            "lr": None if self.lr is None else self.lr.to_json(),
            "zero_shot": self.zero_shot,
            "independent": self.independent,
            "table": self.table(),
            **summary_json(self.runs()),
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
    """The task as `method`'s paper trains it: alignment only for PAM; ConDU and the
    whole-layer methods (FusionBench's protocol: task vectors fine-tuned independently) from
    the base model, so they share the experts ConDU and the independent bound train."""
    align = task.align.model_copy(update={"enabled": method == "pam"})
    init = "fresh" if method == "condu" or method in LAYER_METHODS else "global"
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
    jobs: int = 1,
) -> RunResult:
    """Run every method over every order (resuming), then assemble matrices and bounds.

    `jobs` > 1 runs the branches on that many worker processes; 1 runs them here, in turn.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise AdbError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    cache = RuntimeCache()
    evaluator = ev.Evaluator(cache)
    result = RunResult()
    result.lr = choose_lr(store, seq.tasks, cache, say)
    tasks = [with_lr(t, result.lr.chosen) for t in seq.tasks]
    result.zero_shot = ev.zero_shot(store, tasks, evaluator)
    say(f"zero-shot: {_fmt(result.zero_shot)}")
    all_orders = task_orders(tasks, orders, seed)
    result.orders = [[t.name for t in o] for o in all_orders]
    if jobs > 1:
        run_jobs(_parallel_jobs(store, methods, all_orders, tasks, top_k), jobs, say)
    else:
        for method in methods:
            for o, order in enumerate(all_orders):
                _run_branch(store, method, o, order, tasks, top_k, cache, evaluator, say)
    for method in methods:
        routing = "condu" if method == "condu" else "none"
        result.matrices[method] = [
            ev.accuracy_matrix(store, branch_name(method, o), routing)
            for o in range(len(all_orders))
        ]
    result.independent = _independent(store, tasks, cache, say)
    return result


def branch_name(method: str, order: int) -> str:
    return f"run/{method}/{order}"


def _run_branch(
    store: Store,
    method: str,
    o: int,
    order: Sequence[TaskConfig],
    tasks: Sequence[TaskConfig],
    top_k: int,
    cache: RuntimeCache,
    evaluator: ev.Evaluator,
    say: Say,
) -> None:
    """Every step of one (method, order) branch; steps it already holds are checked, not redone."""
    params = registry.parse_params(ALIASES.get(method, method), [])
    branch = branch_name(method, o)
    for t in range(len(order)):
        _step(store, branch, method, params, order, t, tasks, top_k, cache, evaluator, say)


def _parallel_jobs(
    store: Store,
    methods: Sequence[str],
    orders: Sequence[Sequence[TaskConfig]],
    tasks: Sequence[TaskConfig],
    top_k: int,
) -> list[Job]:
    """One job per branch, plus one per missing independent expert unless a ConDU or
    whole-layer branch trains it (their experts are the independent ones; two jobs would
    train it twice)."""
    root = str(store.root)
    out: list[Job] = [
        (_branch_job, (root, method, o, list(order), list(tasks), top_k))
        for method in methods
        for o, order in enumerate(orders)
    ]
    if not any(m == "condu" or m in LAYER_METHODS for m in methods):
        out += [
            (_independent_job, (root, task))
            for task in tasks
            if known_independent(store, task) is None
        ]
    return out


@functools.cache
def _worker_runtimes() -> tuple[RuntimeCache, ev.Evaluator]:
    """One runtime cache per worker process, shared by its jobs as one process shares one."""
    cache = RuntimeCache()
    return cache, ev.Evaluator(cache)


def _branch_job(
    root: str,
    method: str,
    o: int,
    order: list[TaskConfig],
    tasks: list[TaskConfig],
    top_k: int,
    say: Say,
) -> None:
    """A worker's job: one branch, on the store at `root`."""
    cache, evaluator = _worker_runtimes()
    _run_branch(Store.open(root), method, o, order, tasks, top_k, cache, evaluator, say)


def _independent_job(root: str, task: TaskConfig, say: Say) -> None:
    """A worker's job: one independent expert, on the store at `root`."""
    cache, _ = _worker_runtimes()
    _train_independent(Store.open(root), task, cache, say)


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
        expert = _expert(store, branch, method, order[t], t, cache, say)
        outcome = merge_into(store, branch, method, params, [expert], extra={"step_key": key})
        merged = outcome.commit_id
    routing = "condu" if method == "condu" else "none"
    if set(ev.eval_records(store, merged, routing)) >= {x.name for x in tasks}:
        return
    res = ev.evaluate(store, merged, tasks, routing, top_k, evaluator)
    say(f"{branch} step {t + 1}: {_fmt(res.accuracy)}")


def _expert(
    store: Store,
    branch: str,
    method: str,
    task: TaskConfig,
    t: int,
    cache: RuntimeCache,
    say: Say,
) -> str:
    """The expert step t merges: trained now, or, when it starts from the base model (ConDU),
    the identical one another order already trained (same task file, same weights)."""
    task = method_task(task, method)
    if task.init == "fresh":
        found = trained_expert(store, task.fingerprint(), task.name)
        if found is not None:
            return reuse_expert(store, branch, found)
    result = train(task, store, branch, cache=cache)
    secs, acc = result.seconds, result.accuracy
    say(f"{branch} {t + 1}: {task.name} trained ({secs:.0f}s) A_t {acc:.3f}")
    for flag in result.flags:
        say(f"{branch} {t + 1}: warning: {flag.message}")
    assert result.commit_id is not None
    return result.commit_id


def _independent(
    store: Store, tasks: Sequence[TaskConfig], cache: RuntimeCache, say: Say
) -> dict[str, float]:
    """Upper bound: one expert per task from the base model, on its own task only.

    ConDU's experts are exactly these (fresh LoRA, no alignment, the task's seed), so they are
    reused when present; otherwise the experts are trained on `run/independent`.
    """
    out = {}
    for task in tasks:
        found = known_independent(store, task)
        out[task.name] = found if found is not None else _train_independent(store, task, cache, say)
    return out


def known_independent(store: Store, task: TaskConfig) -> float | None:
    """A_t of `task`'s independent expert, if the store holds one (`adb report` reads it)."""
    return _expert_with(store, method_task(task, "condu").fingerprint(), task.name)


def _train_independent(store: Store, task: TaskConfig, cache: RuntimeCache, say: Say) -> float:
    result = train(method_task(task, "condu"), store, "run/independent", cache=cache)
    say(f"independent {task.name}: {result.accuracy:.3f}")
    return result.accuracy


def _expert_with(store: Store, fingerprint: str, task: str) -> float | None:
    """A_t of any expert of `task` trained with exactly this task file, if one exists."""
    found = trained_expert(store, fingerprint, task)
    return None if found is None else store.read_commit(found).eval["accuracy"][task]


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())
