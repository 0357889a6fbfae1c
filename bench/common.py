"""Helpers shared by the bench scripts: timing, machine description, result table, JSON output.

Benchmarks here run on shared machines, so every figure is a median of repeats taken next to
its reference in the same run, and every report carries the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

OUT_DIR = Path(__file__).resolve().parent / "out"
PACKAGES = ("torch", "numpy", "safetensors", "zstandard")


# -- timing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall-clock samples of one measurement, in seconds."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "best": self.best, "samples": list(self.samples)}


def time_call(
    fn: Callable[[], object],
    repeat: int = 3,
    setup: Callable[[], object] | None = None,
    warmup: int = 0,
) -> Timing:
    """Time `fn()` `repeat` times; `setup()` runs untimed before each call (e.g. a fresh store).

    `warmup` untimed rounds first fill the page cache and the allocator, which a user who runs
    the same thing twice also benefits from.
    """
    samples = []
    for i in range(warmup + repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            samples.append(elapsed)
    return Timing(tuple(samples))


def run_command(
    argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise with its stderr if it fails (a failed run is no data)."""
    proc = subprocess.run(
        list(argv), env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc


def time_command(
    argv: Sequence[str],
    repeat: int = 3,
    setup: Callable[[], object] | None = None,
    warmup: int = 0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Timing:
    """Wall time of a whole process (interpreter start and imports included), as a user meets it."""
    return time_call(lambda: run_command(argv, env, cwd), repeat, setup, warmup)


def memcpy_timing(nbytes: int, repeat: int = 3, fresh: bool = False) -> Timing:
    """`numpy.copyto` of `nbytes`: the machine's physical floor for touching that much data.

    `fresh=True` copies into newly allocated memory each time, so page faults are counted too
    (what any freshly allocated output buffer costs); otherwise the destination is pre-touched.
    """
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(0)

    def copy() -> None:
        np.copyto(np.empty_like(src) if fresh else dst, src)

    return time_call(copy, repeat, warmup=1)


# -- machine ----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and key package versions, and the load right now."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(_memory_bytes() / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "loadavg_start": list(os.getloadavg()),
    }


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line for a report."""
    pkgs = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    return (
        f"{info['cpu']}, {info['usable_cores']}/{info['cores']} cores, "
        f"{info['memory_gib']} GiB, {info['os']}, Python {info['python']}, {pkgs}"
    )


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One table row: a measured value against a reference, with a ratio target (or none)."""

    metric: str
    value: float
    reference: float
    limit: float | None
    unit: str = "s"

    @property
    def ratio(self) -> float:
        return self.value / self.reference if self.reference else float("inf")

    @property
    def passed(self) -> bool | None:
        return None if self.limit is None else self.ratio <= self.limit

    def row(self) -> list[str]:
        verdict = {True: "pass", False: "FAIL", None: "info"}[self.passed]
        target = "-" if self.limit is None else f"<= {self.limit:g}x"
        return [
            self.metric,
            f"{fmt(self.value)} {self.unit}",
            f"{fmt(self.reference)} {self.unit}",
            f"{self.ratio:.3f}x",
            target,
            verdict,
        ]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "passed": self.passed}


CHECK_HEADERS = ["metric", "adb", "reference", "ratio", "target", "result"]


def fmt(x: float) -> str:
    """Four significant digits, no scientific notation for the ranges benchmarks print."""
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.4g}"
    return f"{x:.3e}"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False
) -> str:
    """A fixed-width text table, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line.format(*headers), rule, *(line.format(*r) for r in rows)])


def write_json(name: str, doc: Mapping[str, Any]) -> Path:
    """Write `bench/out/<name>.json` (created on demand) and return its path."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def kernel_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every one-thread kernel benchmark shares (--quick, --markdown, --threads),
    described by the first line of the script's docstring."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test, about a minute")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return parser
