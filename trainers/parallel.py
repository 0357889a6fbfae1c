"""Independent jobs in worker processes, their progress lines relayed to the caller.

Workers are forked from a fork server, not from the caller: forking a process that has
started torch's thread pools (or CUDA) can deadlock the child. The server is a fresh process
that imports the jobs' modules once, before any torch work, so each worker starts without
paying for the imports again. Each worker runs one torch thread, so N workers use about N
cores. A job is a module-level function (it is pickled by name) and its arguments, called as
`fn(*args, say=...)`; whatever it says reaches the caller's `say`, in the caller's process,
while the jobs run.

Workers end themselves when the caller dies. A worker is the fork server's child, not the
caller's, so nothing else would stop it: killed `adb run`s were seen leaving workers that went
on training, committing into a store the user had meanwhile deleted and re-created. The store
takes a kill at any moment, so a worker that stops mid-job leaves it consistent.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing.queues import SimpleQueue
from typing import Any

Say = Callable[[str], None]
Job = tuple[Callable[..., None], tuple[Any, ...]]
_lines: SimpleQueue[str] | None = None  # in a worker: where its progress lines go
WATCH_SECONDS = 0.5  # how often a worker checks that the caller is still alive


def run_jobs(jobs: Sequence[Job], workers: int, say: Say) -> None:
    """Run every `(fn, args)` job on `workers` processes; raise the first failure.

    After a failure, jobs not yet started are cancelled and running ones finish (relaying
    their lines meanwhile, so none blocks on a full pipe): every job leaves the store
    consistent when it stops, so a re-run resumes from what they wrote.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(sorted({fn.__module__ for fn, _ in jobs}))
    lines: SimpleQueue[str] = ctx.SimpleQueue()
    failure: BaseException | None = None
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_start_worker, initargs=(lines, os.getpid())
    ) as pool:
        pending: set[Future[None]] = {pool.submit(_call, fn, args) for fn, args in jobs}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _relay(lines, say)
            for future in done:
                if failure is None and not future.cancelled() and future.exception():
                    failure = future.exception()
                    for other in pending:
                        other.cancel()
        _relay(lines, say)
    if failure is not None:
        raise failure


def _start_worker(lines: SimpleQueue[str], caller: int) -> None:
    """One torch thread per worker: the workers, not torch's threads, share the cores."""
    import torch

    global _lines
    _lines = lines
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with, args=(caller,), daemon=True).start()


def _exit_with(caller: int) -> None:
    """End this worker as soon as process `caller` is gone (polled: portable, no signals)."""
    while _alive(caller):
        time.sleep(WATCH_SECONDS)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _call(fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    assert _lines is not None, "jobs run only in workers started by run_jobs"
    fn(*args, say=_lines.put)


def _relay(lines: SimpleQueue[str], say: Say) -> None:
    while not lines.empty():
        say(lines.get())
