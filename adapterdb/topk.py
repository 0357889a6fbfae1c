"""Exact magnitude thresholds (k-th largest |x|) in O(n), streamed over many tensors.

Merging methods (TIES, PAM alignment, ConDU) keep "the top p% of weights by magnitude" of a
whole adapter. Sorting or `torch.kthvalue` over ~40M values is O(n log n) and needs the whole
model in one tensor. Instead we radix-select on the bit patterns: with the sign bit cleared,
IEEE floats of one format order exactly like their bits read as integers.

- float32 (and anything else, converted to float32): pass 1 histograms the high 16 bits of
  every |x| (tensor by tensor, accumulated) and finds the bucket holding the k-th largest;
  pass 2 histograms the low 16 bits of only the elements in that bucket, which pins the exact
  bit pattern (a bucket of at most 2^16 elements, the usual case, is searched directly).
  The 16-bit halves are zero-copy int16 views, so each pass is ~2 cheap ops.
- bf16 / fp16 (all tensors of the same dtype): the 15 magnitude bits are the whole key, so a
  single histogram pass is already exact.
- One CPU tensor (TIES' per-tensor trim, per-tensor alignment) needs no streaming: NumPy's
  vectorised partition of its bit patterns (as int32) selects it faster than the radix passes.

The result is a value that occurs among the |x| (exact in float32; for float64 inputs it is
the float32 rounding, since they are selected in float32). NaN sorts above +inf; callers are
expected to pass finite tensors.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterable
from fractions import Fraction

import numpy as np
import torch

Tensors = torch.Tensor | Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]

_BUCKETS_HI = 1 << 15  # magnitude values of a 16-bit word with the sign bit cleared
_BUCKETS_LO = 1 << 16
_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # which int16 of a float32 holds the exponent
_NARROW = (torch.bfloat16, torch.float16)
_FEW = 1 << 16  # up to this many elements in the k-th's bucket, pass 2 selects among them


def magnitude_threshold(tensors: Tensors, fraction: float | Fraction) -> float:
    """τ = the k-th largest |x| over all elements of all tensors, k = ceil(fraction · n).

    `tensors` is one tensor, a re-iterable collection (list, tuple, dict.values()), or a
    zero-arg callable returning a fresh iterator (use that to stream tensors loaded lazily;
    it is called up to three times: count, then two passes). A one-shot iterator is
    materialised into a list of references.
    Keeping `|x| >= τ` keeps at least k elements: ties at τ are all kept.
    fraction <= 0 (or no elements) -> +inf, nothing kept; fraction >= 1 -> the smallest |x|,
    everything kept. The fraction is read as its shortest decimal repr (0.07 · 100 = 7, not 8).
    """
    source = _reiterable(tensors)
    dtypes, n = set(), 0
    for t in source():
        dtypes.add(t.dtype)
        n += t.numel()
    k = _count(fraction, n)
    if k == 0:
        return math.inf
    if isinstance(tensors, torch.Tensor):
        return kth_largest_abs(tensors, k)
    narrow = dtypes.pop() if len(dtypes) == 1 and dtypes <= set(_NARROW) else None
    return _radix_select(lambda: (_halves(t, narrow) for t in source()), k, narrow)


def kth_largest_abs(t: torch.Tensor, k: int) -> float:
    """The k-th largest |x| of one tensor (1 <= k <= t.numel()), exact."""
    if not 1 <= k <= t.numel():
        raise ValueError(f"k={k} out of range for a tensor of {t.numel()} elements")
    if t.device.type == "cpu":
        return _partition_select(t, k)
    narrow = t.dtype if t.dtype in _NARROW else None
    halves = [_halves(t, narrow)]
    return _radix_select(lambda: halves, k, narrow)


def _partition_select(t: torch.Tensor, k: int) -> float:
    """One CPU tensor: numpy's introselect on the magnitude bits read as integers (they order
    like the floats), in place on the one copy that clears the sign bits. NumPy vectorises
    32-bit partitions (~1 ns an element here, 3-4x the two radix passes of bincount +
    compaction) but not 16-bit ones, so bf16/fp16 bit patterns are widened to int32 (cheaper
    than widening the floats) and anything else is selected as float32."""
    flat = t.detach().reshape(-1)
    narrow = flat.dtype in _NARROW
    if narrow:
        bits = flat.view(torch.int16).numpy().astype(np.int32)
        bits &= np.int32(0x7FFF)
    else:
        bits = flat.to(torch.float32).view(torch.int32).numpy() & np.int32(0x7FFFFFFF)
    m = bits.size - k
    bits.partition(m)
    word = torch.from_numpy(bits[m : m + 1].astype(np.int16) if narrow else bits[m : m + 1])
    return word.view(flat.dtype if narrow else torch.float32).item()


def _reiterable(tensors: Tensors) -> Callable[[], Iterable[torch.Tensor]]:
    if isinstance(tensors, torch.Tensor):
        return lambda: (tensors,)
    if callable(tensors):
        return tensors
    if iter(tensors) is tensors:  # a one-shot iterator: keep references, not copies
        tensors = list(tensors)
    return lambda: tensors


def _count(fraction: float | Fraction, n: int) -> int:
    """ceil(fraction · n) clamped to [0, n], exact in rationals."""
    exact = fraction if isinstance(fraction, Fraction) else _decimal(float(fraction))
    return min(max(-(-exact.numerator * n // exact.denominator), 0), n)


@functools.lru_cache(maxsize=256)
def _decimal(fraction: float) -> Fraction:
    """The float as the decimal it prints as; cached: per-tensor trims ask for it per tensor."""
    return Fraction(repr(fraction))


def _radix_select(
    halves: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    k: int,
    narrow: torch.dtype | None,
) -> float:
    """The k-th largest |x|, 1 <= k <= n, over the elements `halves()` yields as `_halves`
    pairs (a fresh iterator per pass); one pass if `narrow`, else two."""
    hist = _histogram((key for key, _ in halves()), _BUCKETS_HI)
    high, k = _locate(hist, k)
    if narrow is not None:
        return float(torch.tensor(high, dtype=torch.int16).view(narrow))
    lows = (low[key == high].to(torch.int32) & 0xFFFF for key, low in halves())
    count = int(hist[high])
    if count <= _FEW:  # select among the bucket's own elements: no 2^16-bin histogram
        low = int(torch.cat(list(lows)).kthvalue(count - k + 1).values)
    else:
        low, _ = _locate(_histogram(lows, _BUCKETS_LO), k)
    return float(torch.tensor((high << 16) | low, dtype=torch.int32).view(torch.float32))


def _histogram(keys: Iterable[torch.Tensor], bins: int) -> torch.Tensor:
    """Summed bincounts, accumulated on the tensors' device; one host copy at the end."""
    total: torch.Tensor | None = None
    for key in keys:
        counts = torch.bincount(key, minlength=bins)
        total = counts if total is None else total + counts
    return total.cpu() if total is not None else torch.zeros(bins, dtype=torch.int64)


def _halves(
    t: torch.Tensor, narrow: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(magnitude bits of the high int16 word, raw low int16 word) per element, flat.

    For a narrow dtype the one 16-bit word is the whole key and the low word is unused.
    """
    flat = t.detach().reshape(-1)
    if narrow is not None:
        return flat.view(torch.int16) & 0x7FFF, flat.view(torch.int16)
    words = flat.to(torch.float32).contiguous().view(torch.int16).view(-1, 2)
    return words[:, _HIGH_HALF] & 0x7FFF, words[:, 1 - _HIGH_HALF]


def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest element, and k's rank among that bucket's elements.

    The k-th largest is the (n−k)-th smallest (from 0): the first bucket whose inclusive
    running count exceeds n−k. One cumsum, no flips: this runs once per tensor per pass."""
    at_most = hist.cumsum(0)  # at_most[b] = count in buckets 0..b
    n = int(at_most[-1])
    bucket = int(torch.searchsorted(at_most, torch.tensor([n - k]), right=True))
    return bucket, k - (n - int(at_most[bucket]))
