"""Streaming comparison of two adapters: per tensor and, for LoRA pairs, on ΔW = B·A·s.

Statistics accumulate in float64 one tensor (or one layer's ΔW) at a time, so comparing two
large adapters never holds more than one layer of each in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adapterdb.lora import delta_weight, lora_pairs, pair_scale


@dataclass
class DiffStats:
    """Running sums from which the diff metrics follow exactly."""

    numel: int = 0
    sq_a: float = 0.0
    sq_b: float = 0.0
    sq_diff: float = 0.0
    dot: float = 0.0
    same_sign: int = 0
    changed: int = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> DiffStats:
        a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
        self.numel += a64.numel()
        self.sq_a += float(a64.square().sum())
        self.sq_b += float(b64.square().sum())
        self.sq_diff += float((a64 - b64).square().sum())
        self.dot += float(a64.dot(b64))
        self.same_sign += int((a64.sign() == b64.sign()).sum())
        self.changed += int((a.reshape(-1) != b.reshape(-1)).sum())
        return self

    def merge(self, other: DiffStats) -> None:
        for k in ("numel", "sq_a", "sq_b", "sq_diff", "dot", "same_sign", "changed"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def row(self) -> dict[str, float]:
        """rel_l2 = ‖b−a‖/‖a‖ (inf when a is zero and b is not), cosine, sign agreement, changed."""
        norm = math.sqrt(self.sq_a * self.sq_b)
        if self.sq_a:
            rel = math.sqrt(self.sq_diff / self.sq_a)
        else:
            rel = 0.0 if self.sq_diff == 0 else math.inf
        n = max(self.numel, 1)
        return {
            "numel": self.numel,
            "rel_l2": rel,
            "cosine": self.dot / norm if norm else (1.0 if self.sq_diff == 0 else 0.0),
            "sign_agreement": self.same_sign / n,
            "changed": self.changed / n,
        }


Loader = Callable[[str], torch.Tensor]


def diff_adapters(
    names_a: list[str],
    load_a: Loader,
    config_a: Mapping[str, Any],
    names_b: list[str],
    load_b: Loader,
    config_b: Mapping[str, Any],
) -> dict[str, Any]:
    """Per-tensor rows, per-LoRA-layer ΔW rows, summaries, and the names only one side has.

    Each tensor is loaded once: a LoRA pair's four factors serve both its tensor rows and
    its ΔW row.
    """
    common = sorted(set(names_a) & set(names_b))
    pairs, rest = lora_pairs(common)
    tensors: dict[str, dict[str, float]] = {}
    layers: dict[str, dict[str, float]] = {}
    total, total_dw = DiffStats(), DiffStats()
    shape_mismatch: list[str] = []

    def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape:
            shape_mismatch.append(name)
            return False
        stats = DiffStats().add(a, b)
        total.merge(stats)
        tensors[name] = stats.row()
        return True

    for pair in pairs:
        fa, fb = (load_a(pair.a), load_a(pair.b)), (load_b(pair.a), load_b(pair.b))
        same_a = compare(pair.a, fa[0], fb[0])
        same_b = compare(pair.b, fa[1], fb[1])
        if same_a and same_b:
            dw_a = delta_weight(fa[0], fa[1], pair_scale(config_a, pair, fa[0]))
            dw_b = delta_weight(fb[0], fb[1], pair_scale(config_b, pair, fb[0]))
            stats = DiffStats().add(dw_a, dw_b)
            total_dw.merge(stats)
            layers[pair.module] = stats.row()
    for name in rest:
        compare(name, load_a(name), load_b(name))
    return {
        "tensors": dict(sorted(tensors.items())),
        "delta_w": layers,
        "summary": total.row(),
        "summary_delta_w": total_dw.row() if layers else None,
        "only_a": sorted(set(names_a) - set(names_b)),
        "only_b": sorted(set(names_b) - set(names_a)),
        "shape_mismatch": shape_mismatch,
    }
