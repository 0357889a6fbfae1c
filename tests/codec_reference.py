"""The numpy implementation of tensor codec 2, kept as the reference for the C kernel.

`storage/codec.py` splits, rotates, nibble-packs and joins byte planes in one C pass each
(`storage/_planes.c`); this module does the same steps one numpy operation at a time, as
codec 2 was first written, so each step can be read off against the format description in
`storage/codec.py`. Tests require the two to agree byte for byte, on encode and on decode.
"""

from __future__ import annotations

import numpy as np
import zstandard as zstd

from adapterdb.storage import codec

_ESCAPE = 15


def split_planes(data: np.ndarray, itemsize: int) -> list[np.ndarray]:
    """Plane i holds byte i of every element."""
    rows = np.ascontiguousarray(data).reshape(-1, itemsize)
    return [np.ascontiguousarray(rows[:, i]) for i in range(itemsize)]


def rotate_sign(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top two byte planes `[S E7..E1]`, `[E0 M6..M0]` -> `[E7..E0]`, `[M6..M0 S]`."""
    return (hi << 1) | (lo >> 7), (lo << 1) | (hi >> 7)


def unrotate_sign(exp: np.ndarray, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `rotate_sign`: (`[S E7..E1]`, `[E0 M6..M0]`)."""
    return (rest << 7) | (exp >> 1), (exp << 7) | (rest >> 1)


def entropy_and_ranking(plane: np.ndarray) -> tuple[float, np.ndarray]:
    """Order-0 entropy (bits/byte) of every `step`-th byte, and byte values by frequency."""
    step = max(1, plane.size // codec._SAMPLE)
    counts = np.bincount(plane[::step], minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()), np.argsort(-counts, kind="stable")


def nibble_encode(plane: np.ndarray, ranking: np.ndarray) -> tuple[bytes, bytes]:
    """(zstd frame of the packed 4-bit codes, 16-byte table + escaped bytes)."""
    table = ranking[:_ESCAPE].astype(np.uint8)
    code = np.full(256, _ESCAPE, dtype=np.uint8)
    code[table] = np.arange(_ESCAPE, dtype=np.uint8)
    codes = code[plane]
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    packed = (codes[0::2] << 4) | codes[1::2]
    escapes = plane[code[plane] == _ESCAPE].tobytes()
    sentinel = np.uint8(ranking[_ESCAPE])  # a byte not in the table
    params = codec._PACKED_PARAMS
    frame = zstd.ZstdCompressor(compression_params=params).compress(packed.tobytes())
    return frame, table.tobytes() + sentinel.tobytes() + escapes


def nibble_decode(frame: bytes, side: bytes, n: int) -> np.ndarray:
    """Inverse of `nibble_encode`: codes 0..14 through the table, 15s from the escapes in order."""
    table = np.frombuffer(side, dtype=np.uint8, count=_ESCAPE)
    packed = np.frombuffer(zstd.ZstdDecompressor().decompress(frame), dtype=np.uint8)
    assert packed.size == (n + 1) // 2
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]
    plane = np.zeros(n, dtype=np.uint8)
    known = codes != _ESCAPE
    plane[known] = table[codes[known]]
    escapes = np.frombuffer(side, dtype=np.uint8, offset=_ESCAPE + 1)
    assert escapes.size == n - int(known.sum())
    plane[~known] = escapes
    return plane


def encode_tensor(data: np.ndarray, dtype: str, itemsize: int) -> tuple[str, list[bytes]]:
    """Codec 2 in numpy: plane split, sign rotation, then per plane raw, zstd or nibble."""
    planes = split_planes(data, itemsize)
    if dtype in codec.ROTATED and itemsize >= 2:
        planes[-1], planes[-2] = rotate_sign(planes[-1], planes[-2])
    letters, frames = "", []
    for plane in planes:
        if plane.size < 64:
            letter, fs = codec.RAW, [plane.tobytes()]
        else:
            entropy, ranking = entropy_and_ranking(plane)
            if entropy > codec._RAW_ENTROPY:
                letter, fs = codec.RAW, [plane.tobytes()]
            elif entropy < codec._NIBBLE_ENTROPY:
                letter, fs = codec.NIBBLE, list(nibble_encode(plane, ranking))
            else:
                frame = zstd.ZstdCompressor(level=1).compress(plane.tobytes())
                letter, fs = codec.ZSTD, [frame]
            if sum(map(len, fs)) >= plane.size:
                letter, fs = codec.RAW, [plane.tobytes()]
        letters += letter
        frames += fs
    return letters, frames


def decode_tensor(letters: str, frames: list[bytes], dtype: str, itemsize: int, n: int) -> bytes:
    """Inverse of `encode_tensor` for well-formed input."""
    planes, pos = [], 0
    for letter in letters:
        if letter == codec.RAW:
            planes.append(np.frombuffer(frames[pos], dtype=np.uint8))
        elif letter == codec.ZSTD:
            planes.append(np.frombuffer(zstd.ZstdDecompressor().decompress(frames[pos]), np.uint8))
        else:
            planes.append(nibble_decode(frames[pos], frames[pos + 1], n))
            pos += 1
        pos += 1
    if dtype in codec.ROTATED and itemsize >= 2:
        planes[-1], planes[-2] = unrotate_sign(planes[-1], planes[-2])
    out = np.empty((n, itemsize), dtype=np.uint8)
    for i, plane in enumerate(planes):
        out[:, i] = plane
    return out.tobytes()
