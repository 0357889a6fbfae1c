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
