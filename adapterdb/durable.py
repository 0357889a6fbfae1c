"""Durability primitives shared by the store and the adapter-folder writer.

They live in the core package because both `adapterdb.storage` (objects, refs) and
`adapterdb.atomic_folder` (checkout / merge -o outputs) make renames durable and must tell a
live writer's leftovers from a dead one's; imports only flow into `adapterdb`, never out.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapterdb import failpoints


def fsync_dir(path: Path, label: str = "file") -> None:
    """Make a rename in `path` durable (POSIX needs the directory fsynced too)."""
    failpoints.hit(f"{label}.fsync_dir")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
