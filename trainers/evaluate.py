"""`adb eval`: accuracy of a revision on tasks, eval records, the accuracy matrix, routing.

Eval records are commits of kind `eval` (same manifest as the evaluated commit, which is
their parent) on `refs/evals/<commit>`; evaluating never moves a branch. Zero-shot accuracy
of the base model lives on `refs/evals/base/<model>`. The accuracy matrix R[t][i] of a
branch is read off its first-parent merge commits (step t = the t-th merge) and their
records; A_t comes from the experts' own records.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapterdb.errors import AdbError
from adapterdb.metrics import cl_metrics
from adapterdb.storage.commits import Commit, Manifest
from adapterdb.storage.store import Store
from adapterdb.trainers import runtime
from adapterdb.trainers.branchstate import EVALS, eval_chain
from adapterdb.trainers.config import TaskConfig, parse_task
from adapterdb.trainers.merge import expert_tensor, open_source


class Evaluator:
    """Evaluates adapters on tasks, swapping weights into cached runtimes."""

    def __init__(self, cache: runtime.RuntimeCache | None = None) -> None:
        self.cache = cache or runtime.RuntimeCache()

    def runtime(self, task: TaskConfig, lora: Mapping[str, Any] | None) -> runtime.Runtime:
        return self.cache.get(task, lora)

    def accuracy(
        self,
        task: TaskConfig,
        tensors: Mapping[str, torch.Tensor] | None,
        lora: Mapping[str, Any] | None,
    ) -> float:
        """Accuracy of `tensors` (None = the base model: LoRA contributes nothing) on `task`."""
        rt = self.runtime(task, lora)
        runtime.set_lora(rt, tensors if tensors is not None else _zero_b(rt))
        return runtime.accuracy(rt)

    def logits(
        self, task: TaskConfig, tensors: Mapping[str, torch.Tensor], lora: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rt = self.runtime(task, lora)
        runtime.set_lora(rt, tensors)
        assert rt.data.eval is not None
        return runtime.logits_over(rt, rt.data.eval)

    def base_eval_features(self, task: TaskConfig, lora: Mapping[str, Any]) -> torch.Tensor:
        rt = self.runtime(task, lora)
        runtime.set_lora(rt, _zero_b(rt))
        assert rt.data.eval is not None
        return runtime.base_features(rt.loaded, rt.data.eval)[0]

    def prototypes(self, task: TaskConfig, lora: Mapping[str, Any]) -> torch.Tensor:
        head = self.runtime(task, lora).loaded.head
        if head is None:
            raise AdbError(
                f"task {task.name} has no class head; routing needs a classification task"
            )
        return head.prototypes.cpu()


def _zero_b(rt: runtime.Runtime) -> dict[str, torch.Tensor]:
    """LoRA weights with every B = 0: the adapted model is exactly the base model."""
    out = runtime.get_lora(rt)
    return {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in out.items()}


# -- tasks of a revision -------------------------------------------------------------------


def lineage_experts(store: Store, rev: str) -> dict[str, tuple[str, Commit]]:
    """Task -> (id, commit) of the first expert trained on it in `rev`'s history (oldest
    first): the commit that holds the task file and the head's prototypes."""
    experts: dict[str, tuple[str, Commit]] = {}
    for oid, c in reversed(store.log(rev)):
        if c.kind == "train" and c.params.get("task_file") and c.task not in experts:
            experts[c.task] = (oid, c)
    return experts


def expert_task(oid: str, commit: Commit) -> TaskConfig:
    """The task file an expert commit recorded."""
    return parse_task(commit.params["task_file"], Path.cwd(), f"commit {oid[:10]}")


def lineage_tasks(store: Store, rev: str) -> list[TaskConfig]:
    """Task files of every expert trained in `rev`'s history, oldest first (no repeats)."""
    return [expert_task(oid, c) for oid, c in lineage_experts(store, rev).values()]


# -- evaluating a revision -----------------------------------------------------------------


@dataclass
class EvalResult:
    commit_id: str
    record_id: str
    accuracy: dict[str, float]
    routing: str
    details: dict[str, Any] = field(default_factory=dict)


def evaluate(
    store: Store,
    rev: str,
    tasks: Sequence[TaskConfig],
    routing: str = "none",
    top_k: int = 4,
    evaluator: Evaluator | None = None,
) -> EvalResult:
    """Accuracy of `rev` on each task (routing `condu`: base + top-K experts by prototypes)."""
    if not tasks:
        raise AdbError(f"no tasks to evaluate {rev} on; pass --tasks task.yaml ...")
    ev = evaluator or Evaluator()
    src = open_source(rev, store)
    assert src.commit is not None and src.commit_id is not None
    tensors = {n: src.tensors[n] for n in src.tensors}
    acc: dict[str, float] = {}
    details: dict[str, Any] = {}
    if routing == "condu":
        acc, details = _routed(store, src.commit, src.config, tensors, tasks, top_k, ev)
    elif routing == "none":
        triggers = src.commit.triggers
        for task in tasks:
            own = triggers.get(task.name)  # ConDU with a known task id: that task's expert
            weights = (
                {n: expert_tensor(store, t, own, n) for n, t in tensors.items()} if own else tensors
            )
            acc[task.name] = ev.accuracy(task, weights, src.config)
    else:
        raise AdbError(f"unknown routing {routing!r}; use none or condu")
    record = record_eval(store, src.commit_id, src.commit, acc, routing, details)
    return EvalResult(src.commit_id, record, acc, routing, details)


def _routed(
    store: Store,
    commit: Commit,
    config: Mapping[str, Any],
    unified: Mapping[str, torch.Tensor],
    tasks: Sequence[TaskConfig],
    top_k: int,
    ev: Evaluator,
) -> tuple[dict[str, float], dict[str, Any]]:
    """ConDU semantic aggregation over each task's eval split (`route`, `routed_logits`; the
    same functions `adapterdb.trainers.router` runs on a user's batches). Experts are
    decoupled once; the tasks' prototypes come from the base model."""
    expert_tasks = condu_tasks(commit)
    by_name = {t.name: t for t in tasks}
    missing = [t for t in expert_tasks if t not in by_name]
    if missing:
        raise AdbError(
            f"routing needs the task files of every expert; missing: {', '.join(missing)}"
        )
    protos = [ev.prototypes(by_name[t], config) for t in expert_tasks]
    started = time.perf_counter()
    experts = decoupled_experts(store, commit, unified)
    decouple_seconds = time.perf_counter() - started
    acc, hits = {}, {}
    for task in tasks:
        chosen = route(ev.base_eval_features(task, config), protos, top_k)
        labels: list[torch.Tensor] = []

        def logits(
            e: int, task: TaskConfig = task, seen: list[torch.Tensor] = labels
        ) -> torch.Tensor:
            out, y = ev.logits(task, experts[expert_tasks[e]], config)
            seen.append(y)
            return out

        total = routed_logits(chosen, logits, len(expert_tasks))
        acc[task.name] = float((total.argmax(1) == labels[0]).float().mean())
        if task.name in expert_tasks:
            hits[task.name] = float((chosen == expert_tasks.index(task.name)).any(1).float().mean())
    k = max(1, min(top_k, len(expert_tasks)))
    return acc, {"top_k": k, "routed_to_own_expert": hits, "decouple_seconds": decouple_seconds}


def condu_tasks(commit: Commit) -> list[str]:
    """The tasks of a ConDU merge commit (one trigger each), in the order they were merged."""
    if not commit.triggers:
        raise AdbError(
            "routing needs a ConDU commit (merge with --method condu); this one is of kind "
            f"{commit.kind!r}, method {commit.method!r}"
        )
    return list(commit.triggers)


def decoupled_experts(
    store: Store, commit: Commit, unified: Mapping[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Every task's expert τ̃_t = λ_t·M_t ⊙ τ_uni of a ConDU commit, by task."""
    return {
        t: {n: expert_tensor(store, u, trig, n) for n, u in unified.items()}
        for t, trig in commit.triggers.items()
    }


def route(features: torch.Tensor, prototypes: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """ConDU's semantic routing: (N, k) indices of the experts each input goes to, the top k
    by the max cosine of its base feature to an expert task's class prototypes (k capped at
    the number of experts). Computed on the CPU in float32, so that a GPU's reduced-precision
    matmul cannot send an input elsewhere than the CPU does."""
    feats = F.normalize(features.detach().float().cpu(), dim=1)
    units = [F.normalize(p.detach().float().cpu(), dim=1) for p in prototypes]
    scores = torch.stack([(feats @ p.T).amax(1) for p in units], 1)  # (N, experts)
    return scores.topk(max(1, min(top_k, len(units))), dim=1).indices


def routed_logits(
    chosen: torch.Tensor, expert_logits: Callable[[int], torch.Tensor], experts: int
) -> torch.Tensor:
    """Per input, the mean of the logits of the experts `chosen` for it; `expert_logits(e)`
    (all inputs through expert e) runs only for experts that some input goes to."""
    total: torch.Tensor | None = None
    for e in range(experts):
        use = (chosen == e).any(1, keepdim=True)
        if not bool(use.any()):
            continue
        logits = expert_logits(e)
        part = logits * use.to(logits.device, logits.dtype)
        total = part if total is None else total + part
    assert total is not None  # every input goes to k >= 1 experts
    return total / chosen.shape[1]


# -- records -------------------------------------------------------------------------------


def record_eval(
    store: Store,
    commit_id: str,
    commit: Commit,
    accuracy: Mapping[str, float],
    routing: str,
    details: Mapping[str, Any],
) -> str:
    """Append an eval record to `refs/evals/<commit>` (a chain of kind-eval commits)."""
    ref = f"{EVALS}{commit_id}"
    prev = store.refs.read(ref)
    record = Commit(
        manifest=commit.manifest,
        kind="eval",
        parents=(commit_id, prev) if prev else (commit_id,),
        task=commit.task,
        method=commit.method,
        eval={"accuracy": dict(accuracy), "routing": routing, **dict(details)},
        message=f"eval {', '.join(accuracy)}",
    )
    return store.commit(record, ref=ref, expected=prev)


def eval_records(store: Store, commit_id: str, routing: str | None = None) -> dict[str, float]:
    """Latest accuracy per task recorded for `commit_id` (optionally of one routing mode)."""
    return _chain(store, store.refs.read(f"{EVALS}{commit_id}"), routing)


def _chain(store: Store, oid: str | None, routing: str | None = None) -> dict[str, float]:
    """Accuracy per task along a chain of eval records; the newest value per task wins."""
    out: dict[str, float] = {}
    for record in eval_chain(store, oid):
        if routing is None or record.eval.get("routing") == routing:
            for task, value in record.eval.get("accuracy", {}).items():
                out.setdefault(task, value)
    return out


def base_key(task: TaskConfig) -> str:
    spec = task.model.model_dump(mode="json")
    return hashlib.sha256(repr(sorted(spec.items())).encode()).hexdigest()[:16]


def zero_shot(
    store: Store, tasks: Sequence[TaskConfig], evaluator: Evaluator | None = None
) -> dict[str, float]:
    """Base-model accuracy per task, computed once per (model, task) and kept in the store."""
    ev = evaluator or Evaluator()
    out: dict[str, float] = {}
    for task in tasks:
        ref = f"{EVALS}base/{base_key(task)}"
        known = _chain(store, store.refs.read(ref))
        if task.name in known:
            out[task.name] = known[task.name]
            continue
        out[task.name] = ev.accuracy(task, None, None)
        manifest = store.objects.put_json(Manifest({}).to_json())
        prev = store.refs.read(ref)
        record = Commit(
            manifest=manifest,
            kind="eval",
            parents=(prev,) if prev else (),
            eval={
                "accuracy": {task.name: out[task.name]},
                "zero_shot": True,
                "model": task.model.model_dump(mode="json"),
            },
            message=f"zero-shot {task.name}",
        )
        store.commit(record, ref=ref, expected=prev)
    return out


# -- the accuracy matrix -------------------------------------------------------------------


@dataclass
class Matrix:
    tasks: list[str]
    R: list[list[float | None]]
    trained: list[float | None]
    zero_shot: list[float | None]
    steps: list[str]
    flags: list[list[str]] = field(default_factory=list)  # per step: the expert's health flags

    def metrics(self) -> dict[str, float | None]:
        zs = self.zero_shot if all(z is not None for z in self.zero_shot) else None
        return cl_metrics(self.R, zs, self.trained)

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "R": self.R,
            "A_t_per_task": self.trained,
            "zero_shot": self.zero_shot,
            "steps": self.steps,
            "health_flags": self.flags,
            "metrics": self.metrics(),
        }


def merge_steps(store: Store, branch: str) -> list[tuple[str, Commit]]:
    """The branch's merge commits along first parents, oldest first: step t = the t-th merge."""
    oid = store.resolve(branch)
    steps = []
    while oid:
        c = store.read_commit(oid)
        if c.kind == "merge":
            steps.append((oid, c))
        oid = c.parents[0] if c.parents else None
    return steps[::-1]


def accuracy_matrix(store: Store, branch: str, routing: str | None = None) -> Matrix:
    """R[t][i] from eval records of each step's merge commit; A_t from the merged experts."""
    steps = merge_steps(store, branch)
    if not steps:
        raise AdbError(f"{branch} has no merge commits; `adb merge --into {branch}` first")
    tasks = [c.task or f"step{t}" for t, (_, c) in enumerate(steps)]
    R = []
    for oid, _ in steps:
        rec = eval_records(store, oid, routing)
        R.append([rec.get(task) for task in tasks])
    trained = [_trained_accuracy(store, c) for _, c in steps]
    flags = [_health_flags(store, c) for _, c in steps]
    zs_all: dict[str, float] = {}
    for _, c in steps:
        for src in c.sources:
            if not src.startswith("folder:"):
                zs_all.update(_zero_shot_for(store, store.read_commit(src)))
    zs = [zs_all.get(t) for t in tasks]
    return Matrix(tasks, R, trained, zs, [oid for oid, _ in steps], flags)


def _trained_accuracy(store: Store, merge: Commit) -> float | None:
    for src in merge.sources:
        if src.startswith("folder:"):
            continue
        c = store.read_commit(src)
        value = c.eval.get("accuracy", {}).get(c.task) if c.kind == "train" else None
        if value is not None:
            return value
    return None


def _health_flags(store: Store, merge: Commit) -> list[str]:
    """The failed health checks of the experts a merge step took in (trainers/health.py)."""
    out = []
    for src in merge.sources:
        if not src.startswith("folder:"):
            health = store.read_commit(src).stats.get("health") or {}
            out += [f["check"] for f in health.get("flags", []) if isinstance(f, dict)]
    return out


def _zero_shot_for(store: Store, expert: Commit) -> dict[str, float]:
    doc = expert.params.get("task_file") if expert.kind == "train" else None
    if not doc:
        return {}
    task = parse_task(doc, Path.cwd(), "expert")
    return _chain(store, store.refs.read(f"{EVALS}base/{base_key(task)}"))
