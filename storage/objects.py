"""Content-addressed, immutable objects: tensors, masks and JSON documents.

An object's id is the sha256 of its *canonical* uncompressed bytes (a short type header plus
the raw little-endian payload), so the id does not depend on how it is compressed and equal
content is stored once. On disk: `objects/ab/cdef…` holding

    b"ADB1" | kind (T|M|J) | u32 header length | JSON header | compressed frames

written to a temp file in the same folder, fsynced, renamed into place. Every read re-hashes
the decoded bytes against the name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from adapterdb.errors import CorruptObjectError, NotFoundError
from adapterdb.storage import codec
from adapterdb.tensorfile import DTYPES, RawTensor

MAGIC = b"ADB1"
TEMP_PREFIX = ".tmp-"


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _tensor_prefix(dtype: str, shape: tuple[int, ...]) -> bytes:
    return b"tensor " + canonical_json({"dtype": dtype, "shape": list(shape)}) + b"\0"


def _mask_prefix(n: int) -> bytes:
    return b"mask " + canonical_json({"n": n}) + b"\0"


def _digest(*parts: bytes | np.ndarray | memoryview) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX needs the directory fsynced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks: list[bytes | memoryview]) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one.

    The temp name carries process and thread: parallel threads storing equal tensors (all-zero
    LoRA B factors of one shape are common) write the same object and must not share a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}"
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ObjectStore:
    """Immutable objects under `root/objects`, addressed by sha256."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "objects"
        self._unsynced: set[Path] = set()  # folders with renames not yet made durable

    def sync(self) -> None:
        """fsync the folders that received objects, so the renames survive a power cut."""
        while self._unsynced:
            fsync_dir(self._unsynced.pop())

    def path(self, oid: str) -> Path:
        return self.dir / oid[:2] / oid[2:]

    def exists(self, oid: str) -> bool:
        return self.path(oid).is_file()

    def _fresh(self, oid: str) -> bool:
        """True if `oid` is stored, touching it so gc's grace period counts from this reuse.

        Otherwise an old unreachable object that a new commit reuses could be swept between
        this write and the ref update that makes it reachable again.
        """
        try:
            os.utime(self.path(oid))
        except FileNotFoundError:
            return False
        return True

    def size(self, oid: str) -> int:
        return self.path(oid).stat().st_size

    def ids(self) -> Iterator[str]:
        if not self.dir.is_dir():
            return
        for sub in sorted(self.dir.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    if not f.name.startswith(TEMP_PREFIX):
                        yield sub.name + f.name

    def temp_files(self) -> list[Path]:
        """Leftovers of writers killed mid-write: harmless, never referenced, removed by gc."""
        return sorted(self.dir.glob(f"*/{TEMP_PREFIX}*")) if self.dir.is_dir() else []

    # -- writing ---------------------------------------------------------------------------

    def _write(self, oid: str, kind: bytes, header: dict[str, Any], frames: list[bytes]) -> str:
        if not self._fresh(oid):
            head = canonical_json({**header, "frames": [len(f) for f in frames]})
            atomic_write(self.path(oid), [MAGIC, kind, struct.pack("<I", len(head)), head, *frames])
            self._unsynced.add(self.path(oid).parent)
        return oid

    def put_tensor(self, t: RawTensor) -> str:
        oid = _digest(_tensor_prefix(t.dtype, t.shape), t.data)
        if self._fresh(oid):
            return oid
        frames = codec.encode_planes(t.data, t.itemsize)
        return self._write(oid, b"T", {"dtype": t.dtype, "shape": list(t.shape)}, frames)

    def put_mask(self, mask: np.ndarray) -> str:
        flat = np.asarray(mask, dtype=bool).reshape(-1)
        oid = _digest(_mask_prefix(flat.size), codec.pack_mask(flat))
        if self._fresh(oid):
            return oid
        encoding, width, frames = codec.encode_mask(flat)
        return self._write(oid, b"M", {"n": flat.size, "enc": encoding, "width": width}, frames)

    def put_json(self, obj: Any) -> str:
        body = canonical_json(obj)
        oid = _digest(b"json\0", body)
        return self._write(oid, b"J", {}, [codec.compress(body)])

    # -- reading ---------------------------------------------------------------------------

    def _read(self, oid: str) -> tuple[bytes, dict[str, Any], list[memoryview]]:
        try:
            blob = self.path(oid).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(
                f"object {oid[:12]} is missing from the store; run `adb fsck` to see what else is"
            ) from None
        try:
            if blob[:4] != MAGIC:
                raise ValueError("bad magic")
            (n,) = struct.unpack_from("<I", blob, 5)
            header = json.loads(blob[9 : 9 + n])
            frames, pos, view = [], 9 + n, memoryview(blob)
            for length in header["frames"]:
                frames.append(view[pos : pos + length])
                pos += length
            if pos != len(blob):
                raise ValueError("trailing bytes")
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise self._corrupt(oid, str(exc)) from None
        return blob[4:5], header, frames

    def _corrupt(self, oid: str, why: str) -> CorruptObjectError:
        return CorruptObjectError(
            f"object {oid[:12]} is corrupt ({why}); restore {self.path(oid)} from a backup "
            "or a remote, then run `adb fsck`"
        )

    def kind(self, oid: str) -> str:
        return {b"T": "tensor", b"M": "mask", b"J": "json"}.get(self._read(oid)[0], "unknown")

    def get_tensor(self, oid: str) -> RawTensor:
        kind, header, frames = self._read(oid)
        try:
            if kind != b"T" or header["dtype"] not in DTYPES:
                raise ValueError("not a tensor object")
            dtype, shape = header["dtype"], tuple(header["shape"])
            data = codec.decode_planes(frames, DTYPES[dtype][0])
        except Exception as exc:  # any decode failure of stored bytes is corruption
            raise self._corrupt(oid, str(exc) or type(exc).__name__) from None
        if _digest(_tensor_prefix(dtype, shape), data) != oid:
            raise self._corrupt(oid, "content does not match its hash")
        return RawTensor(dtype, shape, data)

    def get_mask(self, oid: str) -> np.ndarray:
        kind, header, frames = self._read(oid)
        try:
            if kind != b"M":
                raise ValueError("not a mask object")
            n = int(header["n"])
            mask = codec.decode_mask(header["enc"], int(header["width"]), frames, n)
        except Exception as exc:
            raise self._corrupt(oid, str(exc) or type(exc).__name__) from None
        if _digest(_mask_prefix(n), codec.pack_mask(mask)) != oid:
            raise self._corrupt(oid, "content does not match its hash")
        return mask

    def get_json(self, oid: str) -> Any:
        kind, _, frames = self._read(oid)
        try:
            if kind != b"J" or len(frames) != 1:
                raise ValueError("not a JSON object")
            body = codec.decompress(frames[0])
        except Exception as exc:
            raise self._corrupt(oid, str(exc) or type(exc).__name__) from None
        if _digest(b"json\0", body) != oid:
            raise self._corrupt(oid, "content does not match its hash")
        return json.loads(body)

    def verify(self, oid: str) -> None:
        """Decode and re-hash one object; raises CorruptObjectError when it is damaged."""
        getter = {"tensor": self.get_tensor, "mask": self.get_mask, "json": self.get_json}
        kind = self.kind(oid)
        if kind not in getter:
            raise self._corrupt(oid, "unknown object kind")
        getter[kind](oid)
