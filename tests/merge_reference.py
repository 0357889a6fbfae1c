"""Slow, obviously-right references for the merge methods, and the data the tests feed them.

Every reference loops over elements in Python floats (float64) straight from the definitions
in the method modules' docstrings; the fast kernels must agree with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction

import torch
from hypothesis import strategies as st

from adapterdb.merging import basic

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Vec = list[float]


# ---------------------------------------------------------------- data


def flat(tensors: Sequence[torch.Tensor]) -> list[Vec]:
    """The sources as float64 Python lists (element loops below index these)."""
    return [t.double().reshape(-1).tolist() for t in tensors]


def as_tensor(values: Vec, like: torch.Tensor) -> torch.Tensor:
    """A reference result, float64, shaped like the sources."""
    return torch.tensor(values, dtype=torch.float64).reshape(like.shape)


def make_sources(
    shape: tuple[int, ...], sources: int, dtype: torch.dtype, kind: str, seed: int
) -> list[torch.Tensor]:
    """T random sources. kind: "gauss"; "int" (small integers times a power of two: exact in
    every dtype and in float32 sums, many exact magnitude ties and zeros); "zeros"."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sources):
        if kind == "gauss":
            x = torch.randn(shape, generator=gen)
        elif kind == "int":
            x = torch.randint(-4, 5, shape, generator=gen).float() * 2.0 ** -int(seed % 5)
        else:
            x = torch.zeros(shape)
        out.append(x.to(dtype))
    return out


SHAPES = st.sampled_from(
    [(0,), (1,), (7,), (130,), (3, 5), (4, 33), (2, 3, 3, 3), (6, 2, 1, 1), (3, 4, 3, 3)]
)


@st.composite
def sources(draw: st.DrawFn, min_sources: int = 1, max_sources: int = 6) -> list[torch.Tensor]:
    """Random shapes (1-D, 2-D, 4-D conv LoRA), dtypes, T and data kinds."""
    return make_sources(
        draw(SHAPES),
        draw(st.integers(min_sources, max_sources)),
        draw(st.sampled_from(DTYPES)),
        draw(st.sampled_from(["gauss", "gauss", "int", "zeros"])),
        draw(st.integers(0, 2**16)),
    )


@contextmanager
def chunk_bytes(nbytes: int | None) -> Iterator[None]:
    """Run with smaller chunks and accumulator spans (tiny ones split even small tensors into
    many pieces); None keeps the defaults."""
    old = basic.CHUNK_BYTES, basic.SPAN
    if nbytes is not None:
        basic.CHUNK_BYTES, basic.SPAN = nbytes, max(1, nbytes // 4)
    try:
        yield
    finally:
        basic.CHUNK_BYTES, basic.SPAN = old


CHUNKS = st.sampled_from([None, 256])  # defaults, and 64-element chunks


def assert_matches(fast: torch.Tensor, ref: torch.Tensor, inputs: Sequence[torch.Tensor]) -> None:
    """fast (source dtype) equals the float64 reference up to float32 compute + final rounding.

    Absolute slack scales with the inputs' magnitude times T (float32 sums of T terms);
    relative slack is two units in the last place of the output dtype."""
    assert fast.dtype == inputs[0].dtype and fast.shape == ref.shape
    eps = torch.finfo(fast.dtype).eps
    scale = max((float(t.abs().max()) for t in inputs if t.numel()), default=0.0)
    atol = 8 * torch.finfo(torch.float32).eps * len(inputs) * scale + 1e-30
    torch.testing.assert_close(fast.double(), ref, rtol=2 * eps, atol=atol)


# ---------------------------------------------------------------- linear methods


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    xs = flat(tensors)
    out = [sum(w * x[i] for w, x in zip(weights, xs, strict=True)) for i in range(len(xs[0]))]
    return as_tensor(out, tensors[0])


def average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return weighted_sum(tensors, [w / sum(weights) for w in weights])


# ---------------------------------------------------------------- TIES / DARE


def threshold(values: Vec, density: float) -> float:
    """The k-th largest |x|, k = ceil(density·n) (density read as its decimal repr)."""
    k = math.ceil(Fraction(repr(density)) * len(values))
    return sorted((abs(v) for v in values), reverse=True)[k - 1] if k else math.inf


def trim(x: Vec, tau: float) -> Vec:
    return [v if abs(v) >= tau else 0.0 for v in x]


def sign(v: float) -> float:
    return float((v > 0) - (v < 0))


def elect_merge(xs: list[Vec], weights: Sequence[float], elect: str, lam: float) -> Vec:
    """TIES elect (zero vote -> +1) and disjoint weighted mean."""
    out = []
    for i in range(len(xs[0])):
        column = [x[i] for x in xs]
        vote = sum(map(sign, column)) if elect == "count" else sum(column)
        gamma = 1.0 if vote >= 0 else -1.0
        agree = [t for t, v in enumerate(column) if sign(v) == gamma]
        out.append(lam * sum(weights[t] * column[t] for t in agree) / max(len(agree), 1))
    return out


def ties(
    tensors: Sequence[torch.Tensor],
    density: float,
    weights: Sequence[float],
    lam: float = 1.0,
    elect: str = "sum",
    taus: Sequence[float] | None = None,
) -> torch.Tensor:
    """TIES with per-tensor trim, or with the given per-source thresholds `taus`."""
    xs = flat(tensors)
    taus = taus if taus is not None else [threshold(x, density) for x in xs]
    trimmed = [trim(x, tau) for x, tau in zip(xs, taus, strict=True)]
    return as_tensor(elect_merge(trimmed, weights, elect, lam), tensors[0])


def dare(
    tensors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    density: float,
    weights: Sequence[float],
    lam: float = 1.0,
    elect: str | None = None,
) -> torch.Tensor:
    """DARE with the given keep masks: drop, rescale by 1/density, then sum or TIES-merge."""
    xs = flat(tensors)
    kept = [
        [v / density if k else 0.0 for v, k in zip(x, m.reshape(-1).tolist(), strict=True)]
        for x, m in zip(xs, masks, strict=True)
    ]
    if elect is not None:
        return as_tensor(elect_merge(kept, weights, elect, lam), tensors[0])
    out = [
        lam * sum(w * x[i] for w, x in zip(weights, kept, strict=True)) for i in range(len(xs[0]))
    ]
    return as_tensor(out, tensors[0])


# ---------------------------------------------------------------- MagMax, TALL


def magmax(tensors: Sequence[torch.Tensor], lam: float = 1.0) -> torch.Tensor:
    out = []
    for column in zip(*flat(tensors), strict=True):
        best = column[0]
        for v in column[1:]:
            if abs(v) >= abs(best):  # ties to the later task
                best = v
        out.append(lam * best)
    return as_tensor(out, tensors[0])


def tall_masks(
    tensors: Sequence[torch.Tensor], mask_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_MTL, masks (T, *shape) bool) with |τ_t| >= λ·|Σ_{s≠t} τ_s|."""
    xs = flat(tensors)
    mtl = [sum(column) for column in zip(*xs, strict=True)]
    masks = [[abs(x[i]) >= mask_lambda * abs(mtl[i] - x[i]) for i in range(len(mtl))] for x in xs]
    shape = (len(xs), *tensors[0].shape)
    return as_tensor(mtl, tensors[0]), torch.tensor(masks, dtype=torch.bool).reshape(shape)


def tall(tensors: Sequence[torch.Tensor], mask_lambda: float, k: int, lam: float) -> torch.Tensor:
    mtl, masks = tall_masks(tensors, mask_lambda)
    return lam * mtl * (masks.sum(0) >= k)


# ---------------------------------------------------------------- EMR / ConDU


def emr(
    sources: Sequence[dict[str, torch.Tensor]], scale: str = "tensor"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """A loop transcription of the EMR-Merging reference `emr_merge` (float64, zero sum -> −1),
    with scale="global" summing |.| over all elements instead of per-tensor means."""
    tasks = len(sources)
    num, den = [0.0] * tasks, [0.0] * tasks
    unified, masks = {}, {}
    for name in sources[0]:
        xs = flat([s[name] for s in sources])
        n = len(xs[0])
        per = 1.0 / n if scale == "tensor" and n else 1.0
        uni, mask = [], [[False] * n for _ in range(tasks)]
        for i in range(n):
            gamma = 1.0 if sum(x[i] for x in xs) > 0 else -1.0
            best = 0.0
            for t in range(tasks):
                mask[t][i] = xs[t][i] * gamma > 0
                if mask[t][i]:
                    best = max(best, abs(xs[t][i]))
            uni.append(gamma * best)
        for t in range(tasks):
            num[t] += per * sum(abs(v) for v in xs[t])
            den[t] += per * sum(abs(u) for u, m in zip(uni, mask[t], strict=True) if m)
        like = sources[0][name]
        unified[name] = as_tensor(uni, like)
        masks[name] = torch.tensor(mask, dtype=torch.bool).reshape(tasks, *like.shape)
    scales = [nu / de if de > 0 else 1.0 for nu, de in zip(num, den, strict=True)]
    return unified, masks, scales


def decouple(unified: torch.Tensor, masks: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """λ_t·M_t ⊙ τ_uni, float64 (T, *shape)."""
    u = unified.double()
    return torch.stack([lam * u * m for lam, m in zip(scales, masks, strict=True)])
