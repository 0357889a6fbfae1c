"""Mutable state: refs (branches, tags), HEAD and the reflog.

Everything else in the store is immutable, so this is the only place that needs care. Updates
take an exclusive `flock` on `lock` (the kernel drops it if the writer dies, so a killed
process never leaves a stale lock) and compare-and-swap the expected old value: two writers
never lose a commit, the loser gets a `ConflictError` and may retry onto the new head.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adapterdb.errors import AdbError, ConflictError
from adapterdb.storage.objects import atomic_write, fsync_dir

HEADS, TAGS = "refs/heads/", "refs/tags/"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+@=-]*(/[A-Za-z0-9_][A-Za-z0-9_.+@=-]*)*$")


def check_ref_name(name: str, what: str = "branch") -> str:
    """Git-like ref-name rules: path segments of safe characters, no '..', no '.lock'."""
    if (
        not name
        or len(name) > 200
        or ".." in name
        or name.endswith((".lock", "."))
        or not _NAME_RE.fullmatch(name)
        or name == "HEAD"
    ):
        raise AdbError(
            f"'{name}' is not a valid {what} name; use letters, digits, '-', '_', '.' and '/' "
            "between segments (no '..', no spaces or control characters)"
        )
    return name


@dataclass(frozen=True)
class ReflogEntry:
    old: str | None
    new: str | None
    time: float
    message: str


class RefStore:
    """Refs, HEAD and reflog under one store root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock_path = root / "lock"

    @contextmanager
    def locked(self) -> Iterator[None]:
        with open(self.lock_path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- reading ---------------------------------------------------------------------------

    def read(self, ref: str) -> str | None:
        """The commit id a full ref name (`refs/heads/main`) points at, or None."""
        try:
            value = (self.root / ref).read_text().strip()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return value or None

    def list(self, prefix: str) -> dict[str, str]:
        """Short name -> commit id for every ref under `prefix` (`refs/heads/`)."""
        base = self.root / prefix
        out: dict[str, str] = {}
        if base.is_dir():
            for p in sorted(base.rglob("*")):
                if p.is_file() and not p.name.startswith("."):
                    name = p.relative_to(base).as_posix()
                    value = self.read(prefix + name)
                    if value:
                        out[name] = value
        return out

    def head(self) -> tuple[str | None, str | None]:
        """(branch ref HEAD names or None when detached, commit id or None for an empty branch)."""
        text = (self.root / "HEAD").read_text().strip()
        if text.startswith("ref: "):
            ref = text[5:]
            return ref, self.read(ref)
        return None, text or None

    def current_branch(self) -> str:
        ref, _ = self.head()
        if ref is None or not ref.startswith(HEADS):
            raise AdbError("HEAD is detached; name a branch with --branch")
        return ref[len(HEADS) :]

    # -- writing ---------------------------------------------------------------------------

    def set_head(self, branch: str) -> None:
        with self.locked():
            atomic_write(self.root / "HEAD", [f"ref: {HEADS}{check_ref_name(branch)}\n".encode()])

    def update(self, ref: str, new: str | None, expected: str | None, message: str) -> None:
        """Compare-and-swap `ref` from `expected` to `new` (None deletes), with a reflog line."""
        with self.locked():
            current = self.read(ref)
            if current != expected:
                raise ConflictError(
                    f"{ref} moved to {(current or 'nothing')[:12]} while this command ran "
                    f"(expected {(expected or 'nothing')[:12]}); run it again"
                )
            path = self.root / ref
            if new is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, [f"{new}\n".encode()])
            fsync_dir(path.parent)
            self._log(ref, current, new, message)

    def _log(self, ref: str, old: str | None, new: str | None, message: str) -> None:
        path = self.root / "logs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        msg = " ".join(message.split())
        line = f"{old or '-'} {new or '-'} {time.time():.3f}\t{msg}\n"
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def reflog(self, ref: str) -> list[ReflogEntry]:
        path = self.root / "logs" / ref
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                head, message = line.split("\t", 1)
                old, new, stamp = head.split(" ")
            except ValueError:
                continue  # a torn last line from a crash mid-append carries no commit
            out.append(
                ReflogEntry(
                    None if old == "-" else old, None if new == "-" else new, float(stamp), message
                )
            )
        return out

    def reflog_refs(self) -> list[str]:
        base = self.root / "logs"
        return (
            [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
            if base.is_dir()
            else []
        )
