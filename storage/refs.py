"""Mutable state: refs (branches, tags), HEAD and the reflog.

Everything else in the store is immutable, so this is the only place that needs care. Updates
take an exclusive `flock` on `lock` (the kernel drops it if the writer dies, so a killed
process never leaves a stale lock) and compare-and-swap the expected old value: two writers
never lose a commit, the loser gets a `ConflictError` and may retry onto the new head.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adapterdb import failpoints
from adapterdb.durable import fsync_dir
from adapterdb.errors import AdbError, ConflictError, CorruptStateError, NotFoundError
from adapterdb.storage.objects import TMP_DIR, atomic_write, sweep_leftovers

HEADS, TAGS = "refs/heads/", "refs/tags/"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+@=-]*(/[A-Za-z0-9_][A-Za-z0-9_.+@=-]*)*$")
OID_RE = re.compile(r"[0-9a-f]{64}")
_REFLOG_RE = re.compile(
    rb"(-|[0-9a-f]{64}) (-|[0-9a-f]{64}) (\d{1,12}(?:\.\d{1,9})?)\t([^\t\n]*)\Z"
)
REPAIR_HINT = "run `adb fsck --repair` to restore it from the reflog"


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


def branch_name(name: str) -> str:
    """A branch given as `main` or by its full ref name `refs/heads/main` (as git accepts
    both), checked, without the prefix: `--into refs/heads/main` must not make a branch named
    `refs/heads/main`."""
    return check_ref_name(name.removeprefix(HEADS))


@dataclass(frozen=True)
class ReflogEntry:
    old: str | None
    new: str | None
    time: float
    message: str


@dataclass(frozen=True)
class Reflog:
    """A reflog file as read: its entries and the lines that are not entries (a torn last
    line from a crash mid-append is neither: it carries no commit and is dropped)."""

    entries: list[ReflogEntry]
    bad_lines: list[int]  # 1-based line numbers
    path: Path

    def problems(self) -> list[str]:
        return [
            f"{self.path} line {n} is not a reflog entry (old new time<TAB>message); "
            "run `adb fsck --repair` to drop it"
            for n in self.bad_lines
        ]


def _parse_reflog_line(line: bytes) -> ReflogEntry | None:
    """One entry, or None. The entry may follow a torn line that a crash left unterminated
    (the next append continues that line); the torn prefix carries no commit, the entry does."""
    m = _REFLOG_RE.search(line)
    if m is None:
        return None
    try:
        message = m[4].decode()
    except UnicodeDecodeError:
        return None
    old, new = (None if v == b"-" else v.decode() for v in (m[1], m[2]))
    return ReflogEntry(old, new, float(m[3]), message)


def _reflog_line(e: ReflogEntry) -> str:
    """`old new time<TAB>message` (`-` for no commit; the message on one line)."""
    return f"{e.old or '-'} {e.new or '-'} {e.time:.3f}\t{' '.join(e.message.split())}\n"


def shown(raw: bytes) -> str:
    """A damaged file's bytes for a one-line message: short, escaped, never a newline."""
    text = raw.decode("utf-8", "backslashreplace")
    return repr(text[:24] + ("..." if len(text) > 24 else ""))


class RefStore:
    """Refs, HEAD and reflog under one store root."""

    def __init__(self, root: Path, exists: Callable[[str], bool] | None = None) -> None:
        self.root = root
        self.lock_path = root / "lock"
        # how `update` checks, under the lock, that a ref's new commit is stored (gc sweeps
        # under the same lock, so a commit it removes can never become a ref's value)
        self.exists = exists

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
        """The commit id a full ref name (`refs/heads/main`) points at, or None if no such ref.

        A ref file that exists but does not hold a commit id (empty, truncated, garbage) is
        damage, not "no branch": treating it as absent would start a new root commit and cut
        the history off, so it raises `CorruptStateError`.
        """
        path = self.root / ref
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        value = raw.strip()
        if OID_RE.fullmatch(value.decode("latin-1")):
            return value.decode()
        what = "is empty" if not value else f"holds {shown(raw)}, not a 64-hex commit id"
        raise CorruptStateError(f"ref {ref} is broken: {path} {what}; {REPAIR_HINT}")

    def scan(self, prefix: str) -> tuple[dict[str, str], dict[str, str]]:
        """Every ref under `prefix` (`refs/heads/`): (short name -> commit id, short name ->
        what is wrong) -- listings show broken refs instead of hiding them."""
        base = self.root / prefix
        good: dict[str, str] = {}
        broken: dict[str, str] = {}
        if base.is_dir():
            for p in sorted(base.rglob("*")):
                if p.is_file() and not p.name.startswith("."):
                    name = p.relative_to(base).as_posix()
                    try:
                        value = self.read(prefix + name)
                    except CorruptStateError as exc:
                        broken[name] = str(exc)
                        continue
                    if value:
                        good[name] = value
        return good, broken

    def list(self, prefix: str) -> dict[str, str]:
        """Short name -> commit id for every ref under `prefix`; raises if one is broken."""
        good, broken = self.scan(prefix)
        if broken:
            raise CorruptStateError(next(iter(broken.values())))
        return good

    def head_ref(self) -> tuple[str | None, str | None]:
        """HEAD alone, its target not read: (branch ref, None), or (None, commit) if detached."""
        path = self.root / "HEAD"
        fix = f"write 'ref: {HEADS}main' (or another branch) into it or run `adb fsck --repair`"
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise CorruptStateError(f"HEAD is missing: {path} does not exist; {fix}") from None
        text = raw.decode("latin-1").strip()
        if text.startswith(f"ref: {HEADS}"):
            try:
                return HEADS + check_ref_name(text[len(HEADS) + 5 :]), None
            except AdbError:
                pass
        elif OID_RE.fullmatch(text):
            return None, text
        raise CorruptStateError(
            f"HEAD is broken: {path} holds {shown(raw)}, not 'ref: {HEADS}NAME' or a commit id; "
            f"{fix}"
        )

    def head(self) -> tuple[str | None, str | None]:
        """(branch ref HEAD names or None when detached, commit id or None for an empty branch)."""
        ref, oid = self.head_ref()
        return (ref, self.read(ref)) if ref else (None, oid)

    def current_branch(self, option: str = "--branch") -> str:
        """HEAD's branch, as git commits and merges into the checked-out one; `option` is how
        the caller's user names a branch instead (`--into BRANCH` for `adb merge`)."""
        ref, _ = self.head()
        if ref is None or not ref.startswith(HEADS):
            raise AdbError(
                f"HEAD is detached; name the branch with {option} BRANCH "
                "(or switch to one: adb branch NAME --switch)"
            )
        return ref[len(HEADS) :]

    # -- writing ---------------------------------------------------------------------------

    def set_head(self, branch: str) -> None:
        """Point HEAD at `branch`; on a failure HEAD is left as it was."""
        with self.locked():
            sweep_leftovers(self.root)
            self.write_head(branch)

    def write_head(self, branch: str) -> None:
        """`set_head` for a caller that holds `locked()` already (`fsck --repair`)."""
        text = f"ref: {HEADS}{check_ref_name(branch)}\n".encode()
        path = self.root / "HEAD"
        try:
            old: bytes | None = path.read_bytes()
        except FileNotFoundError:  # a missing HEAD is what `branch --switch` repairs
            old = None
        moved = False
        try:
            atomic_write(path, [text], tmp_dir=self.root / TMP_DIR, label="head")
            moved = True
            fsync_dir(self.root, "head")
        except BaseException:
            if moved:  # written but not durable: put the old HEAD back
                with contextlib.suppress(Exception):
                    if old is None:
                        path.unlink()
                    else:
                        atomic_write(path, [old], tmp_dir=self.root / TMP_DIR, label="head")
            raise

    def update(self, ref: str, new: str | None, expected: str | None, message: str) -> None:
        """Compare-and-swap `ref` from `expected` to `new` (None deletes), with a reflog line.

        The reflog line is appended and fsynced *before* the ref moves (as git does): a ref
        never moves without its history, and a failure after the append (disk full at the
        rename) undoes the line, so a command that exits non-zero has moved nothing and a
        retry commits once. Only a kill between the two leaves a line for a move that did not
        happen: it names a stored commit, so it costs nothing but that commit's space until the
        reflog expires. A failure after the rename (its folder fsync) puts the old value back.
        """
        with self.locked():
            sweep_leftovers(self.root)
            failpoints.hit("ref.cas")
            current = self.read(ref)
            if current != expected:
                raise ConflictError(
                    f"{ref} moved to {(current or 'nothing')[:12]} while this command ran "
                    f"(expected {(expected or 'nothing')[:12]}); run it again"
                )
            if new is not None and self.exists is not None and not self.exists(new):
                raise NotFoundError(
                    f"commit {new[:12]} is not in the store (a concurrent gc may have removed "
                    "it); run the command again"
                )
            self.move(ref, current, new, message)

    def move(self, ref: str, current: str | None, new: str | None, message: str) -> None:
        """Move `ref` from `current` to `new` without comparing: the second half of `update`,
        for a caller that holds `locked()` and knows better than the ref file (`fsck --repair`
        of a ref that holds garbage). Reflog line first; a failure takes back both."""
        path = self.root / ref
        undo_log = self._log(ref, current, new, message)
        moved = False
        try:
            if new is None:
                failpoints.hit("ref.delete")
                path.unlink(missing_ok=True)
            else:
                self._write_ref(path, new)
            moved = True
            fsync_dir(path.parent, "ref")
        except BaseException:
            with contextlib.suppress(Exception):
                if moved:
                    self._put_back(path, current)
                undo_log()
            raise

    def _write_ref(self, path: Path, value: str) -> None:
        atomic_write(path, [f"{value}\n".encode()], tmp_dir=self.root / TMP_DIR, label="ref")

    def _put_back(self, path: Path, old: str | None) -> None:
        """Undo a ref move whose durability failed, so the command's error means "unchanged"."""
        if old is None:
            path.unlink(missing_ok=True)
        else:
            self._write_ref(path, old)
        with contextlib.suppress(OSError):
            fsync_dir(path.parent, "ref")

    def _log(self, ref: str, old: str | None, new: str | None, message: str) -> Callable[[], None]:
        """Append one reflog line, fsynced; returns what takes it back out again."""
        path = self.root / "logs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        line = _reflog_line(ReflogEntry(old, new, time.time(), message)).encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        created = size == 0

        def undo() -> None:
            if created:
                path.unlink(missing_ok=True)
            else:
                os.truncate(path, size)

        try:
            half = len(line) // 2
            os.write(fd, line[:half])  # a failure in the middle leaves a torn line, as a crash
            failpoints.hit("reflog.append")
            view = memoryview(line)[half:]
            while view:
                view = view[os.write(fd, view) :]
            failpoints.hit("reflog.fsync")
            os.fsync(fd)
            if created:
                fsync_dir(path.parent, "reflog")
        except BaseException:
            with contextlib.suppress(OSError):
                undo()
            raise
        finally:
            os.close(fd)
        return undo

    def write_reflog(self, ref: str, entries: list[ReflogEntry]) -> None:
        """Replace `ref`'s reflog by `entries` (gc's expiry; call under `locked`); none
        removes the file."""
        path = self.root / "logs" / ref
        if not entries:
            failpoints.hit("reflog.expire")
            path.unlink(missing_ok=True)
            return
        text = "".join(_reflog_line(e) for e in entries)
        atomic_write(path, [text.encode()], tmp_dir=self.root / TMP_DIR, label="reflog")

    def reflog(self, ref: str) -> list[ReflogEntry]:
        """The entries of `ref`'s reflog, oldest first; raises on a damaged line."""
        log = self.read_reflog(ref)
        if log.bad_lines:
            raise CorruptStateError(log.problems()[0])
        return log.entries

    def read_reflog(self, ref: str) -> Reflog:
        """Every line of `ref`'s reflog parsed; damaged ones are reported, never skipped
        silently (gc keeps what the reflog names, so an unread line could lose a commit)."""
        path = self.root / "logs" / ref
        try:
            lines = path.read_bytes().split(b"\n")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return Reflog([], [], path)
        lines.pop()  # b"" after the final newline, or a torn last line (a crash mid-append)
        entries, bad = [], []
        for number, line in enumerate(lines, 1):
            entry = _parse_reflog_line(line)
            if entry is None:
                bad.append(number)
            else:
                entries.append(entry)
        return Reflog(entries, bad, path)

    def reflog_refs(self) -> list[str]:
        base = self.root / "logs"
        return (
            [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
            if base.is_dir()
            else []
        )
