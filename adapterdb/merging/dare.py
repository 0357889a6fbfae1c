"""DARE (Yu et al. 2024, "Language Models are Super Mario"): drop and rescale.

Each entry of τ_t is kept with probability `density` (dropped with p = 1 − density) and kept
entries are rescaled by 1/density, so E[τ̃_t] = τ_t. Then `dare` is task arithmetic
λ·Σ_t w_t τ̃_t (PEFT's `dare_linear`) and `dare_ties` is TIES' elect + disjoint merge of the τ̃_t
(PEFT's `dare_ties`). Default density 0.1 (the paper's drop rate 0.9).

The keep mask of (seed, tensor name, source index) is a fixed function of those three, drawn
from a SFC64 stream seeded by their BLAKE2b hash: merging the tensors in any order, in any
chunking, or only some of them, gives the same masks. NumPy's raw SFC64 stream is
version-stable (NEP 19) and ~10x faster than `torch.bernoulli`. An entry is kept when its
random word is below density·2^bits, so the keep probability is density rounded to a multiple
of 2^-bits: 16-bit words for density >= 1/128 (within 0.1% of it relatively, 8e-5 at the
default 0.1; the stream is most of DARE's time and 16 bits halve it), 32-bit words below.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adapterdb.merging.basic import (
    WeightedParams,
    map_chunks,
    map_spans,
    weight_list,
    weighted_sum,
)
from adapterdb.merging.registry import NO_CONTEXT, Context, check_tensors, register
from adapterdb.merging.ties import Elect, check_density, disjoint_merge


@dataclass(frozen=True)
class DareParams(WeightedParams):
    """density: keep probability; seed: with the tensor name and source index, fixes masks."""

    density: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        check_density(self.density)


@dataclass(frozen=True)
class DareTiesParams(DareParams):
    """DARE's parameters plus TIES' sign election (see adapterdb.merging.ties)."""

    elect: Elect = "sum"


def drop_stream(seed: int, name: str, source: int) -> np.random.SFC64:
    """The random bit stream behind the keep mask of one (seed, tensor, source)."""
    key = hashlib.blake2b(f"{seed}\0{name}\0{source}".encode(), digest_size=16).digest()
    return np.random.SFC64(int.from_bytes(key, "little"))


def word_bits(density: float) -> int:
    """Random bits per entry: 16 represent any density >= 1/128 within 0.1% (relative)."""
    return 16 if density >= 1 / 128 else 32


def next_keep(
    stream: np.random.SFC64, count: int, density: float, value: float = 1.0
) -> torch.Tensor:
    """The next `count` keep flags of a stream as float32 `value`/0: a random word <
    density·2^bits (`word_bits`).

    Element i always uses the i-th word of the stream, provided every call but the last asks
    for a multiple of 4 (a 64-bit draw holds 64/bits words). Floats, because multiplying by a
    bool tensor is ~10x slower than by a float one on CPU; `value` lets rescaling ride along."""
    bits = word_bits(density)
    per_draw = 64 // bits
    words = stream.random_raw(-(-count // per_draw)).view(f"<u{bits // 8}")[:count]
    keep = words < words.dtype.type(min(round(density * 2**bits), 2**bits - 1))
    return torch.from_numpy(np.multiply(keep.view(np.uint8), np.float32(value), dtype=np.float32))


def keep_mask(seed: int, name: str, source: int, shape: torch.Size, density: float) -> torch.Tensor:
    """The whole keep mask (bool) of one source's tensor (the merge draws it chunk by chunk)."""
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool)
    numel = int(torch.Size(shape).numel())
    return next_keep(drop_stream(seed, name, source), numel, density).reshape(shape).bool()


def dropped_sum(
    tensors: Sequence[torch.Tensor],
    values: Sequence[float],
    streams: Sequence[np.random.SFC64],
    density: float,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Σ_t m_t ⊙ τ_t · value_t in float32, span by span. Each mask arrives holding value_t
    where it keeps, so a source costs one multiply(-add) straight from its own memory: no
    staging copy, no separate rescaling pass."""
    flats = [t.reshape(-1) for t in tensors]

    def fill(acc: torch.Tensor, span: slice) -> None:
        for t, (src, stream, value) in enumerate(zip(flats, streams, values, strict=True)):
            keep = next_keep(stream, acc.numel(), density, value)
            if t == 0:
                torch.mul(src[span], keep, out=acc)
            else:
                acc.addcmul_(src[span], keep)

    return map_spans(tensors, fill, out)


def dare_merge(
    tensors: Sequence[torch.Tensor], p: DareParams, ctx: Context, elect: Elect | None
) -> torch.Tensor:
    """Drop-and-rescale every source, then sum (elect None) or TIES-merge (elect given)."""
    check_tensors(tensors, ctx.name)
    weights = [w / p.density for w in weight_list(p.weights, len(tensors), ctx.name)]
    streams = [drop_stream(p.seed, ctx.name, t) for t in range(len(tensors))]
    if elect is None:  # task arithmetic: λ/density folds into each source's weight
        values = [w * p.lam for w in weights]
        if p.density >= 1:
            return weighted_sum(tensors, values, ctx.out)
        return dropped_sum(tensors, values, streams, p.density, ctx.out)

    def chunk(x: torch.Tensor, _: slice) -> torch.Tensor:  # chunks arrive in order
        if p.density < 1:
            for row, stream in zip(x, streams, strict=True):
                row.mul_(next_keep(stream, row.numel(), p.density))
        return disjoint_merge(x, weights, elect, p.lam)

    return map_chunks(tensors, chunk, ctx.out)


@register("dare", params=DareParams)
def dare(tensors: Sequence[torch.Tensor], p: DareParams, ctx: Context = NO_CONTEXT) -> torch.Tensor:
    """DARE + task arithmetic: λ·Σ_t w_t·(m_t ⊙ τ_t)/density."""
    return dare_merge(tensors, p, ctx, None)


@register("dare_ties", params=DareTiesParams)
def dare_ties(
    tensors: Sequence[torch.Tensor], p: DareTiesParams, ctx: Context = NO_CONTEXT
) -> torch.Tensor:
    """DARE + TIES: elect and disjoint-merge the dropped-and-rescaled sources."""
    return dare_merge(tensors, p, ctx, p.elect)
