"""Process memory policy: keep freed buffers instead of handing them back to the OS.

glibc returns every freed block above its mmap threshold (128 KiB at start) to the kernel, and
the next tensor of that size page-faults its memory back in, zeroed. In a VM a fault costs
microseconds, so a merge that streams tensor by tensor, allocating results, chunks and random
masks of the same few sizes over and over, spends more time faulting than computing (measured
in bench/RESULTS.md, "Merge": a DARE keep-mask stream took 4.2–5.6 ns per element with the
default policy and 1.7–2.0 ns with this one). Raising the mmap and trim thresholds to glibc's
maximum (32 MiB) keeps such blocks in the heap for reuse. The cost is a resident size that
stays at its peak, which suits a command that exits when done; `adb` sets it at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_MAX_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit systems


def keep_freed_memory() -> bool:
    """Apply the policy (glibc only); False where the C library has no `mallopt`."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl builds, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, 2 * _MAX_MMAP_THRESHOLD)
    )
