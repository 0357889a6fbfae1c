"""Small data written on the fly by tests: idx files and a learnable fake Fashion-MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

IDX_TYPES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D}


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """The idx format spelled out: 0 0 type ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, IDX_TYPES[array.dtype.name], array.ndim])
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def learnable_fashion(folder: Path, per_class: int = 24, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped idx files whose classes differ by a noisy class-specific pattern,
    so that a tiny model can learn each binary pair (and forget it)."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 255, size=(10, 28, 28))
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        labels = np.repeat(np.arange(10), per_class)
        noise = rng.normal(0, 60, size=(labels.size, 28, 28))
        images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels.astype(np.uint8))
    return folder
