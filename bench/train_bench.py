"""Training benchmark (issue 5): LoRA steps/s and the cost of PAM alignment, on CPU.

Measured in one run, all through `adapterdb.trainers.loop.train` (the code `adb train` runs):

- steps/s of LoRA r=8 training on EfficientNet-Lite0 (64 px, batch 32, the 32 1x1 convs,
  Fashion-MNIST T-shirt vs Shirt) and on MiniLM (batch 16 generated short texts, query/value),
  at 1 and 2 torch threads. Each model trains in ONE run whose steps alternate in blocks
  between 1 and 2 threads (the first step of a block is not timed), so both settings see the
  same load on this shared machine; model load, prototypes, evaluation and commit are not
  timed (step times come from the progress callback). If 2-thread steps blow the time budget,
  the rest of the run falls back to 1 thread, untimed.
- alignment overhead at s = 100 and s = 10 on MiniLM (batch 4, see ALIGN_BATCH): time of the
  training steps with alignment against the same run (same seed, steps, data order, initial
  global) without it, interleaved ABBA and repeated, medians. The branch first gets a global
  adapter (the throughput run's expert, merged with PAM), so alignment really runs.
- the cost of one alignment check (`align_adapter_` over the model's LoRA tensors at 1 thread)
  as a fraction of one training step, for both models: steadier than the difference of two
  noisy totals.

Every step and check is timed twice: wall clock (what a user waits) and the CPU time of the
training thread (`time.thread_time`; at 1 thread torch computes on the calling thread). Other
people's processes stretch the wall clock by whatever share of the 2 cores they take, but
barely the thread's CPU time, so the alignment targets are judged on CPU time; thread counts
are compared on wall time (a 2-thread step also burns CPU on a second thread).

    python bench/train_bench.py [--quick] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import Check, Timing, describe_machine, fmt, format_table, machine_info, write_json

from adapterdb.alignment import align_adapter_, alignment_thresholds
from adapterdb.cli.app import quiet_libraries
from adapterdb.merging import registry
from adapterdb.storage.store import Store
from adapterdb.trainers.config import TaskConfig, parse_task
from adapterdb.trainers.loop import global_adapter, train
from adapterdb.trainers.merge import merge_into

RANK = 8
ALIGN_P = 50.0
ALIGN_LIMIT = 1.02  # target: <= 2% slower at s = 100
GOOD_SPEEDUP = 1.3  # 2 threads must beat 1 by this much to be worth a default
# The with/without-alignment runs use MiniLM at batch 4, not 16: a check costs the same
# whatever the batch, so a cheaper step is the harder case for a relative target, and it keeps
# 3 x 2 runs of 200 steps inside the time budget on a loaded 2-core box.
ALIGN_MODEL, ALIGN_BATCH = "minilm", 4
CLOCKS = ("cpu", "wall")


@dataclass(frozen=True)
class Settings:
    """How much of everything to run (full run vs --quick smoke test)."""

    warmup: int  # untimed steps at the start of every run
    block: int  # timed steps per thread block (plus one untimed after each switch)
    rounds: int  # blocks per thread setting
    budget_s: float  # per throughput run; past it (once each setting has a block) the rest
    # of the run goes at 1 thread, untimed
    align_runs: dict[int, int]  # s -> steps per run
    repeats: int  # with/without pairs per s
    check_repeat: int  # timed align_adapter_ calls
    limit: int  # examples per split (prototypes and evaluation cost, not step cost)


FULL = Settings(3, 5, 2, 60.0, {100: 200, 10: 30}, 3, 30, 128)
QUICK = Settings(1, 1, 1, 10.0, {10: 12}, 1, 10, 32)

MODELS: dict[str, dict[str, Any]] = {
    "efficientnet-lite0": {"label": "EfficientNet-Lite0 64px", "batch": 32},
    "minilm": {"label": "MiniLM", "batch": 16},
}
SUBJECTS = ("film", "meal", "hotel", "phone", "concert", "book", "game", "trip")
GOOD = ("great", "lovely", "superb", "fun", "excellent")
BAD = ("awful", "boring", "terrible", "dull", "poor")
TAILS = ("overall", "to be honest", "as expected", "this time", "again")


class StopRun(Exception):
    """Raised from the progress callback to end a run once its timed steps are done."""


def now() -> dict[str, float]:
    return {"cpu": time.thread_time(), "wall": time.perf_counter()}


# -- tasks ------------------------------------------------------------------------------------


def write_texts(path: Path, n: int, seed: int) -> Path:
    """Short two-class review sentences (label 1 = positive), one JSON object a line."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            label = i % 2
            word = rng.choice(GOOD if label else BAD)
            text = f"the {rng.choice(SUBJECTS)} was {word} {rng.choice(TAILS)}"
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def data_spec(model: str, work: Path, limit: int) -> dict[str, Any]:
    if model == "efficientnet-lite0":
        return {"builtin": "fashion-mnist", "classes": [0, 6], "limit": limit, "image_size": 64}
    train_file, eval_file = work / "texts-train.jsonl", work / "texts-eval.jsonl"
    if not train_file.exists():
        write_texts(train_file, limit, 0)
        write_texts(eval_file, limit, 1)
    return {"train": str(train_file), "eval": str(eval_file), "text": "text"}


def make_task(
    model: str,
    work: Path,
    name: str,
    steps: int,
    limit: int,
    every: int = 100,
    align: bool = True,
    batch: int | None = None,
) -> TaskConfig:
    spec = {
        "name": name,
        "model": {"packaged": model},
        "data": data_spec(model, work, limit),
        "lora": {"r": RANK, "alpha": 2 * RANK},
        "optim": {
            "steps": steps,
            "batch_size": batch or MODELS[model]["batch"],
            "lr": 1e-3,
            "seed": 0,
        },
        "align": {"enabled": align, "p": ALIGN_P, "every": every},
    }
    return parse_task(spec, work, f"train_bench:{name}")


# -- step clock -------------------------------------------------------------------------------


@dataclass
class StepClock:
    """Progress callback: timestamps every step, sets the thread count of the next step.

    `plan[k]` is (threads, timed) for step k+1. Step k's time is stamp[k] - stamp[k-1]:
    everything between two callbacks (batch collation, forward, backward, optimiser, any
    alignment check of step k). `stop_at` ends the run there (no evaluation, no commit).
    """

    plan: list[tuple[int, bool]]
    budget_s: float = float("inf")
    min_timed: int = 1  # timed steps each thread setting gets before the budget applies
    stop_at: int | None = None
    stamps: list[dict[str, float]] = field(default_factory=list)
    ran: list[tuple[int, bool]] = field(default_factory=list)
    first_check: int | None = None  # first step that reported a misaligned fraction

    def start(self) -> None:
        torch.set_num_threads(self.plan[0][0])

    def __call__(self, step: int, total: int, loss: float, mis: float | None) -> None:
        self.stamps.append(now())
        self.ran.append(self.plan[step - 1])
        if mis is not None and self.first_check is None:
            self.first_check = step
        if step == self.stop_at:
            raise StopRun
        if step < len(self.plan):
            if self.over_budget():
                self.plan[step:] = [(1, False)] * (len(self.plan) - step)
            torch.set_num_threads(self.plan[step][0])

    def over_budget(self) -> bool:
        settings = {t for t, timed in self.plan if timed}
        enough = all(len(self.step_times(t)) >= self.min_timed for t in settings)
        return enough and self.stamps[-1]["wall"] - self.stamps[0]["wall"] > self.budget_s

    def step_times(self, threads: int, clock: str = "wall") -> list[float]:
        """Durations of the timed steps that ran with `threads` (step 1 has no start stamp)."""
        pairs = zip(self.stamps, self.stamps[1:], self.ran[1:], strict=False)
        return [b[clock] - a[clock] for a, b, (t, timed) in pairs if timed and t == threads]

    def window(self, first: int) -> dict[str, float]:
        """Seconds from the end of step `first` to the end of the last step, per clock."""
        return {c: self.stamps[-1][c] - self.stamps[first - 1][c] for c in CLOCKS}


def thread_plan(s: Settings) -> list[tuple[int, bool]]:
    """Warm-up at 1 thread, then blocks alternating 1, 2, 1, 2 ... threads."""
    plan = [(1, False)] * s.warmup
    for _ in range(s.rounds):
        for threads in (1, 2):
            plan += [(threads, False)] + [(threads, True)] * s.block
    return plan


def timings(samples: Mapping[str, list[float]]) -> dict[str, Any]:
    return {c: Timing(tuple(v)).to_json() if v else None for c, v in samples.items()}


# -- measurements -----------------------------------------------------------------------------


def throughput(model: str, store: Store, work: Path, s: Settings) -> dict[str, Any]:
    """One full training run on `branch = model` (committed), steps timed per thread count.

    At 2 threads "cpu" is the calling thread's share only; compare thread counts on "wall".
    """
    clock = StepClock(thread_plan(s), s.budget_s, s.block)
    task = make_task(model, work, "t1", len(clock.plan), s.limit)
    clock.start()
    started = time.perf_counter()
    result = train(task, store, model, clock)
    torch.set_num_threads(1)
    out: dict[str, Any] = {
        "batch": MODELS[model]["batch"],
        "run_seconds": time.perf_counter() - started,
        "steps": result.steps,
        "accuracy": result.accuracy,
        "expert": result.commit_id,
        "loadavg": list(os.getloadavg()),
    }
    for threads in (1, 2):
        out[f"threads_{threads}"] = timings({c: clock.step_times(threads, c) for c in CLOCKS})
    return out


def make_global(store: Store, branch: str) -> None:
    """PAM-merge the branch's expert into its (empty) global adapter."""
    merge_into(store, branch, "pam", registry.parse_params("average", []), [])


def timed_run(task: TaskConfig, store: Store, branch: str, warmup: int) -> dict[str, float]:
    """Steps warmup+1 .. last of one run at 1 thread (stopped before evaluation), per clock.

    Raises if alignment did not run exactly when asked (a run that measures nothing is no data).
    """
    steps = task.optim.steps or 0
    clock = StepClock([(1, True)] * steps, stop_at=steps)
    clock.start()
    with contextlib.suppress(StopRun):
        train(task, store, branch, clock)
    expected = task.align.every if task.align.enabled else None
    if clock.first_check != expected:
        raise RuntimeError(f"first alignment check at step {clock.first_check}, not {expected}")
    return clock.window(warmup)


def alignment_totals(model: str, store: Store, work: Path, s: Settings) -> dict[str, Any]:
    """With vs without alignment, same seed/steps/start, ABBA-interleaved, per s."""
    out = {}
    for every, steps in s.align_runs.items():
        tasks = {
            on: make_task(model, work, "t2", steps, s.limit, every, on, ALIGN_BATCH)
            for on in (True, False)
        }
        samples: dict[bool, dict[str, list[float]]] = {on: {c: [] for c in CLOCKS} for on in tasks}
        for i in range(s.repeats):
            for on in (False, True) if i % 2 == 0 else (True, False):
                for c, seconds in timed_run(tasks[on], store, model, s.warmup).items():
                    samples[on][c].append(seconds)
        out[str(every)] = {
            "steps": steps,
            "batch": ALIGN_BATCH,
            "timed_steps": steps - s.warmup,
            "checks": steps // every,
            "with": timings(samples[True]),
            "without": timings(samples[False]),
            "loadavg": list(os.getloadavg()),
        }
    return out


def check_cost(store: Store, branch: str, repeat: int) -> dict[str, Any]:
    """Time of one `align_adapter_` over the branch's LoRA tensors at 1 thread, per clock.

    The expert is the global plus Gaussian noise (so some signs conflict and get reset); the
    check is a fixed number of elementwise passes, so its cost barely depends on the values.
    """
    torch.set_num_threads(1)
    _, glob = global_adapter(store, branch)
    assert glob is not None
    gen = torch.Generator().manual_seed(0)
    noisy = {n: t + t.std() * torch.randn(t.shape, generator=gen) for n, t in glob.items()}
    thresholds = alignment_thresholds(glob, ALIGN_P)
    samples: dict[str, list[float]] = {c: [] for c in CLOCKS}
    reset = 0.0
    for i in range(repeat + 1):
        expert = {n: torch.nn.Parameter(t.clone()) for n, t in noisy.items()}
        start = now()
        report = align_adapter_(expert, glob, thresholds)
        end = now()
        if i:  # the first call warms the allocator
            for c in CLOCKS:
                samples[c].append(end[c] - start[c])
        reset = report.reset_fraction
    return {
        "tensors": len(glob),
        "parameters": sum(t.numel() for t in glob.values()),
        "reset_fraction": reset,
        "seconds": timings(samples),
    }


# -- report -----------------------------------------------------------------------------------


def step_median(res: Mapping[str, Any], threads: int, clock: str = "wall") -> float | None:
    timing = res[f"threads_{threads}"][clock]
    return timing["median"] if timing else None


def throughput_rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for model, res in results.items():
        one = step_median(res, 1)
        for threads in (1, 2):
            label = [MODELS[model]["label"], str(threads), str(res["batch"])]
            timing = res[f"threads_{threads}"]["wall"]
            if timing is None:
                rows.append([*label, "-", "-", "-", "0", "-", "-"])
                continue
            med, samples = timing["median"], timing["samples"]
            cpu = step_median(res, threads, "cpu")
            rows.append(
                [
                    *label,
                    fmt(med),
                    fmt(1 / med),
                    f"{fmt(min(samples))}-{fmt(max(samples))}",
                    str(len(samples)),
                    f"{one / med:.2f}x" if one else "-",
                    fmt(cpu) if cpu is not None and threads == 1 else "-",
                ]
            )
    return rows


THROUGHPUT_HEADERS = [
    "model",
    "threads",
    "batch",
    "median s/step",
    "steps/s",
    "range s/step",
    "n",
    "vs 1 thread",
    "CPU s/step",
]
CHECK_TABLE_HEADERS = ["metric", "value", "reference", "ratio", "target", "result"]


@dataclass(frozen=True)
class Row:
    """A Check plus the run-to-run spread of its reference: a gap inside it is not a result."""

    check: Check
    spread: float | None = None

    def cells(self) -> list[str]:
        cells = self.check.row()
        if self.inconclusive:
            cells[-1] = f"inconclusive (runs spread {self.spread:.0%})"
        return cells

    @property
    def inconclusive(self) -> bool:
        limit = self.check.limit
        return self.spread is not None and limit is not None and self.spread > limit - 1

    def to_json(self) -> dict[str, Any]:
        return {
            **self.check.to_json(),
            "reference_spread": self.spread,
            "inconclusive": self.inconclusive,
        }


def spread(timing: Mapping[str, Any]) -> float:
    """(max - min) / median of a Timing's samples."""
    return (max(timing["samples"]) - min(timing["samples"])) / timing["median"]


def total_rows(totals: Mapping[str, Any]) -> list[Row]:
    """With vs without alignment, median of the runs; the target applies to CPU at s = 100."""
    rows = []
    for every, res in totals.items():
        for c in CLOCKS:
            on, off = res["with"][c], res["without"][c]
            limit = ALIGN_LIMIT if every == "100" and c == "cpu" else None
            name = (
                f"MiniLM b{res['batch']} s={every} {c}: with / without alignment "
                f"({res['timed_steps']} steps, {res['checks']} checks)"
            )
            rows.append(Row(Check(name, on["median"], off["median"], limit), spread(off)))
    return rows


def direct_rows(costs: Mapping[str, Any], steps: Mapping[str, Any]) -> list[Row]:
    """(step + check / s) vs step, CPU medians: the overhead one check per s steps adds."""
    rows = []
    for model, cost in costs.items():
        step = step_median(steps[model], 1, "cpu")
        check = cost["seconds"]["cpu"]["median"]
        assert step is not None
        for every in (100, 10):
            name = f"{MODELS[model]['label']} b{steps[model]['batch']} s={every} cpu: direct"
            limit = ALIGN_LIMIT if every == 100 else None
            rows.append(Row(Check(name, step + check / every, step, limit, "s/step")))
    return rows


def cost_lines(costs: Mapping[str, Any], steps: Mapping[str, Any]) -> list[str]:
    lines = []
    for model, cost in costs.items():
        parts = []
        for c in CLOCKS:
            check, step = cost["seconds"][c]["median"], step_median(steps[model], 1, c)
            assert step is not None
            parts.append(f"{c} {check * 1e3:.2f} ms = {check / step:.2%} of a step ({step:.3f} s)")
        lines.append(
            f"one alignment check, {MODELS[model]['label']} ({cost['parameters']} LoRA params "
            f"in {cost['tensors']} tensors, {cost['reset_fraction']:.1%} reset): "
            + "; ".join(parts)
        )
    return lines


def thread_verdict(steps: Mapping[str, Any]) -> str:
    """Whether the measured 1- vs 2-thread step times support the CLI's 1-thread default."""
    speedups = {}
    for model, res in steps.items():
        one, two = step_median(res, 1), step_median(res, 2)
        speedups[model] = (one / two) if one and two else 0.0
    parts = ", ".join(f"{MODELS[m]['label']} {v:.2f}x" for m, v in speedups.items())
    head = f"2 threads vs 1 (wall-clock speed-up of the median step): {parts}"
    if all(v < GOOD_SPEEDUP for v in speedups.values()):
        return f"{head}; below {GOOD_SPEEDUP}x on every model: supports the 1-thread default"
    return (
        f"{head}; 2 threads paid off at this load, which on a shared 2-core box changes with "
        "others' work: this run alone does not support the 1-thread default"
    )


NOTE = (
    "2-thread torch on this 2-core shared machine collapses whenever anything else runs "
    "(OpenMP threads wait on a core another process holds); the CLI defaults to 1 thread "
    "(ADB_THREADS / --threads override)."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test, under a minute")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--workdir", type=Path, default=None, help="where the tmp store goes")
    return parser.parse_args(argv)


def measure(work: Path, s: Settings) -> tuple[dict, dict, dict, dict[str, float]]:
    """Throughput + global + check cost per model, then the with/without runs."""
    store = Store.init(work / "store")
    steps, costs, phases = {}, {}, {}
    for model in MODELS:
        print(f"training {model} at 1/2 threads ...", flush=True)
        start = time.perf_counter()
        steps[model] = throughput(model, store, work, s)
        make_global(store, model)
        costs[model] = check_cost(store, model, s.check_repeat)
        phases[model] = time.perf_counter() - start
    print(f"alignment with vs without ({ALIGN_MODEL}, batch {ALIGN_BATCH}) ...", flush=True)
    start = time.perf_counter()
    totals = alignment_totals(ALIGN_MODEL, store, work, s)
    phases["align_totals"] = time.perf_counter() - start
    return steps, costs, totals, phases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = QUICK if args.quick else FULL
    quiet_libraries()
    info = machine_info()
    print(describe_machine(info))
    print(f"load average at start: {info['loadavg_start']}")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adb-train-bench-", dir=args.workdir) as tmp:
        steps, costs, totals, phases = measure(Path(tmp), s)
    rows = total_rows(totals) + direct_rows(costs, steps)
    md = args.markdown
    print()
    print(format_table(THROUGHPUT_HEADERS, throughput_rows(steps), md))
    print()
    print(format_table(CHECK_TABLE_HEADERS, [r.cells() for r in rows], md))
    print()
    print("\n".join(cost_lines(costs, steps)))
    verdict = thread_verdict(steps)
    load_end = list(os.getloadavg())
    print(f"\n{NOTE}\n{verdict}.")
    print(f"\nload average at start: {info['loadavg_start']}, at end: {load_end}")
    elapsed = time.perf_counter() - began
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
    print(f"wall time after imports: {elapsed:.0f} s ({parts})")
    doc = {
        "command": " ".join(["python", "bench/train_bench.py", *(argv or sys.argv[1:])]),
        "machine": {**info, "loadavg_end": load_end},
        "quick": args.quick,
        "settings": asdict(s),
        "wall_seconds": elapsed,
        "phase_seconds": phases,
        "throughput": steps,
        "align_check_cost": costs,
        "align_totals": totals,
        "checks": [r.to_json() for r in rows],
        "threads_note": NOTE,
        "threads_verdict": verdict,
    }
    print(f"wrote {write_json('train_bench', doc)}")
    return 0 if all(r.check.passed is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
