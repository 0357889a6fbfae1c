"""`adb train`: fine-tune a temporary LoRA on one task with PAM alignment, commit the expert.

The expert starts as a copy of the branch's global adapter (`init: global`), trains under
`accelerate` (CPU, one GPU, multi-process, TPU alike), and every `align.every` optimiser steps
its sign conflicts with the global on the top-p% of |W_G| are re-initialised. The threshold
is computed once per task; each check is one fused pass. The expert is committed on
`refs/experts/<branch>/<task>`; the branch's global adapter moves only with `adb merge`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from adapterdb.adapter import from_torch, plain_config, to_torch
from adapterdb.aligner import Aligner
from adapterdb.errors import AdbError
from adapterdb.storage.commits import Commit
from adapterdb.storage.store import Store
from adapterdb.trainers import health as health_mod
from adapterdb.trainers import runtime
from adapterdb.trainers.config import TaskConfig
from adapterdb.trainers.health import Flag, Health
from adapterdb.trainers.merge import EXPERTS

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
NO_GLOBAL = "the branch has no global adapter yet"  # why an expert trained without alignment
Progress = Callable[[int, int, float, float | None], None]  # step, total, loss, misaligned


@dataclass
class TrainResult:
    commit_id: str | None
    accuracy: float
    steps: int
    seconds: float
    align: list[dict[str, float]] = field(default_factory=list)
    align_skipped: str | None = None
    loop_seconds: float = 0.0  # the optimisation steps alone (no loading, eval or commit)
    device: str = "cpu"  # where it trained: accelerate's device, precision and process count
    health: dict[str, Any] = field(default_factory=dict)  # figures, as the commit records
    flags: list[Flag] = field(default_factory=list)  # failed health checks (optim.on_collapse)


def global_adapter(store: Store, branch: str) -> tuple[str | None, dict[str, torch.Tensor] | None]:
    """(head id, tensors) of the branch's global adapter, or (None, None) on an empty branch."""
    head = store.refs.read(f"refs/heads/{branch}")
    if head is None:
        return None, None
    manifest = store.read_manifest(store.read_commit(head).manifest)
    return head, {n: to_torch(r) for n, r in store.iter_tensors(manifest)}


def total_steps(task: TaskConfig, train_size: int, processes: int) -> int:
    o = task.optim
    if o.steps is not None:
        return o.steps
    per_epoch = -(-train_size // (o.batch_size * processes * o.grad_accum))
    return max(1, per_epoch * (o.epochs or 1))


def train(
    task: TaskConfig,
    store: Store,
    branch: str,
    progress: Progress | None = None,
    init: dict[str, torch.Tensor] | None = None,
    cache: runtime.RuntimeCache | None = None,
) -> TrainResult:
    """Train one expert and commit it (on the main process); see the module docstring.

    `init` overrides where the expert starts; by default it is the branch's global adapter
    (`init: global`) or a fresh LoRA. `cache` reuses built runtimes across calls.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    lr = single_lr(task)
    try:
        accel = Accelerator(mixed_precision=PRECISION[task.optim.precision])
    except ValueError as exc:
        raise AdbError(
            f"optim.precision={task.optim.precision} is not usable here ({exc})"
        ) from None
    check_process_group(accel.num_processes)
    set_seed(task.optim.seed)
    started = time.perf_counter()
    head, glob = global_adapter(store, branch)
    rt = cache.get(task) if cache is not None else runtime.build(task)
    start = init if init is not None else (glob if task.init == "global" else None)
    # Seeded again after the runtime is ready: building one draws random numbers and reusing a
    # cached one draws none, and the LoRA init and batch order must not depend on which it was
    # (a resumed `adb run` would otherwise train differently from an uninterrupted one).
    set_seed(task.optim.seed)
    if start is not None:
        runtime.set_lora(rt, start)
    else:  # PEFT's init, seeded; a reused runtime also holds the last expert's weights
        runtime.fresh_lora(rt, task.optim.seed)
    live = runtime.lora_parameters(rt)
    aligner = _aligner(task, rt, glob)
    skipped = NO_GLOBAL if task.align.enabled and glob is None else None

    params = [p for p in rt.peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=task.optim.weight_decay)
    loader = runtime.batches(
        rt, rt.data.train, task.optim.batch_size, shuffle=True, drop_last=False
    )
    model, opt, loader = accel.prepare(StepLoss(rt, task.optim.label_smoothing), opt, loader)
    steps = total_steps(task, len(rt.data.train), accel.num_processes)
    sched = schedule(opt, task, steps)
    max_norm = task.optim.max_grad_norm or math.inf  # inf: measure the norm, clip nothing
    health = Health(task.name, lr, None if rt.generative else rt.data.num_classes)
    probe = _probe(rt)
    probe_at = health_mod.probe_steps(steps) if probe else set()
    if probe:
        health.record_probe(0, probe())
    rt.loaded.train(True)
    batches = runtime.iter_forever(loader)
    misaligned: float | None = None
    loop_started = time.perf_counter()
    with interrupts() as stop_if_interrupted:
        for step in range(1, steps + 1):
            stop_if_interrupted()
            grad_norm = None
            for _ in range(task.optim.grad_accum):
                with accel.accumulate(model), accel.autocast():
                    loss = model(next(batches))
                    accel.backward(loss)
                    if accel.sync_gradients:
                        grad_norm = float(accel.clip_grad_norm_(params, max_norm))
                    opt.step()
                    opt.zero_grad()
            sched.step()
            report = aligner.step() if aligner else None
            if report is not None:
                misaligned = report.reset_fraction
            value = float(loss.detach())
            if not math.isfinite(value):
                raise diverged(task, step)
            health.record_step(value, grad_norm)
            if step in probe_at:
                assert probe is not None
                health.record_probe(step, probe())
            if progress and accel.is_main_process:
                progress(step, steps, value, misaligned)
    barrier(accel.device)
    if not all(bool(torch.isfinite(p).all()) for p in live.values()):
        raise diverged(task, steps)
    loop_seconds = time.perf_counter() - loop_started
    where = f"{accel.device} {task.optim.precision} x{accel.num_processes}"
    checks = aligner.checks if aligner else []
    result = TrainResult(None, 0.0, steps, 0.0, checks, skipped, loop_seconds, where)
    if accel.is_main_process:
        result.accuracy = runtime.accuracy(rt)
        labels = None if rt.data.eval is None else rt.data.eval.labels
        health.record_accuracy(result.accuracy, labels)
        health.delta_norms = health_mod.delta_norms(rt.peft)
        result.health, result.flags = health.to_json(), health.flags()
        if result.flags and task.optim.on_collapse == "stop":
            raise AdbError(
                f"{result.flags[0].message} (optim.on_collapse: stop; nothing was committed)"
            )
        result.seconds = time.perf_counter() - started
        result.commit_id = commit_expert(store, branch, head, task, rt, result)
    barrier(accel.device)
    return result


def _aligner(
    task: TaskConfig, rt: runtime.Runtime, glob: dict[str, torch.Tensor] | None
) -> Aligner | None:
    """PAM's step against the branch's global adapter; None when alignment is off or there
    is no global to align to (the first task of a branch)."""
    if not task.align.enabled or glob is None:
        return None
    a = task.align
    return Aligner(rt.peft, glob, a.p, a.every, a.reinit, a.scope)


@contextmanager
def interrupts() -> Iterator[Callable[[], None]]:
    """Ctrl-C while training raises KeyboardInterrupt at once, as usual, and the returned
    check raises it again at the next step should anything have swallowed the first: Python
    drops exceptions raised inside __del__ methods and weakref callbacks, which run whenever
    garbage is collected. A no-op off the main thread or when SIGINT is not Python's default."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield lambda: None
        return
    pressed = threading.Event()

    def handler(signum: int, frame: object) -> None:
        pressed.set()
        raise KeyboardInterrupt

    def check() -> None:
        if pressed.is_set():
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def single_lr(task: TaskConfig) -> float:
    """The task's learning rate; a list of candidates is for `adb run` to choose from."""
    if isinstance(task.optim.lr, list):
        raise AdbError(
            f"task {task.name}: optim.lr lists candidates {task.optim.lr}; `adb run` picks one "
            "per sequence, `adb train` needs a single value"
        )
    return task.optim.lr


def schedule(opt: torch.optim.Optimizer, task: TaskConfig, steps: int) -> Any:
    """Linear warmup over `optim.warmup` of the steps, then `optim.schedule` decay towards 0
    (as HF training scripts do). Stepped once per optimiser step by the loop itself: accelerate's
    wrapped scheduler would step once per process."""
    warm = round(task.optim.warmup * steps)
    kind = task.optim.schedule

    def factor(done: int) -> float:
        if done < warm:
            return (done + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        left = (done - warm) / max(1, steps - warm)
        return 1.0 - left if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * left))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _probe(rt: runtime.Runtime) -> Callable[[], float] | None:
    """The probe batch's feature-cosine check (classifiers only): the first examples of the
    training split, measured in eval mode so that dropout does not blur it."""
    if rt.generative or len(rt.data.train) < 2:
        return None
    size = min(health_mod.PROBE_SIZE, len(rt.data.train))
    batch = rt.loaded.collate([rt.data.train[i] for i in range(size)])
    batch = runtime.on_device(batch, rt.loaded.device)
    measure = health_mod.feature_probe(rt.loaded.forward_features, batch)

    def probe() -> float:
        rt.peft.eval()
        try:
            return measure()
        finally:
            rt.loaded.train(True)

    return probe


def diverged(task: TaskConfig, step: int) -> AdbError:
    """A NaN/inf loss or weight stops training before the expert reaches the store: merged
    into the global adapter it would poison every later task."""
    return AdbError(
        f"task {task.name}: training diverged at step {step} (loss or weights not finite); "
        f"lower optim.lr (now {single_lr(task):g}) or use optim.precision: fp32"
    )


def barrier(device: torch.device) -> None:
    """Every process waits here. Not `accel.wait_for_everyone()`: it names the local rank as a
    CUDA device even for a CPU (gloo) group, which fails on a machine with fewer GPUs than
    processes (ACCELERATE_USE_CPU=1 on a one-GPU box)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index or 0])
    else:
        dist.barrier()


def check_process_group(processes: int) -> None:
    """Refuse a multi-process launch that accelerate runs as independent single processes
    (torchrun or `accelerate launch --multi_gpu` on a machine without a GPU and without
    ACCELERATE_USE_CPU): every process would train alone and commit its own expert."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and processes == 1:
        raise AdbError(
            f"launched as {launched} processes but accelerate sees {processes}; on CPU set "
            "ACCELERATE_USE_CPU=1 so the processes form one (gloo) group"
        )


class StepLoss(torch.nn.Module):
    """The training loss as the forward of a module that owns the PEFT model.

    `accel.prepare` wraps this module in DDP when there are several processes; DDP only
    all-reduces gradients of a backward that follows its own forward, and the model-specific
    closures in `rt.loaded` call the inner module directly, so the loss must come from here.
    """

    def __init__(self, rt: runtime.Runtime, smoothing: float) -> None:
        super().__init__()
        self.peft = rt.peft  # registers the LoRA parameters with the wrapper
        self.rt, self.smoothing = rt, smoothing

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return step_loss(self.rt, batch, self.smoothing)


def step_loss(rt: runtime.Runtime, batch: dict[str, Any], smoothing: float) -> torch.Tensor:
    if rt.generative:
        return rt.loaded.lm_loss(batch)
    logits = rt.loaded.logits(batch)
    return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=smoothing)


def commit_expert(
    store: Store,
    branch: str,
    head: str | None,
    task: TaskConfig,
    rt: runtime.Runtime,
    result: TrainResult,
) -> str:
    """Commit `adb train`'s expert: its LoRA, the task file, and the head's prototypes."""
    config = rt.peft.peft_config["default"].to_dict()
    config["base_model_name_or_path"] = base_model_id(task)
    objects = {}
    if rt.loaded.head is not None:
        objects["prototypes"] = store.objects.put_tensor(
            from_torch(rt.loaded.head.prototypes.cpu())
        )
    params = {
        "align": task.align.model_dump(),
        "init": task.init,
        "task_file": task.model_dump(mode="json"),
        "fingerprint": task.fingerprint(),
    }
    evaluated = {"accuracy": {task.name: result.accuracy}}
    return commit_trained(
        store, branch, head, task.name, runtime.get_lora(rt), config, params, result, evaluated,
        objects,
    )  # fmt: skip


def commit_trained(
    store: Store,
    branch: str,
    head: str | None,
    task: str,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    params: Mapping[str, Any],
    result: TrainResult,
    evaluated: Mapping[str, Any],
    objects: Mapping[str, str],
    message: str | None = None,
) -> str:
    """Commit a trained expert on `refs/experts/<branch>/<task>` (objects, then commit, then
    the ref), with `head` as parent. The one builder of expert commits: `adb train` and
    `PamCallback` record the same fields, so `adb merge --method pam` (which reads
    `params.align`), `adb log` and the reports treat their experts alike."""
    config = plain_config(dict(config))
    manifest = store.put_adapter({n: from_torch(t) for n, t in tensors.items()}, config, {})
    commit = Commit(
        manifest=manifest,
        kind="train",
        parents=(head,) if head else (),
        task=task,
        method="train",
        params=dict(params),
        base_model=config.get("base_model_name_or_path"),
        eval=dict(evaluated),
        stats={
            "steps": result.steps,
            "seconds": result.seconds,
            "train_seconds": result.loop_seconds,
            "align_checks": result.align,
            "align_skipped": result.align_skipped,
            "device": result.device,
            "health": result.health,
        },
        message=message or f"train {task}",
        extra={"objects": dict(objects), "branch": branch},
    )
    return store.commit(commit, ref=f"{EXPERTS}{branch}/{task}")


def reuse_expert(store: Store, branch: str, oid: str) -> str:
    """A finished expert committed again on `branch`: same manifest, task file and statistics,
    with this branch's head as parent. Training is a function of the task file, so an expert
    that starts from the base model (ConDU's) is the same in every task order; copying the
    commit, not pointing at it, keeps each branch's history its own."""
    c = store.read_commit(oid)
    head = store.refs.read(f"refs/heads/{branch}")
    copy = dataclasses.replace(
        c,
        parents=(head,) if head else (),
        time=0.0,
        author="",
        provenance={},
        message=f"{c.message} (reused {oid[:10]})",
        extra={**c.extra, "branch": branch, "reused_from": oid},
    )
    return store.commit(copy, ref=f"{EXPERTS}{branch}/{c.task}")


def base_model_id(task: TaskConfig) -> str:
    m = task.model
    return m.packaged or m.python or str(m.path)
