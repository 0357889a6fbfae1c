"""Torch-free safetensors I/O on raw bytes.

The store's hot verbs (`import`, `checkout`, `fsck`) never need tensor arithmetic, only bytes,
dtype and shape. Reading and writing the (tiny, documented) safetensors layout directly with
numpy keeps them free of `import torch`, which alone costs 2–5 s on this machine.

Layout: 8-byte little-endian header length N, N bytes of JSON header (padded with spaces to a
multiple of 8), then the tensors' little-endian bytes at the header's `data_offsets`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapterdb.errors import AdbError

# safetensors dtype code -> (element size, bit mask of the exponent for float types or 0)
DTYPES: dict[str, tuple[int, int]] = {
    "F64": (8, 0x7FF0000000000000),
    "F32": (4, 0x7F800000),
    "F16": (2, 0x7C00),
    "BF16": (2, 0x7F80),
    "I64": (8, 0),
    "I32": (4, 0),
    "I16": (2, 0),
    "I8": (1, 0),
    "U8": (1, 0),
    "BOOL": (1, 0),
}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class RawTensor:
    """A tensor as bytes: safetensors dtype code, shape, and a flat uint8 buffer."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    def nonfinite(self) -> bool:
        """True if a float tensor holds NaN or ±inf (all exponent bits set), read off the bits."""
        size, exp_mask = DTYPES[self.dtype]
        if not exp_mask or self.numel == 0:
            return False
        bits = self.data.view(_UINT[size])
        mask = _UINT[size](exp_mask)
        return bool(np.any((bits & mask) == mask))


def _bad(path: Path, why: str) -> AdbError:
    return AdbError(
        f"{path} is not a readable safetensors file ({why}); re-save it with safetensors"
    )


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """Read every tensor of a safetensors file as `RawTensor` (memory-mapped, zero-copy)."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise _bad(path, "file too short")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise _bad(path, "header length out of range")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # also bad UTF-8, and ints too long to parse
            raise _bad(path, "header is not JSON") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else b""
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    body = np.frombuffer(buf, dtype=np.uint8, offset=8 + n) if buf else np.empty(0, np.uint8)
    tensors: dict[str, RawTensor] = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"tensor {name[:80]!r} has a malformed header entry") from None
        if not all(type(v) is int and v >= 0 for v in (*shape, start, end)):
            raise _bad(path, f"tensor {name[:80]!r} has a shape or offsets that are not counts")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _bad(path, f"tensor {name[:80]!r} has unsupported dtype {str(dtype)[:20]!r}")
        raw = RawTensor(dtype, shape, body[start:end])
        if not 0 <= start <= end <= body.size or end - start != raw.numel * raw.itemsize:
            raise _bad(path, f"tensor {name[:80]!r} has data offsets that do not match its shape")
        tensors[name] = raw
    return tensors, metadata


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, RawTensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        nbytes = t.data.size
        header[name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(memoryview(np.ascontiguousarray(tensors[name].data)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
