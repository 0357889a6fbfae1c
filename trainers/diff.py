"""`adb diff` and `adapterdb.Store.diff`: the figures of `adapterdb.compare` for two adapters
given as store revisions, PEFT folders or (from Python) in-memory adapters."""

from __future__ import annotations

from typing import Any

from adapterdb.compare import diff_adapters
from adapterdb.trainers.merge import Source


def diff_sources(a: Source, b: Source) -> dict[str, Any]:
    """Per-tensor rows, per-LoRA-layer ΔW rows and summaries of a → b (`adb diff --json`).

    Tensors decode lazily, one LoRA layer at a time, as `diff_adapters` asks for them (a
    lazy clone fetches them first, all at once)."""
    a.prefetch()
    b.prefetch()
    return diff_adapters(
        list(a.tensors),
        a.tensors.__getitem__,
        a.config,
        list(b.tensors),
        b.tensors.__getitem__,
        b.config,
    )
