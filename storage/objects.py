"""Content-addressed, immutable objects: tensors, masks and JSON documents.

An object's id is the sha256 of its *canonical* uncompressed bytes (a short type header plus
the raw little-endian payload), so the id does not depend on how it is compressed and equal
content is stored once. On disk: `objects/ab/cdef…` holding

    b"ADB1" | kind (T|M|J) | u32 header length | JSON header | compressed frames

written to a temp file under `tmp/`, fsynced, renamed into place. Every read re-hashes
the decoded bytes against the name, and so does every reuse: a commit never relies on an
object whose bytes went bad, it writes it again (a "heal", which `fsck` reports).

Writers and gc coordinate without a long-held lock: a writer *claims* every object it writes
or reuses in its pin file (`pins/PID-…`, flocked while the writer lives) before it checks
that the object exists, inside a shared flock on `gc.lock`; gc holds that lock exclusively
while it reads the live pins and sweeps. So gc never deletes an object a live writer has
stored or found but not yet committed, whatever `--grace` says.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from adapterdb import failpoints, iopool
from adapterdb.durable import fsync_dirs, pid_alive
from adapterdb.errors import CorruptObjectError, NotFoundError
from adapterdb.storage import codec
from adapterdb.tensorfile import DTYPES, RawTensor

MAGIC = b"ADB1"
TEMP_PREFIX = ".tmp-"
TMP_DIR, PINS_DIR, GC_LOCK, HEAL_LOG = "tmp", "pins", "gc.lock", "healed.log"
# A temp file whose writer looks alive but holds no lock (a reused pid) is abandoned after this.
_ABANDONED_AFTER = 3600.0
_OID = re.compile(r"[0-9a-f]{64}")
_FANOUT = re.compile(r"[0-9a-f]{2}")


def _is_object(path: Path) -> bool:
    """An `objects/ab/cdef...` file whose folder and name spell a sha256."""
    return bool(_OID.fullmatch(path.parent.name + path.name)) and path.is_file()


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


def atomic_write(
    path: Path,
    chunks: Iterable[bytes | memoryview],
    *,
    tmp_dir: Path | None = None,
    label: str = "file",
    guard: Callable[[], AbstractContextManager[object]] | None = None,
) -> None:
    """Temp file, fsync, rename: readers see the old file or the new one, never a part.

    The temp file lives in `tmp_dir` (default: beside `path`; the store passes its `tmp/`, so
    leftovers are found by listing one small folder). Its name carries process and thread:
    parallel threads storing equal tensors (all-zero LoRA B factors of one shape are common)
    write the same object and must not share a file. The writer holds a flock on it until
    the rename, so a sweeper can tell a live writer's temp file from a dead one's; `guard`
    (gc's shared lock, for objects) covers the gap between creating the file and locking it.
    A write that fails removes its temp file; one that is killed leaves it to the next sweep.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = tmp_dir or path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}"
    try:
        with guard() if guard else contextlib.nullcontext():
            f = open(tmp, "wb")  # noqa: SIM115 (closed below, after the rename)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with f:
            for i, chunk in enumerate(chunks or [b""]):
                f.write(chunk)
                if i == 0:  # a failure here leaves a partly written temp file, as ENOSPC would
                    failpoints.hit(f"{label}.write")
            f.flush()
            failpoints.hit(f"{label}.fsync")
            os.fsync(f.fileno())
            failpoints.hit(f"{label}.rename")
            os.replace(tmp, path)  # still locked: the temp never looks abandoned while it exists
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _writer_alive(name: str) -> bool:
    """Whether the process named in a temp or pin file name (`.tmp-PID-…`, `PID-…`) runs."""
    m = re.match(r"(?:\.tmp-)?(\d+)-", name)
    return bool(m) and pid_alive(int(m[1]))


def unlocked(path: Path) -> bool:
    """True if nobody holds a flock on `path` (its writer died or finished)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    finally:
        os.close(fd)
    return True


def _drop_pin(pin: Any) -> None:
    with contextlib.suppress(OSError):
        os.unlink(pin.name)
    pin.close()


def sweep_leftovers(root: Path) -> list[Path]:
    """Remove temp files and pin files of dead writers under a store root; returns them.

    Every writing command calls this, so what a killed command left behind is gone after the
    next one. Without gc's exclusive lock a live writer's temp file may be unlocked for an
    instant (created, not yet locked): its process is alive, so only a dead pid's unlocked
    files go, and files whose pid looks alive only once they are an hour old (a reused pid).
    """
    removed: list[Path] = []
    for folder in (root / TMP_DIR, root / PINS_DIR):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                old = time.time() - entry.stat().st_mtime > _ABANDONED_AFTER
            except FileNotFoundError:
                continue
            if (not _writer_alive(entry.name) or old) and unlocked(path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path)
    return removed


class ObjectStore:
    """Immutable objects under `root/objects`, addressed by sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "objects"
        self.tmp_dir = root / TMP_DIR
        self._unsynced: set[Path] = set()  # folders with renames not yet made durable
        self._lock = threading.Lock()
        self._pin: Any = None  # this writer's pin file, open and flocked while it lives
        self._claimed: set[str] = set()
        self._healing: set[str] = set()  # found corrupt: rewritten by the next write of it
        self._lazy: Callable[[str], bytes] | bool | None = None  # remote reader; None: unread

    def sync(self) -> None:
        """fsync the folders that received objects, so the renames survive a power cut."""
        with self._lock:
            folders, self._unsynced = self._unsynced, set()
        fsync_dirs(folders, "object")

    # -- writers and gc --------------------------------------------------------------------

    @contextmanager
    def _gc_lock(self, mode: int) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / GC_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _shared(self) -> AbstractContextManager[None]:
        """A writer's moment of claiming or creating: waits while gc sweeps, never for long."""
        return self._gc_lock(fcntl.LOCK_SH)

    def exclusive(self) -> AbstractContextManager[None]:
        """gc's sweep: no writer claims an object or starts a temp file meanwhile."""
        return self._gc_lock(fcntl.LOCK_EX)

    def _claim(self, oid: str) -> None:
        """Name `oid` in this writer's pin file (call under `_shared`), so gc keeps it."""
        with self._lock:
            if oid in self._claimed:
                return
            if self._pin is None:
                folder = self.root / PINS_DIR
                folder.mkdir(parents=True, exist_ok=True)
                sweep_leftovers(self.root)  # the first write of a command: clean up after crashes
                pin = open(folder / f"{os.getpid()}-{secrets.token_hex(6)}", "ab", buffering=0)  # noqa: SIM115
                fcntl.flock(pin.fileno(), fcntl.LOCK_EX)
                self._pin = pin
                # a command that fails (or a Store that is dropped) leaves no pin file behind
                self._pin_cleanup = weakref.finalize(self, _drop_pin, pin)
            self._pin.write(f"{oid}\n".encode())
            self._claimed.add(oid)

    def release(self) -> None:
        """Drop this writer's claims: what it wrote is committed (or abandoned) now.

        `Store.commit` calls it once the ref has moved; objects meant for a later commit should
        be written after the earlier one (or kept reachable), as gc may collect them from here.
        """
        with self._lock:
            pin, self._pin = self._pin, None
            self._claimed.clear()
        if pin is not None:
            self._pin_cleanup()

    def live_claims(self) -> set[str]:
        """Objects that live writers (other than this ObjectStore) claimed; removes dead pins.

        Call under `exclusive()`: no claim can be added while the answer is used.
        """
        claimed: set[str] = set()
        own = self._pin.name if self._pin is not None else None
        try:
            entries = list(os.scandir(self.root / PINS_DIR))
        except FileNotFoundError:
            return claimed
        for entry in entries:
            if entry.path == own:
                continue
            if unlocked(Path(entry.path)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                continue
            with contextlib.suppress(FileNotFoundError):
                claimed.update(
                    line.decode()
                    for line in Path(entry.path).read_bytes().split(b"\n")
                    if _OID.fullmatch(line.decode("latin-1"))
                )
        return claimed

    def healed(self) -> list[tuple[float, str]]:
        """(time, object id) of every object found corrupt on reuse and written again."""
        try:
            lines = (self.root / HEAL_LOG).read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            parts = line.decode("latin-1").split(" ")
            if len(parts) == 2 and _OID.fullmatch(parts[1]):
                with contextlib.suppress(ValueError):
                    out.append((float(parts[0]), parts[1]))
        return out

    def _record_heal(self, oid: str) -> None:
        path = self.root / HEAL_LOG
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            failpoints.hit("heal.append")
            os.write(fd, f"{time.time():.3f} {oid}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def path(self, oid: str) -> Path:
        return self.dir / oid[:2] / oid[2:]

    def exists(self, oid: str) -> bool:
        """Stored here, or (a lazy clone) left on the remote, which a read fetches."""
        return self.path(oid).is_file() or self.lazy()

    def _fresh(self, oid: str) -> bool:
        """True if `oid` is stored *intact*; False means the caller must write it.

        The object is claimed first (gc keeps it until this writer commits), then touched
        (so a gc in this very process, which ignores its own claims, still counts its grace
        from this reuse), then decoded and re-hashed: an object whose bytes went bad on disk
        is written again by this commit instead of being reused into a commit nobody can
        check out (the rewrite is logged for `fsck`).
        """
        if oid in self._healing:
            return False
        with self._shared():
            self._claim(oid)
            try:
                os.utime(self.path(oid))
            except FileNotFoundError:
                return False
        try:
            self.verify(oid)
        except NotFoundError:
            return False
        except CorruptObjectError:
            with self._lock:
                self._healing.add(oid)
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
                    if _is_object(f):
                        yield sub.name + f.name

    def strays(self) -> list[Path]:
        """Entries under objects/ that are neither objects nor temp files (a folder or file
        put there by hand, a name cut short): fsck names them instead of tripping over them."""
        if not self.dir.is_dir():
            return []
        out: list[Path] = []
        for sub in sorted(self.dir.iterdir()):
            if not (sub.is_dir() and _FANOUT.fullmatch(sub.name)):
                out.append(sub)
                continue
            for f in sorted(sub.iterdir()):
                if not f.name.startswith(TEMP_PREFIX) and not _is_object(f):
                    out.append(f)
        return out

    def temp_files(self) -> list[Path]:
        """Temp files: of live writers, or leftovers of killed ones (the next write or gc
        removes those). Older versions wrote them beside the objects; those are listed too."""
        found = sorted(self.tmp_dir.glob(f"{TEMP_PREFIX}*")) if self.tmp_dir.is_dir() else []
        legacy = sorted(self.dir.glob(f"*/{TEMP_PREFIX}*")) if self.dir.is_dir() else []
        return found + legacy

    # -- writing ---------------------------------------------------------------------------

    def _write(self, oid: str, kind: bytes, header: dict[str, Any], frames: list[bytes]) -> str:
        if not self._fresh(oid):
            head = canonical_json({**header, "frames": [len(f) for f in frames]})
            path = self.path(oid)
            new_folder = not path.parent.is_dir()
            atomic_write(
                path,
                [MAGIC, kind, struct.pack("<I", len(head)), head, *frames],
                tmp_dir=self.tmp_dir,
                label="object",
                guard=self._shared,
            )
            with self._lock:
                self._unsynced.add(path.parent)
                if new_folder:
                    self._unsynced.add(self.dir)
                healed = oid in self._healing
                self._healing.discard(oid)
            if healed:
                self._record_heal(oid)
        return oid

    def put_tensor(self, t: RawTensor) -> str:
        oid = _digest(_tensor_prefix(t.dtype, t.shape), t.data)
        if self._fresh(oid):
            return oid
        planes, frames = codec.encode_tensor(t.data, t.dtype, t.itemsize)
        header = {"dtype": t.dtype, "shape": list(t.shape), "codec": codec.CODEC, "planes": planes}
        return self._write(oid, b"T", header, frames)

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
            blob = None
        return self._parse(oid, self._on_demand(oid) if blob is None else blob)

    def _on_demand(self, oid: str) -> bytes:
        """A missing object: a lazy clone fetches it from its remote (re-hashed, then kept);
        any other store reports it missing."""
        if not self.lazy():
            raise NotFoundError(
                f"object {oid[:12]} is missing from the store; run `adb fsck` to see what else is"
            )
        assert callable(self._lazy)
        blob = self._lazy(oid)
        self.adopt(oid, blob)  # a cache: not fsynced folder by folder, a lost one comes again
        return blob

    def prefetch(self, oids: Iterable[str]) -> None:
        """A lazy clone fetches the objects it lacks among `oids` in parallel (a verb that
        reads them one by one would wait for each round trip); elsewhere a no-op."""
        if not self.lazy():
            return
        missing = sorted({o for o in oids if not self.path(o).is_file()})
        if not missing:
            return
        iopool.run_all(lambda oid: self._on_demand(oid) and None, missing)  # kept on disk only

    def adopt(self, oid: str, blob: bytes) -> None:
        """Keep an object fetched from elsewhere: decoded and re-hashed first, so bytes that do
        not match their name raise `CorruptObjectError` and never enter the store."""
        self.decode(oid, blob)
        self.keep(oid, blob)

    def decode(self, oid: str, blob: bytes) -> Any:
        """Bytes fetched from elsewhere, decoded and re-hashed against `oid` (the tensor, mask
        or JSON value they hold); `CorruptObjectError` if they do not match it."""
        return self._check(oid, *self._parse(oid, blob))

    def keep(self, oid: str, blob: bytes) -> None:
        """Store bytes that `decode` accepted (temp file, fsync, rename, as every object), so a
        fetch can write them while it reads on; claimed (gc keeps it) until `release`, like a
        written object."""
        with self._shared():
            self._claim(oid)
        path = self.path(oid)
        if path.is_file():
            return
        new_folder = not path.parent.is_dir()
        atomic_write(path, [blob], tmp_dir=self.tmp_dir, label="object", guard=self._shared)
        with self._lock:
            self._unsynced.add(path.parent)
            if new_folder:
                self._unsynced.add(self.dir)

    def lazy(self) -> bool:
        """Whether objects missing here come from a remote on demand (a `clone --lazy`)."""
        if self._lazy is None:  # read once, and only by stores that miss an object
            from adapterdb.storage.remote import lazy_source

            self._lazy = lazy_source(self.root) or False
        return bool(self._lazy)

    def _parse(self, oid: str, blob: bytes) -> tuple[bytes, dict[str, Any], list[memoryview]]:
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
        return self._tensor(oid, *self._read(oid))

    def _tensor(
        self, oid: str, kind: bytes, header: dict[str, Any], frames: list[memoryview]
    ) -> RawTensor:
        try:
            if kind != b"T" or header["dtype"] not in DTYPES:
                raise ValueError("not a tensor object")
            dtype, shape = header["dtype"], tuple(header["shape"])
            itemsize = DTYPES[dtype][0]
            version = header.get("codec", 1)  # objects written before codec 2 have no field
            if version == 1:
                data = codec.decode_planes(frames, itemsize)
            elif version == codec.CODEC:
                n = math.prod(int(d) for d in shape)
                data = codec.decode_tensor(header["planes"], frames, dtype, itemsize, n)
            else:
                raise ValueError(f"unknown tensor codec {version!r}, written by a newer adb?")
        except Exception as exc:  # any decode failure of stored bytes is corruption
            raise self._corrupt(oid, str(exc) or type(exc).__name__) from None
        if _digest(_tensor_prefix(dtype, shape), data) != oid:
            raise self._corrupt(oid, "content does not match its hash")
        return RawTensor(dtype, shape, data)

    def get_mask(self, oid: str) -> np.ndarray:
        return self._mask(oid, *self._read(oid))

    def _mask(
        self, oid: str, kind: bytes, header: dict[str, Any], frames: list[memoryview]
    ) -> np.ndarray:
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
        return self._json(oid, *self._read(oid))

    def _json(self, oid: str, kind: bytes, header: dict[str, Any], frames: list[memoryview]) -> Any:
        try:
            if kind != b"J" or len(frames) != 1:
                raise ValueError("not a JSON object")
            body = codec.decompress(frames[0])
        except Exception as exc:
            raise self._corrupt(oid, str(exc) or type(exc).__name__) from None
        if _digest(b"json\0", body) != oid:
            raise self._corrupt(oid, "content does not match its hash")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:  # hashes fine, but was never JSON
            raise self._corrupt(oid, f"not JSON: {type(exc).__name__}") from None

    def verify(self, oid: str) -> None:
        """Decode and re-hash one object (its file read once); raises CorruptObjectError when
        it is damaged."""
        self._check(oid, *self._read(oid))

    def _check(
        self, oid: str, kind: bytes, header: dict[str, Any], frames: list[memoryview]
    ) -> Any:
        decoders = {b"T": self._tensor, b"M": self._mask, b"J": self._json}
        if kind not in decoders:
            raise self._corrupt(oid, "unknown object kind")
        return decoders[kind](oid, kind, header, frames)
