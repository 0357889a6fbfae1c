"""Named failpoints at every durable step of the writing verbs, for crash and full-disk tests.

A crash-safety claim ("a kill or a full disk at any moment leaves the old state or the new
one") is only as good as the moments it was tried at. Each step that makes something durable
(an object's temp write, its fsync, the rename, the folder fsync, the reflog append, the ref
compare-and-swap, a checkout's output, a gc unlink) calls `hit("step.name")` just before it
runs, so a test can make exactly that step fail:

    ADB_FAILPOINT=object.rename:enospc        # the first object rename fails: disk full
    ADB_FAILPOINT=ref.fsync_dir:kill:2        # SIGKILL at the second ref folder fsync
    ADB_FAILPOINT=object.write:eio:3          # the third object write fails with EIO

Actions: `enospc` and `eio` raise the `OSError` the kernel would; `kill` sends SIGKILL to the
process itself (no `finally`, no atexit, like a power cut for everything above the page cache).
The optional count (default 1) picks which hit fails; the others pass.

`ADB_FAILPOINT_RECORD=FILE` appends the name of every failpoint hit, one per line, so a test
can discover which failpoints a verb passes through and walk all of them: a failpoint added
later is walked without touching the test.

Unarmed (neither variable set, the normal case) `hit` is one global lookup and a return.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

from adapterdb.errors import AdbError

ENV = "ADB_FAILPOINT"
RECORD_ENV = "ADB_FAILPOINT_RECORD"
ACTIONS = ("enospc", "eio", "kill")


def _parse(spec: str) -> tuple[str, str, int]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or parts[1] not in ACTIONS:
        raise AdbError(f"{ENV}={spec!r} is not NAME:ACTION[:COUNT] with ACTION in {ACTIONS}")
    try:
        count = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        count = 0
    if count < 1:
        raise AdbError(f"{ENV}={spec!r}: COUNT must be a positive whole number")
    return parts[0], parts[1], count


_ARMED: tuple[str, str, int] | None = None
_BAD: AdbError | None = None  # a malformed spec is reported at the first step, as one line
try:
    _ARMED = _parse(os.environ[ENV]) if os.environ.get(ENV) else None
except AdbError as exc:
    _BAD = exc
_RECORD: str | None = os.environ.get(RECORD_ENV) or None
_ACTIVE = _ARMED is not None or _RECORD is not None or _BAD is not None
_lock = threading.Lock()
_hits = 0


def hit(name: str) -> None:
    """Mark the step `name` (about to run); fail here if a test armed this failpoint."""
    if _ACTIVE:
        _trigger(name)


def _trigger(name: str) -> None:
    global _hits
    if _BAD is not None:
        raise _BAD
    if _RECORD:
        fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name}\n".encode())
        finally:
            os.close(fd)
    if _ARMED is None or _ARMED[0] != name:
        return
    with _lock:
        _hits += 1
        if _hits != _ARMED[2]:
            return
    action = _ARMED[1]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (failpoint {name})")


def arm(spec: str | None, record: str | None = None) -> None:
    """Arm (or with None disarm) failpoints in this process: for in-process tests."""
    global _ARMED, _RECORD, _ACTIVE, _hits, _BAD
    _BAD = None
    _ARMED = _parse(spec) if spec else None
    _RECORD = record
    _ACTIVE = _ARMED is not None or _RECORD is not None
    _hits = 0
