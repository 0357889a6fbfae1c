"""trainers/parallel.py: jobs in worker processes, their lines relayed, failures raised.

The jobs are module-level functions of this file: workers import them by name."""

from __future__ import annotations

import os

import pytest

from adapterdb.errors import AdbError
from adapterdb.trainers.parallel import run_jobs


def speak(word: str, say) -> None:
    import torch

    say(f"{word} from {os.getpid()} with {torch.get_num_threads()} thread(s)")


def fail(say) -> None:
    say("about to fail")
    raise AdbError("job failed on purpose")


def test_lines_reach_the_caller_and_the_first_failure_is_raised() -> None:
    lines: list[str] = []
    with pytest.raises(AdbError, match="job failed on purpose"):
        run_jobs([(speak, ("one",)), (fail, ())], 1, lines.append)
    assert "about to fail" in lines
    (spoken,) = [line for line in lines if line.startswith("one from ")]
    pid = int(spoken.split()[2])
    assert pid != os.getpid() and spoken.endswith("with 1 thread(s)")


def linger(path: str, say) -> None:
    """Writes its pid, then outlives any test unless something ends it."""
    import time
    from pathlib import Path

    Path(path).write_text(str(os.getpid()))
    time.sleep(120)


def test_workers_end_when_the_caller_is_killed(tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    marker = tmp_path / "worker.pid"
    driver = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from test_parallel import linger; from adapterdb.trainers.parallel import run_jobs; "
        f"run_jobs([(linger, ({str(marker)!r},))], 1, print)"
    )
    caller = subprocess.Popen([sys.executable, "-c", driver])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() or not marker.read_text():
            assert time.monotonic() < deadline and caller.poll() is None, "no worker started"
            time.sleep(0.1)
        worker = int(marker.read_text())
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait()
        deadline = time.monotonic() + 10
        while _running(worker):
            assert time.monotonic() < deadline, f"worker {worker} outlived its caller"
            time.sleep(0.1)
    finally:
        if caller.poll() is None:
            caller.kill()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited worker waits for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
