"""adb's memory policy: big freed blocks stay in the heap instead of going back to the OS."""

from __future__ import annotations

import subprocess
import sys

from adapterdb.memory import keep_freed_memory

# In a fresh interpreter: allocate 8 MiB (numpy -> malloc) and report how many bytes glibc
# serves from mmap (mallinfo2.hblkhd) while it is alive, with or without the policy first.
PROBE = """
import ctypes, sys
import numpy as np
from adapterdb.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "policy":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
block = np.ones(8 << 20, dtype=np.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


def mmapped_growth(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_big_blocks_come_from_the_heap_under_the_policy() -> None:
    assert keep_freed_memory() is True
    assert mmapped_growth("default") >= 8 << 20  # glibc's default: its own mmap, unmapped on free
    assert mmapped_growth("policy") == 0  # reused heap memory, kept when freed
