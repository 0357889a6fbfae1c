"""One process-wide pool of threads for work that waits on the disk or the network.

fsyncs and S3 requests spend their time waiting, not computing, so many threads overlap the
waits; but starting a thread is not free (2-4 ms each on a busy 2-core machine, measured),
and a lazy clone + checkout used to start three pools of 16 (the fetch walk, the on-demand
prefetch, the folder fsyncs): 0.14 s of its 0.4 s. This pool starts its threads once.

Only leaf work goes in: a task must never wait on another task of this pool (with every
thread busy waiting, the one it waits for would never start).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

WORKERS = 16  # requests in flight to hide object storage's per-request latency
_T = TypeVar("_T")
_POOL: list[ThreadPoolExecutor] = []
_LOCK = threading.Lock()


def _forget() -> None:
    """A forked child has none of the parent's threads: it starts its own pool."""
    global _LOCK
    _LOCK = threading.Lock()
    _POOL.clear()


os.register_at_fork(after_in_child=_forget)


def _pool() -> ThreadPoolExecutor:
    with _LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(WORKERS, thread_name_prefix="adb-io"))
        return _POOL[0]


def submit(fn: Callable[..., _T], *args: Any) -> Future[_T]:
    """One task; the caller must `settle` it before it returns or raises."""
    return _pool().submit(fn, *args)


def settle(futures: Iterable[Future[Any]]) -> None:
    """Wait for every task, then raise the first failure: a failed task never leaves others
    running behind the caller's back (writing into a folder a failed clone removes)."""
    futures = list(futures)
    wait(futures)
    for future in futures:
        future.result()


def run_all(fn: Callable[[Any], _T], items: Iterable[Any]) -> list[_T]:
    """`fn` over `items` in the pool: the results in order, once every call has ended."""
    futures = [submit(fn, item) for item in items]
    settle(futures)
    return [f.result() for f in futures]
