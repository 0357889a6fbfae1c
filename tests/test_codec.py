"""Byte-plane and mask codecs: exact round trips and compressed sizes near the entropy bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from adapterdb.storage import codec

SETTINGS = settings(max_examples=40, deadline=None)


def planes_reference(data: bytes, itemsize: int) -> list[bytes]:
    """Plane i = byte i of every element, by a plain Python loop."""
    return [
        bytes(data[e * itemsize + i] for e in range(len(data) // itemsize)) for i in range(itemsize)
    ]


@SETTINGS
@given(
    itemsize=st.sampled_from([1, 2, 4, 8]),
    count=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_join_round_trip(itemsize: int, count: int, seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, count * itemsize, dtype=np.uint8)
    planes = codec.split_planes(data, itemsize)
    assert len(planes) == itemsize
    assert [p.tobytes() for p in planes] == planes_reference(data.tobytes(), itemsize)
    assert codec.join_planes(planes, itemsize).tobytes() == data.tobytes()
    frames = codec.encode_planes(data, itemsize)
    assert codec.decode_planes(frames, itemsize).tobytes() == data.tobytes()


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_empty_planes(itemsize: int) -> None:
    empty = np.empty(0, np.uint8)
    assert codec.decode_planes(codec.encode_planes(empty, itemsize), itemsize).size == 0


def assert_mask_round_trip(mask: np.ndarray) -> tuple[str, int, list[bytes]]:
    encoding, width, frames = codec.encode_mask(mask)
    back = codec.decode_mask(encoding, width, frames, mask.size)
    assert back.dtype == bool and back.shape == (mask.size,)
    assert np.array_equal(back, mask)
    count = int(mask.sum())
    # the documented choice: gaps exactly when 0 < set positions < n/16
    assert (encoding == "gaps") == (0 < count * 16 < mask.size)
    return encoding, width, frames


@SETTINGS
@given(
    n=st.integers(1, 20_000).filter(lambda n: n % 8),
    density=st.sampled_from([0.0, 1e-4, 0.01, 0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_mask_round_trip(n: int, density: float, seed: int) -> None:
    mask = np.random.default_rng(seed).random(n) < density
    assert_mask_round_trip(mask)


@SETTINGS
@given(
    n=st.integers(70_000, 400_000).filter(lambda n: n % 8),
    positions=st.lists(st.integers(0, 399_999), min_size=1, max_size=6, unique=True),
)
@example(n=70_001, positions=[70_000])
@example(n=70_001, positions=[3, 30_000, 60_000])
def test_mask_gaps_wider_than_16_bits(n: int, positions: list[int]) -> None:
    mask = np.zeros(n, dtype=bool)
    mask[[p % n for p in positions]] = True
    mask[n - 1] = True  # the first gap then spans > 65535 positions unless another comes early
    mask[0] = False
    idx = np.flatnonzero(mask)
    widest = int(np.diff(idx, prepend=-1).max())
    encoding, width, _ = assert_mask_round_trip(mask)
    assert encoding == "gaps"
    assert width == (4 if widest >= 1 << 16 else 2)


def test_mask_decode_rejects_gaps_outside_the_mask() -> None:
    mask = np.zeros(1000, dtype=bool)
    mask[[10, 990]] = True
    encoding, width, frames = codec.encode_mask(mask)
    with pytest.raises(ValueError):
        codec.decode_mask(encoding, width, frames, 500)


def entropy_bits(mask: np.ndarray) -> float:
    p = float(mask.mean())
    return mask.size * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def stored_bits(mask: np.ndarray) -> int:
    return 8 * sum(len(f) for f in codec.encode_mask(mask)[2])


def test_half_density_mask_costs_at_most_1_02_bits_per_param() -> None:
    mask = np.random.default_rng(1).random(2_000_000) < 0.5
    assert stored_bits(mask) / mask.size <= 1.02


def test_one_percent_mask_within_1_2x_of_entropy() -> None:
    mask = np.random.default_rng(2).random(2_000_000) < 0.01
    assert stored_bits(mask) <= 1.2 * entropy_bits(mask)


def test_float_planes_compress_below_raw() -> None:
    """The point of the plane split: bf16 weights' exponent plane compresses well."""
    values = np.random.default_rng(3).standard_normal(1 << 16).astype(np.float32) * 0.02
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    stored = sum(len(f) for f in codec.encode_planes(bf16, 2))
    assert stored < 0.85 * bf16.size
