"""Merge benchmark (issue 4): merge kernels against the machine's bandwidth and against PEFT.

All in one run, on the Gemma-2B-shaped LoRA of `shapes.py` (39M parameters), T = 2 and 10
sources (distinct seeds), fp32 and bf16:

- bandwidth: every registered method through `merge_adapters` (and ConDU's `Unifier`), in
  GB/s of tensor bytes read + written (T inputs + 1 output per tensor) as a fraction of the
  in-place ceiling measured next to it: `torch.add(a, b, out=c)` over the same tensors.
- PEFT: `peft.utils.merge_utils` task_arithmetic / ties / dare_linear looped over the same
  tensors (what `add_weighted_adapter` does per layer), timed next to ours, with the results
  compared where the definitions match (TIES: adb `trim=tensor elect=sum`; DARE: statistics,
  the RNGs differ).
- product space: the average of 2 adapters on ΔW, back to rank 32 with the exact QR+small-SVD
  `lowrank.refactor` (through `trainers.merge.merge(..., "product", 32)`), against PEFT's
  `combination_type="svd"` helper (a dense SVD per module) measured on one module of each
  shape and scaled to the whole adapter.
- PAM alignment: one `align_adapter_` check (precomputed thresholds) on 39M parameters and on
  the demo model's own LoRA, against one LoRA training step of the demo model
  (EfficientNet-Lite0, split-fashion-mnist.yaml settings), and the implied overhead at s=100.
- ConDU unify of 10 tasks, streaming tensor by tensor from files vs all adapters in memory:
  time and peak RSS, each in its own subprocess.

Every timing is a median of repeats interleaved round-robin with its reference (the machine is
shared: the ratio of neighbours is steadier than either figure). Torch runs at `--threads`
(default 1: on a 2-core box shared with other jobs, 2-thread ops stall on each other).

    python bench/merge_bench.py [--quick] [--markdown] [--threads N] [--default-malloc]

Writes bench/out/merge_bench.json (--quick: merge_bench_quick.json, 1 layer, about a minute;
--default-malloc: *_malloc.json, measured without adb's memory policy, adapterdb.memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from common import (
    CHECK_HEADERS,
    Check,
    Timing,
    describe_machine,
    fmt,
    format_table,
    kernel_parser,
    machine_info,
    run_command,
    time_call,
    write_json,
)
from shapes import LAYERS, MODULES, RANK, gemma_like_config, gemma_like_lora

from adapterdb.alignment import align_adapter_, alignment_thresholds
from adapterdb.memory import keep_freed_memory
from adapterdb.merging import Unifier, registry
from adapterdb.merging.basic import weighted_sum
from adapterdb.merging.dare import drop_stream, next_keep
from adapterdb.topk import kth_largest_abs, magnitude_threshold

Tensors = dict[str, torch.Tensor]
SEQUENCE = Path(__file__).resolve().parents[1] / "trainers/sequences/split-fashion-mnist.yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
TIES_DENSITY = 0.25  # d·n is an integer for every tensor here (PEFT floors k, adb ceils)
DARE_DENSITY = 0.1  # adb's default (the paper's drop rate 0.9)
ALIGN_P, ALIGN_EVERY = 50.0, 100
# `average` is held to the ceiling as `adb merge --into` runs it: into reused buffers, the
# ceiling's own footing (the issue's reference is a preallocated lerp).
CEILING_FRACTION = {("average (streamed)", 2): 0.7, ("emr", 10): 0.1, ("unifier", 10): 0.1}
PEFT_SPEEDUP = {"ties": 10.0, "task_arithmetic": 3.0, "dare": 3.0}
PRODUCT_LIMIT_S = 5.0
ALIGN_LIMIT = 0.02
# Linux keeps ru_maxrss across exec, so a child spawned straight from this (multi-GB) process
# would report our peak; a grandchild forked from a small launcher starts from the launcher's.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


@dataclass(frozen=True)
class Settings:
    """How much of everything to run (full run vs --quick smoke test)."""

    layers: int  # decoder layers of the Gemma-shaped adapter
    repeat: int  # samples per interleaved measurement
    svd_repeat: int  # PEFT's dense SVD of the 2048x2048 and 256x2048 modules
    big_svd_repeat: int  # ... and of the 2048x16384 one (0: estimate from 2048x2048)
    train_warmup: int
    train_steps: int
    align_repeat: int
    demo_align_repeat: int


FULL = Settings(LAYERS, 3, 3, 1, 3, 10, 3, 20)
QUICK = Settings(1, 3, 1, 0, 1, 3, 3, 5)


@dataclass(frozen=True)
class AtLeast(Check):
    """A row whose ratio must reach the limit (e.g. a fraction of the bandwidth ceiling)."""

    @property
    def passed(self) -> bool | None:
        return None if self.limit is None else self.ratio >= self.limit

    def row(self) -> list[str]:
        cells = super().row()
        cells[4] = "-" if self.limit is None else f">= {self.limit:g}x"
        return cells


# -- timing ------------------------------------------------------------------------------------


def interleaved(fns: Mapping[str, Callable[[], object]], repeat: int) -> dict[str, Timing]:
    """Time each function `repeat` times, round-robin, so all see the same machine load."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    return {k: Timing(tuple(v)) for k, v in samples.items()}


def nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def max_rss_mib() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hwm_mib() -> float | None:
    """Linux's VmHWM: the peak RSS of this process image alone (a cross-check of ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# -- sources -----------------------------------------------------------------------------------


def make_sources(count: int, layers: int) -> list[Tensors]:
    """`count` Gemma-shaped fp32 adapters with distinct seeds (distinct task vectors)."""
    return [gemma_like_lora(torch.float32, seed, layers) for seed in range(count)]


def cast(sources: Sequence[Tensors], dtype: torch.dtype) -> list[Tensors]:
    return [{n: t.to(dtype) for n, t in s.items()} for s in sources]


# -- bandwidth and PEFT ------------------------------------------------------------------------


def ceiling(sources: Sequence[Tensors], out: Tensors) -> Callable[[], None]:
    """The in-place elementwise ceiling: read 2 tensors, write 1, into pre-touched memory."""
    a, b = sources[0], sources[1]

    def run() -> None:
        for name, dst in out.items():
            torch.add(a[name], b[name], out=dst)

    return run


def ours(
    method: str,
    args: Sequence[str],
    sources: Sequence[Tensors],
    keep: dict[str, Tensors],
    reuse: bool = False,
) -> Callable[[], None]:
    """A whole-adapter merge through the registry: fresh outputs, as `merge_adapters` returns
    them to a caller that keeps them (and as `adb merge -o` does), or `reuse`: streamed into
    buffers reused per shape, as `adb merge --into` runs it (each result is stored before the
    next is drawn; storing is not timed here)."""
    params = registry.parse_params(method, args)

    def run() -> None:
        keep["ours"] = {}  # free the last result first: one output alive at a time
        merged = registry.merge_adapters(method, sources, params, reuse=reuse)
        if reuse:
            for _ in merged:
                pass
        else:
            keep["ours"] = dict(merged)

    return run


def unifier(sources: Sequence[Tensors]) -> Callable[[], None]:
    """ConDU's streaming unify over every tensor (unified tensor + bool masks, then λ_t)."""

    def run() -> None:
        u = Unifier(len(sources))
        for name in sources[0]:
            u.unify_tensor(name, [s[name] for s in sources])
        u.scales()

    return run


def fresh_pages(like: Tensors, keep: dict[str, Tensors]) -> Callable[[], None]:
    """Diagnostic: allocate and fill one adapter's worth of outputs, kept like a merge result.
    This is what a fresh output costs before any arithmetic (page faults: the allocator gives
    freed outputs back to the OS, so each call faults them in again)."""

    def run() -> None:
        keep["ours"] = {}
        keep["ours"] = {n: torch.empty_like(x).fill_(0) for n, x in like.items()}

    return run


def average_into(sources: Sequence[Tensors], out: Tensors) -> Callable[[], None]:
    """Diagnostic: the average kernel (`basic.weighted_sum`) into pre-touched outputs, i.e.
    the registry's average without fresh output pages: same footing as the ceiling."""
    weights = torch.full((len(sources),), 1 / len(sources))

    def run() -> None:
        for name, dst in out.items():
            weighted_sum([s[name] for s in sources], weights, out=dst)

    return run


def ties_thresholds_only(sources: Sequence[Tensors], density: float) -> Callable[[], None]:
    """Diagnostic: TIES' per-tensor exact trim thresholds alone (T selects per tensor)."""

    def run() -> None:
        for name in sources[0]:
            for s in sources:
                magnitude_threshold(s[name], density)

    return run


def dare_masks_only(sources: Sequence[Tensors], density: float) -> Callable[[], None]:
    """Diagnostic: DARE's keep masks alone (the seeded SFC64 stream, as float 0/1)."""

    def run() -> None:
        for name, x in sources[0].items():
            for t in range(len(sources)):
                next_keep(drop_stream(0, name, t), x.numel(), density)

    return run


def peft(
    kind: str, sources: Sequence[Tensors], density: float, keep: dict[str, Tensors]
) -> Callable[[], None]:
    """PEFT's merge_utils function looped over the tensors, weights 1 (as ours)."""
    from peft.utils import merge_utils

    weights = torch.ones(len(sources))
    fn = getattr(merge_utils, kind)
    extra = () if kind == "task_arithmetic" else (density,)

    def run() -> None:
        keep["peft"] = {}
        keep["peft"] = {n: fn([s[n] for s in sources], weights, *extra) for n in sources[0]}

    return run


def compare(ours_out: Tensors, ref: Tensors) -> dict[str, float]:
    """Max |adb − ref| over all tensors (in float32), the scale max |ref|, and the share of
    entries that differ (as they are, and with ref rounded to adb's dtype: PEFT returns
    float32 for bf16 inputs, as its float32 weights promote the product)."""
    diff, scale, differ, differ_rounded, total = 0.0, 0.0, 0, 0, 0
    for name, x in ours_out.items():
        y = ref[name]
        d = (x.float() - y.float()).abs_()
        diff = max(diff, float(d.max()))
        scale = max(scale, float(y.abs().max()))
        differ += int(torch.count_nonzero(d))
        differ_rounded += int(torch.count_nonzero(x != y.to(x.dtype)))
        total += d.numel()
    return {
        "max_abs_diff": diff,
        "max_abs_ref": scale,
        "differ_fraction": differ / total,
        "differ_fraction_rounded": differ_rounded / total,
    }


def ties_attribution(
    ours_out: Tensors, ref: Tensors, sources: Sequence[Tensors], density: float
) -> dict[str, float]:
    """Why TIES results differ: entries where some source sits exactly at its trim threshold
    (adb keeps every |x| = τ, PEFT's topk keeps exactly k of them) against the rest."""
    at_tie, other, other_max = 0, 0, 0.0
    for name, x in ours_out.items():
        bad = torch.nonzero((x != ref[name].to(x.dtype)).reshape(-1)).reshape(-1)
        if bad.numel() == 0:
            continue
        tied = torch.zeros(bad.numel(), dtype=torch.bool)
        for s in sources:
            flat = s[name].reshape(-1)
            tau = kth_largest_abs(flat, int(density * flat.numel()))
            tied |= flat[bad].float().abs() == tau
        at_tie += int(tied.sum())
        other += int((~tied).sum())
        if other:
            rest = bad[~tied]
            d = (x.reshape(-1)[rest].float() - ref[name].reshape(-1)[rest].float()).abs()
            other_max = max(other_max, float(d.max()) if d.numel() else 0.0)
    return {"differ_at_threshold_tie": at_tie, "differ_other": other, "other_max_abs": other_max}


def dare_stats(out: Tensors, sources: Sequence[Tensors], density: float) -> dict[str, float]:
    """What DARE must get right whatever its RNG, with S = Σ_t τ_t: the share of nonzero
    outputs (expected 1 − (1 − d)^T), unbiasedness Σ out·S / Σ S² (E = 1) and the energy
    Σ out² / E[Σ out²], E[Σ out²] = Σ S² + (1/d − 1)·Σ_t Σ τ_t² (expected 1)."""
    nonzero, total, cross, ss, out_sq, var = 0, 0, 0.0, 0.0, 0.0, 0.0
    for name, x in out.items():
        taus = [s[name].double() for s in sources]
        total_s = torch.stack(taus).sum(0)
        y = x.double()
        nonzero += int(torch.count_nonzero(x))
        total += x.numel()
        cross += float((y * total_s).sum())
        ss += float(total_s.square().sum())
        out_sq += float(y.square().sum())
        var += sum(float(t.square().sum()) for t in taus)
    return {
        "nonzero_fraction": nonzero / total,
        "expected_nonzero": 1 - (1 - density) ** len(sources),
        "unbiased_ratio": cross / ss,
        "energy_ratio": out_sq / (ss + (1 / density - 1) * var),
    }


def bench_block(sources: Sequence[Tensors], repeat: int) -> dict[str, Any]:
    """Every method on T sources of one dtype, each interleaved with the ceiling (and PEFT)."""
    t = len(sources)
    size = nbytes(sources[0])
    out = {n: torch.zeros_like(x) for n, x in sources[0].items()}
    keep: dict[str, Tensors] = {}
    spare = {n: torch.zeros_like(x) for n, x in sources[0].items()}
    plan: dict[str, tuple[Callable[[], None], Callable[[], None] | None, int]] = {
        # label -> (ours, PEFT or None, bytes touched in units of one adapter); labels in
        # parentheses are diagnostics that split a method's time into its parts
        "(fresh output pages)": (fresh_pages(sources[0], keep), None, 1),
        "average": (ours("average", [], sources, keep), None, t + 1),
        "average (streamed)": (ours("average", [], sources, keep, reuse=True), None, t + 1),
        "(average into out=)": (average_into(sources, spare), None, t + 1),
        "finetune": (ours("finetune", [], sources, keep), None, 2),  # reads only the last
        "task_arithmetic": (
            ours("task_arithmetic", [], sources, keep),
            peft("task_arithmetic", sources, 0.0, keep),
            t + 1,
        ),
        "task_arithmetic (streamed)": (
            ours("task_arithmetic", [], sources, keep, reuse=True),
            peft("task_arithmetic", sources, 0.0, keep),
            t + 1,
        ),
        "ties": (ours("ties", [], sources, keep), None, t + 1),
        "(ties_tensor thresholds)": (ties_thresholds_only(sources, TIES_DENSITY), None, t),
        "ties_tensor": (
            ours("ties", ["trim=tensor", "elect=sum", f"density={TIES_DENSITY}"], sources, keep),
            peft("ties", sources, TIES_DENSITY, keep),
            t + 1,
        ),
        "dare": (
            ours("dare", [f"density={DARE_DENSITY}"], sources, keep),
            peft("dare_linear", sources, DARE_DENSITY, keep),
            t + 1,
        ),
        "dare (streamed)": (
            ours("dare", [f"density={DARE_DENSITY}"], sources, keep, reuse=True),
            peft("dare_linear", sources, DARE_DENSITY, keep),
            t + 1,
        ),
        "(dare masks)": (dare_masks_only(sources, DARE_DENSITY), None, 0),
        "dare_ties": (ours("dare_ties", [], sources, keep), None, t + 1),
        "magmax": (ours("magmax", [], sources, keep), None, t + 1),
        "tall": (ours("tall", [], sources, keep), None, t + 1),
        "emr": (ours("emr", [], sources, keep), None, t + 1),
        "unifier": (unifier(sources), None, t + 1),
    }
    ceiling(sources, out)()  # touch the output pages once
    res: dict[str, Any] = {"adapter_bytes": size, "loadavg_start": list(os.getloadavg())}
    for label, (mine, theirs, units) in plan.items():
        started = time.perf_counter()
        fns = {"ceiling": ceiling(sources, out), "ours": mine}
        if theirs is not None:
            fns["peft"] = theirs
        timings = interleaved(fns, repeat)
        ceil_gbps = 3 * size / timings["ceiling"].median / 1e9
        ours_gbps = units * size / timings["ours"].median / 1e9
        row: dict[str, Any] = {
            **{k: v.to_json() for k, v in timings.items()},
            "ceiling_gbps": ceil_gbps,
            "ours_gbps": ours_gbps,
            "fraction_of_ceiling": ours_gbps / ceil_gbps,
        }
        if theirs is not None:
            row["speedup_vs_peft"] = timings["peft"].median / timings["ours"].median
        if theirs is not None and keep["ours"]:  # a streamed merge keeps no result to compare
            if label == "dare":
                row["ours_stats"] = dare_stats(keep["ours"], sources, DARE_DENSITY)
                row["peft_stats"] = dare_stats(keep["peft"], sources, DARE_DENSITY)
            else:
                row["diff"] = compare(keep["ours"], keep["peft"])
                if label == "ties_tensor":
                    row["diff"] |= ties_attribution(
                        keep["ours"], keep["peft"], sources, TIES_DENSITY
                    )
        keep.clear()
        res[label] = row
        took = time.perf_counter() - started
        extra = f", {row['speedup_vs_peft']:.1f}x PEFT" if theirs is not None else ""
        print(
            f"  {label:24s} {timings['ours'].median:8.3f} s  {ours_gbps:6.2f} GB/s = "
            f"{row['fraction_of_ceiling']:.0%} of {ceil_gbps:.2f}{extra}  ({took:.0f} s)",
            flush=True,
        )
    res["loadavg_end"] = list(os.getloadavg())
    return res


# -- product space -----------------------------------------------------------------------------


def product_average(sources: Sequence[Tensors], keep: dict[str, Tensors]) -> Callable[[], None]:
    """adb's product-space average of the sources, refactored to rank 32 (the whole workflow)."""
    from adapterdb.trainers.merge import Source, merge

    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    inputs = [
        Source(
            f"s{i}",
            s,
            gemma_like_config(),
            {n: (codes[t.dtype], tuple(t.shape)) for n, t in s.items()},
        )
        for i, s in enumerate(sources)
    ]
    params = registry.parse_params("average", [])

    def run() -> None:
        keep["ours"] = dict(merge("average", params, inputs, "product", RANK).tensors)

    return run


def refactor_only(sources: Sequence[Tensors], seconds: dict[str, float]) -> Callable[[], None]:
    """`lowrank.refactor` alone on every module, accumulating seconds per module kind."""
    from adapterdb.lowrank import refactor

    modules = [n[: -len(".lora_A.weight")] for n in sources[0] if n.endswith(".lora_A.weight")]

    def run() -> None:
        for module in modules:
            terms = [
                (s[f"{module}.lora_A.weight"], s[f"{module}.lora_B.weight"], 1 / len(sources))
                for s in sources
            ]
            start = time.perf_counter()
            refactor(terms, RANK, module)
            kind = module.rsplit(".", 1)[1]
            seconds[kind] = seconds.get(kind, 0.0) + time.perf_counter() - start

    return run


def peft_svd_layer(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> Callable[[], Any]:
    """PEFT's own `combination_type="svd"` helper on a PEFT LoRA layer holding the sources:
    ΔW_t = B_t A_t s, task_arithmetic with weights 1/T, dense SVD, truncate. Thin SVD
    (`svd_full_matrices=False`): PEFT's default full SVD is slower still."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear
    from peft.tuners.lora.model import LoraModel

    out_f, in_f = b[0].shape[0], a[0].shape[1]
    config = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0)
    layer = Linear(
        torch.nn.Linear(in_f, out_f, bias=False), "s0", config=config, r=RANK, lora_alpha=RANK
    )
    names = [f"s{i}" for i in range(len(a))]
    for name in names[1:]:
        layer.update_layer(name, r=RANK, lora_alpha=RANK, config=config)
    with torch.no_grad():
        for name, a_t, b_t in zip(names, a, b, strict=True):
            layer.lora_A[name].weight.copy_(a_t)
            layer.lora_B[name].weight.copy_(b_t)
    target_a, target_b = torch.empty_like(a[0]), torch.empty_like(b[0])
    weights = [1 / len(a)] * len(a)

    @torch.no_grad()
    def run() -> Any:
        return LoraModel._svd_generalized_task_arithmetic_weighted_adapter(
            None,
            "svd",
            names,
            weights,
            RANK,
            layer,
            target_a,
            target_b,
            None,
            None,
            full_matrices=False,
        )

    return run


def bench_product(sources: Sequence[Tensors], s: Settings) -> dict[str, Any]:
    """Whole-adapter product-space average (adb) vs PEFT's dense SVD, one module per shape."""
    keep: dict[str, Tensors] = {}
    seconds: dict[str, float] = {}
    timings = interleaved(
        {"workflow": product_average(sources, keep), "refactor": refactor_only(sources, seconds)},
        s.repeat,
    )
    ours_out = keep["ours"]
    per_kind = {k: v / s.repeat for k, v in seconds.items()}  # mean per full pass
    # one module of each shape in layer 0; the dense 16384x2048 (gate/up) and 2048x16384
    # (down) SVDs cost the same, so down_proj stands for all three
    shapes = {"q_proj": "2048x2048", "k_proj": "256x2048", "down_proj": "2048x16384"}
    dense: dict[str, Any] = {}
    for module, shape in shapes.items():
        prefix = f"base_model.model.model.layers.0.{MODULES[module][0]}.{module}"
        a = [src[f"{prefix}.lora_A.weight"] for src in sources]
        b = [src[f"{prefix}.lora_B.weight"] for src in sources]
        reps = s.big_svd_repeat if module == "down_proj" else s.svd_repeat
        if reps == 0:
            continue
        result: dict[str, Any] = {}

        def call(fn: Callable[[], Any] = peft_svd_layer(a, b), into: dict = result) -> None:
            into["factors"] = fn()

        timing = time_call(call, repeat=reps)
        pa, pb = result["factors"]
        oa = ours_out[f"{prefix}.lora_A.weight"].float()
        ob = ours_out[f"{prefix}.lora_B.weight"].float()
        dw = sum(bt @ at for at, bt in zip(a, b, strict=True)) / len(a)
        dense[module] = {
            "shape": shape,
            "seconds": timing.to_json(),
            "rel_diff_vs_ours": float(torch.linalg.norm(pb @ pa - ob @ oa) / torch.linalg.norm(dw)),
            "peft_rel_error": float(torch.linalg.norm(dw - pb @ pa) / torch.linalg.norm(dw)),
            "ours_rel_error": float(torch.linalg.norm(dw - ob @ oa) / torch.linalg.norm(dw)),
        }
        print(f"  PEFT svd {shape}: {timing.median:.2f} s", flush=True)
    t_sq, t_kv = dense["q_proj"]["seconds"]["median"], dense["k_proj"]["seconds"]["median"]
    if "down_proj" in dense:
        t_big, big_note = dense["down_proj"]["seconds"]["median"], "measured"
    else:  # --quick: a thin SVD's cost grows ~linearly in the long side
        t_big, big_note = 8 * t_sq, "estimated as 8x the 2048x2048 SVD"
    per_layer = 2 * t_sq + 2 * t_kv + 3 * t_big  # q,o + k,v + gate,up,down
    return {
        "layers": s.layers,
        "workflow": timings["workflow"].to_json(),
        "refactor": timings["refactor"].to_json(),
        "refactor_seconds_by_module": per_kind,
        "peft_dense": dense,
        "peft_big_module": big_note,
        "peft_per_layer_s": per_layer,
        "peft_estimate_s": per_layer * s.layers,
    }


# -- PAM alignment -----------------------------------------------------------------------------


def perturbed(tensors: Mapping[str, torch.Tensor], seed: int) -> Tensors:
    """Each tensor plus Gaussian noise of its own std (some signs flip, as in training)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        std = float(t.float().std()) or 1e-3
        out[name] = t + std * torch.randn(t.shape, generator=gen, dtype=t.dtype)
    return out


def check_cost(glob: Mapping[str, torch.Tensor], repeat: int) -> dict[str, Any]:
    """One PAM check (`align_adapter_`, thresholds precomputed) on an expert near `glob`."""
    start = time.perf_counter()
    thresholds = alignment_thresholds(glob, ALIGN_P)
    threshold_s = time.perf_counter() - start
    noisy = perturbed(glob, 1)
    expert = {n: torch.nn.Parameter(t.clone()) for n, t in noisy.items()}
    report: dict[str, Any] = {}

    def reset() -> None:
        with torch.no_grad():
            for n, p in expert.items():
                p.copy_(noisy[n])

    def check() -> None:
        report["r"] = align_adapter_(expert, glob, thresholds)

    timing = time_call(check, repeat=repeat, setup=reset, warmup=1)
    return {
        "parameters": sum(t.numel() for t in glob.values()),
        "tensors": len(glob),
        "seconds": timing.to_json(),
        "thresholds_seconds": threshold_s,
        "reset_fraction": report["r"].reset_fraction,
    }


def demo_step(s: Settings) -> tuple[Timing, Tensors, dict[str, Any]]:
    """One LoRA training step of the demo model (first task of split-fashion-mnist.yaml):
    collate + forward + loss + backward + AdamW, on the runtime `adb train` builds."""
    from adapterdb.trainers import runtime
    from adapterdb.trainers.config import load_sequence
    from adapterdb.trainers.loop import step_loss

    task = load_sequence(SEQUENCE).tasks[0]
    rt = runtime.build(task)
    params = [p for p in rt.peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=task.optim.lr, weight_decay=task.optim.weight_decay)
    batches = runtime.iter_forever(
        runtime.batches(rt, rt.data.train, task.optim.batch_size, shuffle=True)
    )
    rt.loaded.train(True)

    def step() -> None:
        loss = step_loss(rt, next(batches), task.optim.label_smoothing)
        loss.backward()
        opt.step()
        opt.zero_grad()

    timing = time_call(step, repeat=s.train_steps, warmup=s.train_warmup)
    settings = {
        "model": task.model.packaged,
        "image_size": task.data.image_size,
        "batch_size": task.optim.batch_size,
        "r": task.lora.r,
        "lora_parameters": sum(p.numel() for p in params),
    }
    return timing, perturbed(runtime.get_lora(rt), 2), settings


def bench_alignment(glob39: Tensors, s: Settings) -> dict[str, Any]:
    step, demo_lora, settings = demo_step(s)
    print(f"  demo training step: {step.median * 1e3:.1f} ms", flush=True)
    big = check_cost(glob39, s.align_repeat)
    print(f"  check 39M: {big['seconds']['median'] * 1e3:.1f} ms", flush=True)
    small = check_cost(demo_lora, s.demo_align_repeat)
    print(f"  check demo LoRA: {small['seconds']['median'] * 1e3:.2f} ms", flush=True)
    return {"demo": settings, "step": step.to_json(), "check_39m": big, "check_demo": small}


# -- ConDU streaming vs in memory (subprocesses) -----------------------------------------------


class SafetensorsReader:
    """One tensor at a time from a .safetensors file with pread: no mmap, so the process's
    RSS holds only what was read (mapped file pages would count toward it)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        size = int.from_bytes(os.pread(self.fd, 8, 0), "little")
        header = json.loads(os.pread(self.fd, size, 8))
        header.pop("__metadata__", None)
        self.header, self.base = header, 8 + size

    @property
    def names(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        if os.preadv(self.fd, [buf], self.base + start) != len(buf):
            raise OSError(f"short read of {name}")
        return torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def condu_child(mode: str, folder: Path, repeat: int) -> dict[str, Any]:
    """Unify the adapters in `folder` `repeat` times; report times and peak RSS (this process)."""
    readers = [SafetensorsReader(p) for p in sorted(folder.glob("*.safetensors"))]
    names = readers[0].names
    baseline = max_rss_mib()
    load_s = 0.0
    if mode == "in-memory":
        start = time.perf_counter()
        held = [{n: r.get(n) for n in names} for r in readers]
        load_s = time.perf_counter() - start

        def source(name: str) -> list[torch.Tensor]:
            return [h[name] for h in held]
    else:

        def source(name: str) -> list[torch.Tensor]:
            return [r.get(name) for r in readers]

    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        u = Unifier(len(readers))
        for name in names:
            u.unify_tensor(name, source(name))  # outputs dropped: a real run writes them out
        u.scales()
        samples.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "load_seconds": load_s,
        "unify_seconds": Timing(tuple(samples)).to_json(),
        "baseline_rss_mib": baseline,
        "peak_rss_mib": max_rss_mib(),
        "vm_hwm_mib": hwm_mib(),
    }


def bench_condu_memory(
    sources: Sequence[Tensors], repeat: int, threads: int, default_malloc: bool
) -> dict[str, Any]:
    from safetensors.torch import save_file

    out: dict[str, Any] = {"adapter_bytes": nbytes(sources[0]), "tasks": len(sources)}
    with tempfile.TemporaryDirectory(prefix="adb-merge-bench-") as tmp:
        for i, src in enumerate(sources):
            save_file(src, str(Path(tmp) / f"task{i:02d}.safetensors"))
        os.sync()  # no write-back competing with the children on this 2-core box
        for mode in ("streaming", "in-memory"):
            argv = [sys.executable, "-c", LAUNCHER, sys.executable, __file__]
            argv += ["--condu-child", mode, "--dir", tmp]
            argv += ["--repeat", str(repeat), "--threads", str(threads)]
            argv += ["--default-malloc"] if default_malloc else []
            out[mode] = json.loads(run_command(argv).stdout.strip().splitlines()[-1])
            r = out[mode]
            print(
                f"  {mode}: unify {r['unify_seconds']['median']:.2f} s (+ load "
                f"{r['load_seconds']:.2f} s), peak RSS {r['peak_rss_mib']:.0f} MiB "
                f"(baseline {r['baseline_rss_mib']:.0f})",
                flush=True,
            )
    return out


# -- report ------------------------------------------------------------------------------------


def checks(blocks: Mapping[str, Any], product: Any, align: Any, condu: Any) -> list[Check]:
    rows: list[Check] = []
    for key, block in blocks.items():
        t = int(key.split("_T")[1])
        for label in (
            "average",
            "average (streamed)",
            "(average into out=)",
            "ties",
            "emr",
            "unifier",
        ):
            r = block[label]
            rows.append(
                AtLeast(
                    f"{key} {label}: GB/s vs add ceiling",
                    r["ours_gbps"],
                    r["ceiling_gbps"],
                    CEILING_FRACTION.get((label, t)),
                    "GB/s",
                )
            )
        for label, kind in (
            ("task_arithmetic", "task_arithmetic"),
            ("task_arithmetic (streamed)", None),
            ("ties_tensor", "ties"),
            ("dare", "dare"),
            ("dare (streamed)", None),
        ):
            r = block[label]
            rows.append(
                Check(
                    f"{key} {label}: adb / PEFT time",
                    r["ours"]["median"],
                    r["peft"]["median"],
                    1 / PEFT_SPEEDUP[kind] if kind else None,
                )
            )
    rows.append(
        Check(
            f"product avg 2 x {product['layers']} layers: adb / 5 s budget",
            product["workflow"]["median"],
            PRODUCT_LIMIT_S,
            1.0,
        )
    )
    rows.append(
        Check(
            "product avg: adb / PEFT dense SVD (est.)",
            product["workflow"]["median"],
            product["peft_estimate_s"],
            None,
        )
    )
    step = align["step"]["median"]
    for key in ("check_39m", "check_demo"):
        c = align[key]["seconds"]["median"]
        label = f"{align[key]['parameters'] / 1e6:.2f}M params"
        rows.append(Check(f"align check {label} / 1 demo step", c, step, None))
        rows.append(
            Check(
                f"align {label} at s={ALIGN_EVERY} / 100 steps", c, ALIGN_EVERY * step, ALIGN_LIMIT
            )
        )
    streaming, memory = condu["streaming"], condu["in-memory"]
    rows.append(
        Check(
            "ConDU unify 10: peak RSS streaming / in-memory",
            streaming["peak_rss_mib"],
            memory["peak_rss_mib"],
            None,
            "MiB",
        )
    )
    rows.append(
        Check(
            "ConDU unify 10: time streaming / in-memory (load+unify)",
            streaming["unify_seconds"]["median"],
            memory["unify_seconds"]["median"] + memory["load_seconds"],
            None,
        )
    )
    return rows


def method_rows(blocks: Mapping[str, Any]) -> list[list[str]]:
    """Per block and method: time, GB/s, fraction of the ceiling, speed-up over PEFT."""
    rows = []
    for key, block in blocks.items():
        for label, r in block.items():
            if not isinstance(r, dict) or "ours" not in r:
                continue
            vs = r.get("speedup_vs_peft")
            moved = r["ours_gbps"] > 0  # (dare masks) touches no tensor bytes
            rows.append(
                [
                    key,
                    label,
                    f"{fmt(r['ours']['median'])} s",
                    f"{r['ours_gbps']:.2f}" if moved else "-",
                    f"{r['fraction_of_ceiling']:.0%}" if moved else "-",
                    f"{r['ceiling_gbps']:.2f}",
                    "-" if vs is None else f"{fmt(r['peft']['median'])} s",
                    "-" if vs is None else f"{vs:.1f}x",
                ]
            )
    return rows


METHOD_HEADERS = [
    "block",
    "method",
    "adb",
    "GB/s",
    "of ceiling",
    "ceiling GB/s",
    "PEFT",
    "speed-up",
]


def agreement_lines(blocks: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, block in blocks.items():
        for label in ("task_arithmetic", "ties_tensor"):
            d = block[label]["diff"]
            line = (
                f"{key} {label}: max |adb - PEFT| = {d['max_abs_diff']:.3g} (max |PEFT| "
                f"{d['max_abs_ref']:.3g}); entries differing {d['differ_fraction']:.2e}, "
                f"{d['differ_fraction_rounded']:.2e} after rounding PEFT to adb's dtype"
            )
            if "differ_at_threshold_tie" in d:
                line += (
                    f"; of those, {d['differ_at_threshold_tie']} at a tie with the trim "
                    f"threshold, {d['differ_other']} other (max {d['other_max_abs']:.3g})"
                )
            lines.append(line)
        o, p = block["dare"]["ours_stats"], block["dare"]["peft_stats"]
        lines.append(
            f"{key} dare: nonzero {o['nonzero_fraction']:.5f} adb / {p['nonzero_fraction']:.5f} "
            f"PEFT (expected {o['expected_nonzero']:.5f}); unbiasedness {o['unbiased_ratio']:.4f}"
            f" / {p['unbiased_ratio']:.4f}, energy {o['energy_ratio']:.4f} / "
            f"{p['energy_ratio']:.4f} (both expected 1)"
        )
    return lines


def product_lines(product: Mapping[str, Any]) -> list[str]:
    by = ", ".join(f"{k} {v:.2f} s" for k, v in product["refactor_seconds_by_module"].items())
    lines = [
        f"product average, {product['layers']} layers: workflow "
        f"{product['workflow']['median']:.2f} s, lowrank.refactor alone "
        f"{product['refactor']['median']:.2f} s ({by})",
        f"PEFT dense svd per layer {product['peft_per_layer_s']:.1f} s (big module "
        f"{product['peft_big_module']}) x {product['layers']} = {product['peft_estimate_s']:.0f} s",
    ]
    for module, d in product["peft_dense"].items():
        lines.append(
            f"  {module} {d['shape']}: PEFT {d['seconds']['median']:.2f} s; "
            f"|ΔW_adb − ΔW_PEFT|/|ΔW| = {d['rel_diff_vs_ours']:.2e}; rank-32 error adb "
            f"{d['ours_rel_error']:.4f} / PEFT {d['peft_rel_error']:.4f}"
        )
    return lines


def align_lines(align: Mapping[str, Any]) -> list[str]:
    step = align["step"]["median"]
    d = align["demo"]
    lines = [
        f"demo step ({d['model']}, {d['image_size']} px, batch {d['batch_size']}, r={d['r']}, "
        f"{d['lora_parameters']} LoRA params): {step * 1e3:.1f} ms"
    ]
    for key in ("check_39m", "check_demo"):
        c = align[key]
        sec = c["seconds"]["median"]
        lines.append(
            f"check {c['parameters']} params / {c['tensors']} tensors: {sec * 1e3:.2f} ms "
            f"= {sec / step:.1%} of a step -> {sec / (ALIGN_EVERY * step):.3%} at s={ALIGN_EVERY}"
            f" (thresholds once per task: {c['thresholds_seconds'] * 1e3:.1f} ms; reset "
            f"{c['reset_fraction']:.1%})"
        )
    return lines


def condu_lines(condu: Mapping[str, Any]) -> list[str]:
    mib = condu["adapter_bytes"] / 2**20
    lines = [f"ConDU unify of {condu['tasks']} fp32 adapters ({mib:.0f} MiB each):"]
    for mode in ("streaming", "in-memory"):
        r = condu[mode]
        lines.append(
            f"  {mode}: unify {r['unify_seconds']['median']:.2f} s + load "
            f"{r['load_seconds']:.2f} s; peak RSS {r['peak_rss_mib']:.0f} MiB, "
            f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f} MiB above the "
            f"{r['baseline_rss_mib']:.0f} MiB after imports (VmHWM {r['vm_hwm_mib']:.0f} MiB)"
        )
    return lines


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = kernel_parser(__doc__)
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default memory policy (adb keeps freed memory: adapterdb.memory)",
    )
    parser.add_argument("--condu-child", choices=("streaming", "in-memory"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(
    s: Settings, threads: int, default_malloc: bool
) -> tuple[dict, dict, dict, dict, dict[str, float]]:
    phases: dict[str, float] = {}
    start = time.perf_counter()
    fp32 = make_sources(10, s.layers)
    phases["generate"] = time.perf_counter() - start
    blocks: dict[str, Any] = {}
    for tag, dtype in DTYPES.items():
        srcs = fp32 if dtype == torch.float32 else cast(fp32, dtype)
        for t in (2, 10):
            key = f"{tag}_T{t}"
            print(f"{key}:", flush=True)
            start = time.perf_counter()
            blocks[key] = bench_block(srcs[:t], s.repeat)
            phases[key] = time.perf_counter() - start
        del srcs
    print("product space:", flush=True)
    start = time.perf_counter()
    product = bench_product(fp32[:2], s)
    phases["product"] = time.perf_counter() - start
    print("alignment:", flush=True)
    start = time.perf_counter()
    align = bench_alignment(fp32[0], s)
    phases["alignment"] = time.perf_counter() - start
    print("ConDU streaming vs in-memory:", flush=True)
    start = time.perf_counter()
    condu = bench_condu_memory(fp32, s.repeat, threads, default_malloc)
    phases["condu_memory"] = time.perf_counter() - start
    return blocks, product, align, condu, phases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = not args.default_malloc and keep_freed_memory()  # what `adb` does at start-up
    if args.condu_child:
        print(json.dumps(condu_child(args.condu_child, args.dir, args.repeat)))
        return 0
    from adapterdb.cli.app import quiet_libraries

    quiet_libraries()
    s = QUICK if args.quick else FULL
    info = machine_info()
    print(describe_machine(info))
    print(
        f"torch threads: {torch.get_num_threads()}; freed memory kept: {kept}; "
        f"load average at start: {info['loadavg_start']}"
    )
    began = time.perf_counter()
    blocks, product, align, condu, phases = measure(s, args.threads, args.default_malloc)
    rows = checks(blocks, product, align, condu)
    load_end = list(os.getloadavg())
    elapsed = time.perf_counter() - began
    md = args.markdown
    print()
    print(format_table(METHOD_HEADERS, method_rows(blocks), md))
    print()
    print(format_table(CHECK_HEADERS, [r.row() for r in rows], md))
    print()
    for line in [
        *agreement_lines(blocks),
        *product_lines(product),
        *align_lines(align),
        *condu_lines(condu),
    ]:
        print(line)
    print(f"\nload average at start: {info['loadavg_start']}, at end: {load_end}")
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
    print(f"wall time after imports: {elapsed:.0f} s ({parts})")
    doc = {
        "command": " ".join(["python", "bench/merge_bench.py", *(argv or sys.argv[1:])]),
        "machine": {
            **info,
            "loadavg_end": load_end,
            "torch_threads": torch.get_num_threads(),
            "peft": metadata.version("peft"),
            "freed_memory_kept": kept,
        },
        "quick": args.quick,
        "settings": asdict(s),
        "densities": {"ties_vs_peft": TIES_DENSITY, "dare": DARE_DENSITY},
        "wall_seconds": elapsed,
        "phase_seconds": phases,
        "blocks": blocks,
        "product": product,
        "alignment": align,
        "condu_memory": condu,
        "checks": [r.to_json() for r in rows],
    }
    name = (
        "merge_bench"
        + ("_quick" if args.quick else "")
        + ("_malloc" if args.default_malloc else "")
    )
    print(f"wrote {write_json(name, doc)}")
    return 0 if all(r.passed is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
