"""DARE (Yu et al. 2024, "Language Models are Super Mario"): drop and rescale.

Each entry of τ_t is kept with probability `density` (dropped with p = 1 − density) and kept
entries are rescaled by 1/density, so E[τ̃_t] = τ_t. Then `dare` is task arithmetic
λ·Σ_t w_t τ̃_t (PEFT's `dare_linear`) and `dare_ties` is TIES' elect + disjoint merge of the τ̃_t
(PEFT's `dare_ties`). Default density 0.1 (the paper's drop rate 0.9).

The keep mask of (seed, tensor name, source index) is a fixed function of those three, drawn
from a SFC64 stream seeded by their BLAKE2b hash: merging the tensors in any order, in any
chunking, or only some of them, gives the same masks. NumPy's raw SFC64 stream is
version-stable (NEP 19) and ~10x faster than `torch.bernoulli`; 32 random bits per entry make
the keep probability exact to 2^-32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adapterdb.merging.basic import WeightedParams, map_chunks, source_weights
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


def next_keep(stream: np.random.SFC64, count: int, density: float) -> torch.Tensor:
    """The next `count` keep flags of a stream as float32 0/1: 32 random bits < density·2^32.

    Element i always uses the i-th 32-bit word of the stream, provided every call but the last
    asks for an even count (two words per 64-bit draw). Floats, because multiplying by a bool
    tensor is ~10x slower than by a float one on CPU."""
    words = stream.random_raw((count + 1) // 2).view("<u4")[:count]
    keep = words < np.uint32(min(round(density * 2**32), 2**32 - 1))
    return torch.from_numpy(keep.view(np.uint8).astype(np.float32))


def keep_mask(seed: int, name: str, source: int, shape: torch.Size, density: float) -> torch.Tensor:
    """The whole keep mask (bool) of one source's tensor (the merge draws it chunk by chunk)."""
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool)
    numel = int(torch.Size(shape).numel())
    return next_keep(drop_stream(seed, name, source), numel, density).reshape(shape).bool()


def dare_merge(
    tensors: Sequence[torch.Tensor], p: DareParams, ctx: Context, elect: Elect | None
) -> torch.Tensor:
    """Drop-and-rescale every source, then sum (elect None) or TIES-merge (elect given)."""
    check_tensors(tensors, ctx.name)
    weights = source_weights(p.weights, len(tensors), ctx.name) / p.density
    summed = weights * p.lam  # task arithmetic: λ folds into the weights, one pass fewer
    streams = [drop_stream(p.seed, ctx.name, t) for t in range(len(tensors))]

    def chunk(x: torch.Tensor, _: slice) -> torch.Tensor:  # chunks arrive in order
        if p.density < 1:
            for row, stream in zip(x, streams, strict=True):
                row.mul_(next_keep(stream, row.numel(), p.density))
        if elect is None:
            return summed @ x
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
