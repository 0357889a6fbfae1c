"""Durability primitives shared by the store and the adapter-folder writer.

They live in the core package because both `adapterdb.storage` (objects, refs) and
`adapterdb.atomic_folder` (checkout / merge -o outputs) make renames durable and must tell a
live writer's leftovers from a dead one's; imports only flow into `adapterdb`, never out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from adapterdb import failpoints, iopool


def fsync_dir(path: Path, label: str = "file") -> None:
    """Make a rename in `path` durable (POSIX needs the directory fsynced too)."""
    failpoints.hit(f"{label}.fsync_dir")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(paths: Iterable[Path], label: str = "file") -> None:
    """`fsync_dir` each folder, in parallel: each call waits on the disk, not the CPU, and the
    file system's journal commits concurrent ones together (measured on ext4: 44 object
    folders of a clone took 0.14 s one after another)."""
    iopool.run_all(lambda path: fsync_dir(path, label), paths)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
