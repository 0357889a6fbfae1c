"""Byte-plane, tensor and mask codecs: exact round trips, sizes near the entropy bound, old
objects still readable, damaged objects always one CorruptObjectError."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import codec_reference
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from adapterdb.errors import CorruptObjectError
from adapterdb.storage import _planes, codec
from adapterdb.storage.objects import ObjectStore
from adapterdb.tensorfile import DTYPES, RawTensor

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


# --- tensor codec 2 (issue 12) -------------------------------------------------------------

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2}
ITEMSIZE |= {"I8": 1, "U8": 1, "BOOL": 1}
FLOAT_SPECIALS = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-40, 1e-310, 3.4e38, -1.0]


def float_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values as the little-endian bytes of `dtype` (bf16 by truncating float32)."""
    if dtype == "F64":
        return values.astype("<f8").view(np.uint8)
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return values.astype("<f2").view(np.uint8)
    f32 = values.astype("<f4")
    if dtype == "F32":
        return f32.view(np.uint8)
    return (f32.view("<u4") >> 16).astype("<u2").view(np.uint8)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    """(dtype, flat bytes): random bytes, LoRA-like floats, special values, few-valued ints."""
    dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
    n = draw(st.one_of(st.integers(0, 9), st.integers(10, 5_000), st.just(70_001)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["bytes", "normal", "uniform", "specials", "few"]))
    size = ITEMSIZE[dtype]
    if kind == "bytes" or (
        kind in ("normal", "uniform", "specials") and dtype[0] != "F" and dtype != "BF16"
    ):
        data = rng.integers(0, 256, n * size, dtype=np.uint8)
    elif kind == "few":  # a handful of distinct elements: every plane low-entropy
        pool = rng.integers(0, 256, (draw(st.integers(1, 40)), size), dtype=np.uint8)
        data = pool[rng.integers(0, len(pool), n)].reshape(-1)
    else:
        scale = 10.0 ** draw(st.integers(-30, 3))
        if kind == "normal":
            values = rng.standard_normal(n) * scale
        elif kind == "uniform":
            values = (rng.random(n) * 2 - 1) * scale
        else:
            values = rng.choice(np.array(FLOAT_SPECIALS), n) * rng.choice([1.0, scale], n)
        data = float_bytes(values, dtype)
    return dtype, np.ascontiguousarray(data, dtype=np.uint8)


def encode_decode(dtype: str, data: np.ndarray) -> tuple[str, list[bytes]]:
    before = data.tobytes()
    planes, frames = codec.encode_tensor(data, dtype, ITEMSIZE[dtype])
    assert data.tobytes() == before  # the input is never modified (ZipNN's compress does)
    stored = [bytes(memoryview(f).cast("B")) for f in frames]
    n = data.size // ITEMSIZE[dtype]
    back = codec.decode_tensor(planes, stored, dtype, ITEMSIZE[dtype], n)
    assert back.dtype == np.uint8 and back.tobytes() == data.tobytes()
    return planes, stored


@settings(max_examples=150, deadline=None)
@given(tensors())
@example(("BF16", np.zeros(0, np.uint8)))
@example(("F32", float_bytes(np.array([np.nan, -0.0, np.inf, 1e-45] * 40), "F32")))
def test_tensor_codec_round_trip(tensor: tuple[str, np.ndarray]) -> None:
    dtype, data = tensor
    planes, stored = encode_decode(dtype, data)
    assert len(planes) == ITEMSIZE[dtype]
    # never larger than raw planes plus a few bytes of frame header per plane
    assert sum(map(len, stored)) <= data.size + 40 * len(planes)


def test_plane_choices_follow_entropy() -> None:
    """Near-random mantissa planes are stored raw, the exponent plane nibble-packed."""
    values = np.random.default_rng(0).standard_normal(200_000) * 1e-3
    assert encode_decode("BF16", float_bytes(values, "BF16"))[0] == "rn"
    assert encode_decode("F32", float_bytes(values, "F32"))[0] == "rrrn"
    noise = np.random.default_rng(1).integers(0, 256, 4 * 50_000, dtype=np.uint8)
    assert encode_decode("F32", noise)[0] == "rrrr"


@pytest.mark.parametrize("distinct", [1, 15, 16, 17, 200, 256])
def test_nibble_escapes(distinct: int) -> None:
    """Bytes outside the 15 most frequent go through the escape list, the sentinel included."""
    rng = np.random.default_rng(distinct)
    common = rng.integers(0, min(distinct, 15), 100_000)
    rare = rng.integers(0, distinct, 100_000)
    plane = np.where(rng.random(100_000) < 0.02, rare, common).astype(np.uint8)
    encode_decode("U8", plane)
    encode_decode("U8", plane[:-1])  # odd length: the last packed byte is half padding


def test_exponent_plane_beats_plain_zstd() -> None:
    """Nibble packing lands within 3% of the order-0 entropy, where zstd alone is ~18% over."""
    values = np.random.default_rng(4).standard_normal(1 << 18) * 1e-3
    planes = codec_reference.split_planes(float_bytes(values, "BF16"), 2)
    exp, _ = codec_reference.rotate_sign(planes[1], planes[0])
    counts = np.bincount(exp, minlength=256)
    p = counts[counts > 0] / exp.size
    entropy_bytes = exp.size * float(-(p * np.log2(p)).sum()) / 8
    letter, frames = codec._encode_plane(exp)
    assert letter == codec.NIBBLE
    assert sum(len(memoryview(f).cast("B")) for f in frames) <= 1.03 * entropy_bytes
    assert sum(len(memoryview(f).cast("B")) for f in frames) < 0.9 * len(codec.compress(exp))


# --- the C kernel against the numpy reference (tests/codec_reference.py) ------------------


@contextmanager
def simd_mode(on: bool) -> Iterator[None]:
    """The SSSE3 nibble decoder on (where the CPU has it) or off, for the block."""
    before = _planes.set_simd(on)
    try:
        yield
    finally:
        _planes.set_simd(before)


@pytest.fixture(params=[True, False], ids=["simd", "scalar"])
def simd(request: pytest.FixtureRequest) -> Iterator[bool]:
    with simd_mode(request.param):
        yield request.param


@settings(max_examples=150, deadline=None)
@given(tensor=tensors(), simd=st.booleans())
@example(tensor=("BF16", np.zeros(0, np.uint8)), simd=True)
def test_kernel_matches_numpy_reference(tensor: tuple[str, np.ndarray], simd: bool) -> None:
    """Same frames as the numpy encoder wrote, same bytes back as the numpy decoder gives."""
    dtype, data = tensor
    size, n = ITEMSIZE[dtype], data.size // ITEMSIZE[dtype]
    letters, frames = codec.encode_tensor(data, dtype, size)
    stored = [bytes(memoryview(f).cast("B")) for f in frames]
    assert (letters, stored) == codec_reference.encode_tensor(data, dtype, size)
    with simd_mode(simd):
        back = codec.decode_tensor(letters, stored, dtype, size, n)
    assert back.tobytes() == codec_reference.decode_tensor(letters, stored, dtype, size, n)
    assert back.tobytes() == data.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    itemsize=st.integers(2, 8),
    count=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_join_rotated_match_reference(itemsize: int, count: int, seed: int) -> None:
    """Sign rotation of the top two planes, for every element size the kernel takes."""
    data = np.random.default_rng(seed).integers(0, 256, count * itemsize, dtype=np.uint8)
    expect = codec_reference.split_planes(data, itemsize)
    expect[-1], expect[-2] = codec_reference.rotate_sign(expect[-1], expect[-2])
    planes = codec._split(data, itemsize, True)
    assert [p.tobytes() for p in planes] == [p.tobytes() for p in expect]
    out = np.empty(data.size, dtype=np.uint8)
    _planes.join(out, count, itemsize, True, planes)
    assert out.tobytes() == data.tobytes()


@pytest.mark.parametrize("n", [1, 31, 32, 33, 63, 64, 8191, 8192, 8193, 16_385, 20_001])
def test_escapes_at_chunk_and_block_edges(simd: bool, n: int) -> None:
    """Escapes on both sides of every 16-byte (32-code) chunk, every 8192-element block and
    the padded last element: the places where the fast paths hand over to the scalar one."""
    plane = np.arange(n, dtype=np.uint8) % 3  # 3 common bytes
    edges = (0, 32, 64, 96, 8160, 8192, 8224, 16_384, n - 33, n - 32, n - 1)
    where = np.array(sorted({e + d for e in edges for d in (-1, 0, 1) if 0 <= e + d < n}))
    plane[where] = 100 + np.arange(where.size, dtype=np.uint8) % 100  # > 15 distinct rare bytes
    top = bytes(range(3)) + bytes(range(200, 212)) + b"\xff"
    packed, side = _planes.nibble_pack(plane, top)
    assert side[16:] == plane[plane >= 100].tobytes()
    frame = codec._cctx("packed").compress(packed)
    expect = codec_reference.nibble_decode(frame, side, n)
    assert expect.tobytes() == plane.tobytes()
    out = np.empty(n, dtype=np.uint8)
    _planes.join(out, n, 1, False, [(packed, side)])
    assert out.tobytes() == plane.tobytes()


def nibble_plane(n: int = 1001) -> tuple[bytes, bytes, np.ndarray]:
    """(packed codes, side, plane) of a plane with a few escapes."""
    plane = (np.arange(n) % 5).astype(np.uint8)
    plane[[0, 500, n - 1]] = [200, 201, 202]
    packed, side = _planes.nibble_pack(plane, bytes(range(16)))
    assert len(side) == 16 + 3
    return packed, side, plane


@pytest.mark.parametrize(
    "case",
    [
        "escape missing",
        "escape extra",
        "side truncated",
        "packed short",
        "packed long",
        "raw short",
        "raw long",
        "plane count",
        "out size",
        "tuple of 3",
        "not a buffer",
        "readonly out",
        "rotated bytes",
        "itemsize 9",
        "negative n",
        "huge n",
    ],
)
def test_join_rejects_what_does_not_fit(simd: bool, case: str) -> None:
    """Every size and the escape count are checked: ValueError or TypeError, never a crash,
    an over-read, or a partly patched plane passed off as decoded."""
    packed, side, plane = nibble_plane()
    n, raw = plane.size, plane.tobytes()
    out = np.empty(2 * n, dtype=np.uint8)
    args: tuple[Any, ...] = (out, n, 2, False, [raw, (packed, side)])
    _planes.join(*args)  # the well-formed call decodes
    assert out[1::2].tobytes() == raw
    bad = {
        "escape missing": (out, n, 2, False, [raw, (packed, side[:-1])]),
        "escape extra": (out, n, 2, False, [raw, (packed, side + b"x")]),
        "side truncated": (out, n, 2, False, [raw, (packed, side[:15])]),
        "packed short": (out, n, 2, False, [raw, (packed[:-1], side)]),
        "packed long": (out, n, 2, False, [raw, (packed + b"\0", side)]),
        "raw short": (out, n, 2, False, [raw[:-1], (packed, side)]),
        "raw long": (out, n, 2, False, [raw + b"\0", (packed, side)]),
        "plane count": (out, n, 2, False, [raw]),
        "out size": (out[:-1], n, 2, False, [raw, (packed, side)]),
        "tuple of 3": (out, n, 2, False, [raw, (packed, side, side)]),
        "not a buffer": (out, n, 2, False, [raw, 7]),
        "readonly out": (bytes(2 * n), n, 2, False, [raw, (packed, side)]),
        "rotated bytes": (out[:n], n, 1, True, [raw]),
        "itemsize 9": (np.empty(9 * n, np.uint8), n, 9, False, [raw] * 9),
        "negative n": (out[:0], -2, 2, False, [b"", b""]),
        "huge n": (out, 2**62, 2, False, [raw, raw]),
    }[case]
    with pytest.raises((ValueError, TypeError)):
        _planes.join(*bad)


def test_encode_kernels_reject_bad_arguments() -> None:
    plane = np.zeros(100, dtype=np.uint8)
    with pytest.raises(ValueError):
        _planes.nibble_pack(plane, bytes(15))
    with pytest.raises(ValueError):
        _planes.rank(plane, 0)
    with pytest.raises(ValueError):
        _planes.rank(plane[:0], 1)
    with pytest.raises(ValueError):
        _planes.split(plane, 30, 4, False, np.empty(100, np.uint8))
    with pytest.raises(ValueError):
        _planes.split(plane, 25, 4, False, np.empty(99, np.uint8))


@settings(max_examples=60, deadline=None)
@given(
    plane=st.binary(min_size=1, max_size=3000),
    step=st.integers(1, 40),
)
def test_rank_matches_bincount(plane: bytes, step: int) -> None:
    """Entropy and the 16 most frequent bytes (ties to the smaller byte) of plane[::step]."""
    data = np.frombuffer(plane, dtype=np.uint8)
    entropy, top = _planes.rank(data, step)
    counts = np.bincount(data[::step], minlength=256)
    p = counts[counts > 0] / counts.sum()
    assert entropy == pytest.approx(float(-(p * np.log2(p)).sum()), abs=1e-12)
    assert list(top) == np.argsort(-counts, kind="stable")[:16].tolist()


def test_kernel_threads_agree() -> None:
    """The kernels run without the GIL: threads decoding at once each get their own bytes."""
    values = np.random.default_rng(9).standard_normal(300_000) * 1e-3
    tensors = [float_bytes(values * (i + 1), "F32") for i in range(4)]
    encoded = [codec.encode_tensor(t, "F32", 4) for t in tensors]
    stored = [(letters, [bytes(memoryview(f).cast("B")) for f in fs]) for letters, fs in encoded]
    with ThreadPoolExecutor(4) as pool:
        backs = list(
            pool.map(lambda e: codec.decode_tensor(e[0], e[1], "F32", 4, 300_000), stored * 3)
        )
    assert [b.tobytes() for b in backs] == [t.tobytes() for t in tensors] * 3


# --- objects: codec field, old objects, corruption -----------------------------------------

# A 2x4 F32 tensor (0.5, -1.25, 3e-3, -0.0, inf, 1e-40, -2.5e-4, 7.0) as the codec-1 encoder
# (before issue 12) wrote it: no "codec" field, one zstd frame per byte plane.
OLD_OID = "042ac87c3e03a1dcc40d9b8d6a2b74e26c42de415db581f5f325d83f8b98f195"
OLD_BLOB = bytes.fromhex(
    "4144423154340000007b226474797065223a22463332222c226672616d6573223a5b32312c32312c32312c"
    "32315d2c227368617065223a5b322c345d7d28b52ffd24084100000000a60000c26f0020ca1af628b52ffd"
    "240841000000009b000016120075b5af0a28b52ffd240841000000a04400800183e026f68ffd28b52ffd24"
    "084100003fbf3b807f00b940bdd05faf"
)
OLD_VALUES = np.array([0.5, -1.25, 3.0e-3, -0.0, np.inf, 1e-40, -2.5e-4, 7.0], dtype="<f4")


def test_objects_written_by_the_old_codec_still_read(tmp_path: Path) -> None:
    objects = ObjectStore(tmp_path)
    path = plant(objects, OLD_OID, OLD_BLOB)
    t = objects.get_tensor(OLD_OID)
    assert (t.dtype, t.shape) == ("F32", (2, 4))
    assert t.data.tobytes() == OLD_VALUES.tobytes()
    objects.verify(OLD_OID)
    # the same content put again keeps its id (ids hash uncompressed bytes) and the old file
    assert objects.put_tensor(RawTensor("F32", (2, 4), OLD_VALUES.view(np.uint8))) == OLD_OID
    assert path.read_bytes() == OLD_BLOB


def test_old_and_new_objects_of_random_tensors_read_alike(tmp_path: Path) -> None:
    """Objects written the old way (codec-1 frames, no field) decode with codec 1."""
    objects = ObjectStore(tmp_path)
    for i, dtype in enumerate(sorted(DTYPES)):
        data = np.random.default_rng(i).integers(0, 256, 37 * DTYPES[dtype][0], dtype=np.uint8)
        t = RawTensor(dtype, (37,), data)
        oid = objects.put_tensor(t)
        header = read_header(objects, oid)
        assert header["codec"] == codec.CODEC and len(header["planes"]) == DTYPES[dtype][0]
        objects.path(oid).unlink()
        old = codec.encode_planes(data, t.itemsize)
        objects._write(oid, b"T", {"dtype": dtype, "shape": [37]}, old)
        assert "codec" not in read_header(objects, oid)
        assert objects.get_tensor(oid).data.tobytes() == data.tobytes()


# A 3x67 BF16 tensor (LoRA-like values, 7 of them escaped in the nibble-coded exponent plane,
# an odd element count) as the numpy encoder of codec 2 wrote it, before the C kernel.
NUMPY_CODEC2_OID = "d828dbbe56518d713235c25959c0bc238cd8e3333530cef5d7940911ddeac4c5"
NUMPY_CODEC2_BLOB = bytes.fromhex(
    "41444231544d0000007b22636f646563223a322c226474797065223a2242463136222c226672616d6573"
    "223a5b3230312c3131302c32335d2c22706c616e6573223a22726e222c227368617065223a5b332c3637"
    "5d7d005b05b8bccc219b88ac1e26f7a2a8c75f3149ff75220935acb2af0d016b535a3dd0139f1f63d623"
    "3276441c21146e05e90df83582215bb97a283e50bab83f25609f8a653e0c3ffcb0c5d4553b51fa7bfd29"
    "b8184d4039a6c5d3c55e0f4be1ad7114e7f57b11508fa4f2f634c66c92da28434d05921855b8ea3f0e41"
    "150d01c617c87a36c6e200de460e74e1639e4a94e87ffe1e15680edbb90ba09f09238ddfca1a46e72df2"
    "734bb9fee0ffdc5e391f9752fde3e9e41a13e560012d32fa0c98c90806ecf75f117c1b28b52ffd206529"
    "03008122f500012b013151020050201213174f12113110921446320101201060000512370d3350011102"
    "012c101fe241011322220032512a12f07001412211221172040202f103002001f1111141201022203100"
    "15001100016020534160061042120021f11100747573727071766f001b2f43576b6d6ebaa6cee27f926e"
)


def test_objects_written_by_the_numpy_codec_2_still_read(tmp_path: Path, simd: bool) -> None:
    """The kernel reads what the numpy encoder wrote (the read re-hashes: same bytes), and
    writes the same frames for the same tensor."""
    objects = ObjectStore(tmp_path)
    path = plant(objects, NUMPY_CODEC2_OID, NUMPY_CODEC2_BLOB)
    t = objects.get_tensor(NUMPY_CODEC2_OID)
    assert (t.dtype, t.shape) == ("BF16", (3, 67))
    header = read_header(objects, NUMPY_CODEC2_OID)
    letters, frames = codec.encode_tensor(t.data, "BF16", 2)
    assert letters == header["planes"] == "rn" and len(frames[-1]) == 16 + 7
    body = b"".join(bytes(memoryview(f).cast("B")) for f in frames)
    assert NUMPY_CODEC2_BLOB.endswith(body)
    path.unlink()
    assert objects.put_tensor(t) == NUMPY_CODEC2_OID
    assert path.read_bytes() == NUMPY_CODEC2_BLOB


def plant(objects: ObjectStore, oid: str, blob: bytes) -> Path:
    """Put an object file written by an earlier encoder where the store looks for `oid`."""
    path = objects.path(oid)
    path.parent.mkdir(parents=True)
    path.write_bytes(blob)
    return path


def read_header(objects: ObjectStore, oid: str) -> dict[str, Any]:
    blob = objects.path(oid).read_bytes()
    (n,) = struct.unpack_from("<I", blob, 5)
    return json.loads(blob[9 : 9 + n])


def rewrite_header(objects: ObjectStore, oid: str, **changes: Any) -> None:
    blob = objects.path(oid).read_bytes()
    (n,) = struct.unpack_from("<I", blob, 5)
    header = {**json.loads(blob[9 : 9 + n]), **changes}
    head = json.dumps(header).encode()
    objects.path(oid).write_bytes(blob[:5] + struct.pack("<I", len(head)) + head + blob[9 + n :])


def lora_like(dtype: str, n: int = 30_000) -> RawTensor:
    values = np.random.default_rng(7).standard_normal(n) * 1e-3
    values[:50] = np.random.default_rng(8).standard_normal(50) * 1e3  # escapes
    return RawTensor(dtype, (n,), float_bytes(values, dtype))


def assert_corrupt(objects: ObjectStore, oid: str) -> None:
    with pytest.raises(CorruptObjectError) as info:
        objects.get_tensor(oid)
    assert "\n" not in str(info.value) and oid[:12] in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"codec": 3},
        {"codec": "2"},
        {"planes": "rz"},
        {"planes": "xxxx"},
        {"planes": ["r", "r", "r", "n"]},
        {"planes": 7},
        {"shape": [29_999]},
        {"shape": [-30_000]},
        {"shape": [10**12]},
        {"shape": ["a"]},
    ],
)
def test_bad_codec_headers_are_corruption(tmp_path: Path, changes: dict[str, Any]) -> None:
    objects = ObjectStore(tmp_path)
    oid = objects.put_tensor(lora_like("F32"))
    rewrite_header(objects, oid, **changes)
    if changes == {"planes": ["r", "r", "r", "n"]}:  # a list spelling the same planes decodes
        objects.get_tensor(oid)
        return
    assert_corrupt(objects, oid)


@settings(max_examples=120, deadline=None)
@given(
    dtype=st.sampled_from(["F32", "BF16", "U8"]),
    where=st.floats(0.0, 1.0, exclude_max=True),
    how=st.sampled_from(["flip", "truncate", "zero", "garbage"]),
)
def test_damaged_frames_raise_corrupt_object_error(
    tmp_path_factory: pytest.TempPathFactory, dtype: str, where: float, how: str
) -> None:
    """Any damage to the frames of a codec-2 object is one CorruptObjectError, never wrong data."""
    objects = ObjectStore(tmp_path_factory.mktemp("objects"))
    t = lora_like(dtype) if dtype != "U8" else RawTensor("U8", (9_000,), np.arange(9_000) % 20)
    t = RawTensor(t.dtype, t.shape, np.asarray(t.data, dtype=np.uint8))
    oid = objects.put_tensor(t)
    blob = bytearray(objects.path(oid).read_bytes())
    (n,) = struct.unpack_from("<I", blob, 5)
    start = 9 + n
    pos = start + int(where * (len(blob) - start))
    if how == "flip":
        blob[pos] ^= 0x5A
    elif how == "truncate":
        del blob[pos:]
    elif how == "zero":
        blob[pos : pos + 64] = bytes(len(blob[pos : pos + 64]))
    else:
        blob[pos : pos + 16] = np.random.default_rng(pos).integers(0, 256, 16, np.uint8).tobytes()
    if bytes(blob) == objects.path(oid).read_bytes():
        return  # zeroing bytes that were zero already
    objects.path(oid).write_bytes(bytes(blob))
    assert_corrupt(objects, oid)


# --- against ZipNN (dev dependency; skipped where it is not installed) ---------------------


def test_ratio_not_above_zipnn_on_lora_like_tensors() -> None:
    zipnn = pytest.importorskip("zipnn")
    rng = np.random.default_rng(11)
    for dtype, zdtype in (("F32", "float32"), ("BF16", "bfloat16")):
        z = zipnn.ZipNN(input_format="byte", bytearray_dtype=zdtype, threads=1)
        ours = theirs = 0
        for shape, scale in (((32, 2048), 1 / 45), ((2048, 32), 1e-3), ((32, 8192), 1 / 90)):
            values = (
                rng.uniform(-scale, scale, shape) if shape[0] == 32 else rng.normal(0, scale, shape)
            )
            data = float_bytes(values.reshape(-1), dtype)
            _, frames = codec.encode_tensor(data, dtype, ITEMSIZE[dtype])
            ours += sum(len(memoryview(f).cast("B")) for f in frames)
            theirs += len(z.compress(data.tobytes()))
        assert ours <= theirs, (dtype, ours, theirs)
