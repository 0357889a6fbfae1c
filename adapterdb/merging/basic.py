"""Chunked evaluation shared by all methods, and the linear methods (average, finetune, task
arithmetic).

Multi-pass methods touch each element several times (sum, sign, mask, max, ...). Running those
passes over a whole tensor streams it through memory once per pass; running them over a
(T, c) float32 chunk of the stacked sources keeps the working set (chunk and temporaries) in
cache, so memory is read once. The chunk is also where bf16/fp16 sources become float32.
Chunks of a few MiB keep the per-op Python overhead (~10 ops per chunk) negligible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adapterdb.errors import AdbError, MismatchError
from adapterdb.merging.registry import NO_CONTEXT, Context, Params, check_tensors, register

CHUNK_BYTES = 1 << 22  # float32 scratch per chunk, all sources together (with temporaries: L3)
SPAN = 1 << 18  # float32 accumulator elements of `map_spans` (1 MiB: L2)
ChunkFn = Callable[[torch.Tensor, slice], torch.Tensor]


def chunk_len(sources: int) -> int:
    """Elements per source per chunk: a multiple of 64 (DARE draws its keep flags 2 or 4 to
    a 64-bit word)."""
    return max(64, CHUNK_BYTES // (4 * sources) // 64 * 64)


def map_chunks(
    tensors: Sequence[torch.Tensor], fn: ChunkFn, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Merge elementwise chunk by chunk: `fn(x, span)` gets the sources' flattened elements
    `span` as a (T, c) float32 scratch it may overwrite and returns the (c,) merged chunk,
    which lands in `out` (or a new tensor) in the sources' dtype and shape."""
    flats = [t.reshape(-1) for t in tensors]
    res = out if out is not None else torch.empty(tensors[0].shape, dtype=tensors[0].dtype)
    dst = res.view(-1)
    n, step = dst.numel(), chunk_len(len(flats))
    buf = torch.empty(len(flats), min(step, n))
    for start in range(0, n, step):
        span = slice(start, min(start + step, n))
        x = buf[:, : span.stop - start]
        for row, src in zip(x, flats, strict=True):
            row.copy_(src[span])
        dst[span].copy_(fn(x, span))
    return res


def weight_list(weights: Sequence[float] | None, sources: int, name: str = "") -> list[float]:
    """Per-source weights as Python floats; equal (1.0) when not given. Plain floats: the
    linear methods run once per tensor, where tiny torch ops would cost more than the merge."""
    if weights is None:
        return [1.0] * sources
    if len(weights) != sources:
        raise MismatchError(
            f"weights has {len(weights)} values but tensor {name!r} has {sources} sources; "
            "pass one weight per source"
        )
    return [float(w) for w in weights]


def sum_rows(x: torch.Tensor) -> torch.Tensor:
    """Σ over the T sources of a (T, c) chunk. Two rows are one add, the same single rounding:
    torch's reduction over a leading dimension of 2 takes ~4x as long as that add."""
    return torch.add(x[0], x[1]) if x.shape[0] == 2 else x.sum(0)


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_t w_t·x_t computed in float32, returned in the sources' dtype (into `out` if given).

    Two sources with w_0 + w_1 = 1 (every 2-way average, PAM's merge) are a single lerp, and
    with w_0 = 1 (task arithmetic's default) a single add: one read of each input and one
    write, the memory-bandwidth floor, with the same float32 arithmetic. Otherwise a float32
    accumulator span small enough for L2 takes one in-place multiply-add per source (no
    stacking copies). Pass a preallocated `out` to avoid paying for fresh pages on every
    call. Sources must agree (`check_tensors`).
    """
    w = [float(v) for v in weights]
    if len(tensors) == 2 and abs(w[0] + w[1] - 1.0) < 1e-6:
        return torch.lerp(tensors[0], tensors[1], w[1], out=out)
    if len(tensors) == 2 and w[0] == 1.0:
        return torch.add(tensors[0], tensors[1], alpha=w[1], out=out)
    flats = [t.reshape(-1) for t in tensors]

    def fill(acc: torch.Tensor, span: slice) -> None:
        acc.copy_(flats[0][span]).mul_(w[0])
        for src, weight in zip(flats[1:], w[1:], strict=True):
            acc.add_(src[span], alpha=weight)

    return map_spans(tensors, fill, out)


def map_spans(
    tensors: Sequence[torch.Tensor],
    fill: Callable[[torch.Tensor, slice], None],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum-like merges span by span: `fill(acc, span)` writes the merged elements `span` of
    the flattened sources into `acc`, a float32 span small enough for L2 (the output itself
    when it is float32, else scratch copied into it). Spans are multiples of 64 elements
    (DARE draws its keep flags 2 or 4 to a 64-bit word)."""
    res = out if out is not None else torch.empty(tensors[0].shape, dtype=tensors[0].dtype)
    dst = res.view(-1)
    n, step = dst.numel(), max(64, SPAN // 64 * 64)
    scratch = None if res.dtype == torch.float32 else torch.empty(min(step, n))
    for start in range(0, n, step):
        span = slice(start, min(start + step, n))
        acc = dst[span] if scratch is None else scratch[: span.stop - start]
        fill(acc, span)
        if scratch is not None:
            dst[span].copy_(acc)
    return res


@dataclass(frozen=True)
class AverageParams(Params):
    """weights: per source (default equal), normalised to sum 1. running: continual mean of
    exactly 2 sources (old merged, new) at task `step` t: old·(t−1)/t + new/t."""

    weights: tuple[float, ...] | None = None
    running: bool = False
    step: int = 2

    def validate(self) -> None:
        if self.step < 1:
            raise AdbError(f"step={self.step} must be >= 1 (the index of the task being added)")
        if self.running and self.weights is not None:
            raise AdbError("running=true sets the weights from step; pass one or the other")
        if self.weights is not None and any(w < 0 for w in self.weights):
            raise AdbError(f"weights={list(self.weights)} must be non-negative for an average")


@register("average", params=AverageParams)
def average(
    tensors: Sequence[torch.Tensor], p: AverageParams, ctx: Context = NO_CONTEXT
) -> torch.Tensor:
    """Weighted mean Σ w_t τ_t / Σ w_t; equal weights give PAM's W_G,t = (W_G,t−1 + W′)/2."""
    check_tensors(tensors, ctx.name)
    if p.running and len(tensors) != 2:
        raise MismatchError(
            f"running average of tensor {ctx.name!r} needs 2 sources (old merged, new), "
            f"got {len(tensors)}"
        )
    w = [p.step - 1.0, 1.0] if p.running else weight_list(p.weights, len(tensors), ctx.name)
    total = sum(w)
    if total <= 0:
        raise AdbError(f"weights={w} sum to 0; give at least one source a weight > 0")
    return weighted_sum(tensors, [v / total for v in w], ctx.out)


@dataclass(frozen=True)
class NoParams(Params):
    """A method without parameters."""


@register("finetune", params=NoParams)
def finetune(
    tensors: Sequence[torch.Tensor], p: NoParams, ctx: Context = NO_CONTEXT
) -> torch.Tensor:
    """The last source (sequential fine-tuning: each task overwrites the previous adapter).

    A copy, so that later in-place edits of the result cannot corrupt the source."""
    check_tensors(tensors, ctx.name)
    return tensors[-1].clone() if ctx.out is None else ctx.out.copy_(tensors[-1])


@dataclass(frozen=True)
class WeightedParams(Params):
    """weights: per source (default 1 each); lam (`lambda`): scaling of the merged vector."""

    weights: tuple[float, ...] | None = None
    lam: float = 1.0


@register("task_arithmetic", params=WeightedParams)
def task_arithmetic(
    tensors: Sequence[torch.Tensor], p: WeightedParams, ctx: Context = NO_CONTEXT
) -> torch.Tensor:
    """λ·Σ_t w_t τ_t (Ilharco et al. 2023; PEFT's `task_arithmetic` with λ = 1)."""
    check_tensors(tensors, ctx.name)
    weights = [p.lam * w for w in weight_list(p.weights, len(tensors), ctx.name)]
    return weighted_sum(tensors, weights, ctx.out)
