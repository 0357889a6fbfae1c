"""Byte codecs for stored objects: byte-plane split + zstd for tensors, packed bits for masks.

Float bytes compress badly as they come because sign/exponent bytes (low entropy) interleave
with mantissa bytes (near-random). Splitting the bytes of each element into planes lets zstd
compress the exponent plane to ~35% and store the mantissa planes near raw. Masks are one bit
per parameter (`numpy.packbits`); very sparse masks are stored as the gaps between set
positions, byte-plane split, which lands close to the entropy bound.
"""

from __future__ import annotations

import numpy as np
import zstandard as zstd

_LEVEL = 1  # level 1 compresses these planes as well as 3 (measured) at a fraction of the time
_MT_BYTES = 8 << 20  # planes at least this large compress with zstd's worker threads


def compress(data: memoryview | bytes | np.ndarray) -> bytes:
    """One zstd frame with a content checksum; multi-threaded for large inputs."""
    view = memoryview(data).cast("B")
    threads = -1 if view.nbytes >= _MT_BYTES else 0
    return zstd.ZstdCompressor(level=_LEVEL, write_checksum=True, threads=threads).compress(view)


def decompress(frame: bytes | memoryview) -> bytes:
    return zstd.ZstdDecompressor().decompress(frame)


def split_planes(data: np.ndarray, itemsize: int) -> list[np.ndarray]:
    """Byte plane i holds byte i of every element (a strided copy per plane: ~memcpy speed)."""
    if itemsize == 1:
        return [data]
    rows = data.reshape(-1, itemsize)
    return [np.ascontiguousarray(rows[:, i]) for i in range(itemsize)]


def join_planes(planes: list[np.ndarray], itemsize: int) -> np.ndarray:
    """Inverse of `split_planes`: interleave the planes back into element bytes."""
    if itemsize == 1:
        return planes[0]
    out = np.empty((planes[0].size, itemsize), dtype=np.uint8)
    for i, plane in enumerate(planes):
        out[:, i] = plane
    return out.reshape(-1)


def encode_planes(data: np.ndarray, itemsize: int) -> list[bytes]:
    """Compressed frames, one per byte plane."""
    return [compress(p) for p in split_planes(data, itemsize)]


def decode_planes(frames: list[bytes | memoryview], itemsize: int) -> np.ndarray:
    planes = [np.frombuffer(decompress(f), dtype=np.uint8) for f in frames]
    return join_planes(planes, itemsize)


# --- masks -------------------------------------------------------------------------------


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Canonical mask bytes: one bit per element, big-endian bit order, zero-padded."""
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1))


def unpack_mask(packed: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(packed, count=n).astype(bool)


def mask_gap_width(count: int, n: int, max_gap: int) -> int:
    """Bytes per gap if the gap encoding is the better one for this mask, else 0.

    Gaps win when fewer than one position in 16 is set (2-byte gaps then cost < 1 bit per
    parameter before compression); wider gaps are used only when a gap exceeds 16 bits.
    """
    if count == 0 or count * 16 >= n:
        return 0
    return 2 if max_gap < (1 << 16) else 4


def encode_mask(mask: np.ndarray) -> tuple[str, int, list[bytes]]:
    """(encoding, gap width, frames) for a flat bool mask: 'bits' or 'gaps'."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    # Count first: dense masks skip building 8-byte positions and gaps they would not use.
    if mask_gap_width(int(np.count_nonzero(flat)), flat.size, 0) == 0:
        return "bits", 0, [compress(pack_mask(flat))]
    idx = np.flatnonzero(flat)
    gaps = np.diff(idx, prepend=-1)
    width = mask_gap_width(idx.size, flat.size, int(gaps.max()))
    dtype = np.dtype(f"<u{width}")
    return "gaps", width, encode_planes(gaps.astype(dtype).view(np.uint8), width)


def decode_mask(encoding: str, width: int, frames: list[bytes | memoryview], n: int) -> np.ndarray:
    """The flat bool mask back from `encode_mask`'s output."""
    if (encoding, width) not in (("bits", 0), ("gaps", 2), ("gaps", 4)):
        raise ValueError(f"unknown mask encoding {encoding!r} with gap width {width}")
    if encoding == "bits":
        return unpack_mask(np.frombuffer(decompress(frames[0]), dtype=np.uint8), n)
    gaps = decode_planes(frames, width).view(np.dtype(f"<u{width}")).astype(np.int64)
    mask = np.zeros(n, dtype=bool)
    idx = np.cumsum(gaps) - 1
    if idx.size and (idx[-1] >= n or idx[0] < 0):
        raise ValueError("mask gaps point outside the mask")
    mask[idx] = True
    return mask
