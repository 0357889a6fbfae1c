"""Absurd option values are refused in one line, before any work, with the store unchanged.

Before (issue 12): `adb eval --top-k 0` silently routed to 1 expert, `adb run --orders 0` and
`adb run --methods ""` exited 0 having done nothing, `--threads -1` was a torch traceback and
`--threads 0` meant "default", `adb branch NAME START --switch` on an existing branch ignored
START, and `adb branch -d NAME START` ignored START.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_peft, one_error_line, snapshot
from tiny_models import adb_in_process

from adapterdb.storage.store import STORE_DIR, Store


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose main has two commits (imports of a, then b); HEAD on main."""
    root = tmp_path_factory.mktemp("params")
    make_peft(root / "a", 1)
    make_peft(root / "b", 2)
    (root / "repo").mkdir()
    for args in (["init"], ["import", "../a", "--task", "ta"], ["import", "../b", "--task", "tb"]):
        rc, _, err = adb_in_process(args, root / "repo")
        assert rc == 0, err
    return root / "repo"


# `run` gets a sequence file that does not exist: the option checks come first, so the answer
# names the option (before the fix these cases trained, or failed only on the missing file)
ABSURD = [
    (["eval", "--top-k", "0", "--routing", "condu"], "--top-k 0: the experts routed to"),
    (["eval", "--top-k", "-2", "--routing", "condu"], "--top-k -2"),
    (["eval", "--top-k", "2"], "--top-k only applies to --routing condu"),
    (["eval", "--routing", "magic"], "--routing 'magic' is not one of: none, condu"),
    (["eval", "--metrics", "--zero-shot"], "--metrics prints the accuracy matrix"),
    (["eval", "--threads", "0"], "--threads 0: the number of CPU threads must be >= 1"),
    (["eval", "--threads", "-1"], "--threads -1"),
    (["run", "missing.yaml", "--orders", "0"], "--orders 0: the number of task orders"),
    (["run", "missing.yaml", "--orders", "-3"], "--orders -3"),
    (["run", "missing.yaml", "--methods", ""], "--methods '' names no method"),
    (["run", "missing.yaml", "--methods", " , "], "names no method"),
    (["run", "missing.yaml", "--methods", "pam,ties,pam"], "--methods names pam twice"),
    (["run", "missing.yaml", "--top-k", "0"], "--top-k 0"),
    (["run", "missing.yaml", "--jobs", "0"], "--jobs 0: the number of worker processes"),
    (["run", "missing.yaml", "--threads", "-4"], "--threads -4"),
    (["branch", "main", "HEAD~1", "--switch"], "branch 'main' already exists (at "),
    (["branch", "main", "HEAD~1"], "pass -f to move it to HEAD~1"),
    (["branch", "-d", "main", "HEAD"], "-d deletes a branch; it takes no START"),
    (["branch", "--switch"], "name the branch"),
    (["align", "../a", "--against", "../b", "--report", "-o", "x"], "--report only inspects"),
]


@pytest.mark.parametrize(("args", "fragment"), ABSURD, ids=[" ".join(a) for a, _ in ABSURD])
def test_absurd_options_are_one_line_and_change_nothing(
    repo: Path, args: list[str], fragment: str
) -> None:
    before = snapshot(repo / STORE_DIR)
    rc, _, err = adb_in_process(args, repo)
    assert fragment in one_error_line(rc, err)
    assert snapshot(repo / STORE_DIR) == before


def test_branch_force_moves_an_existing_branch(repo: Path, tmp_path: Path) -> None:
    """-f is how START applies to an existing branch (like `git branch -f`); the old value
    stays in the reflog."""
    store = Store.open(repo)
    first, second = store.resolve("HEAD~1"), store.resolve("main")
    rc, out, err = adb_in_process(["branch", "side", "HEAD~1"], repo)
    assert rc == 0 and "created branch side" in out, err
    rc, out, err = adb_in_process(["branch", "side", "main", "-f", "--switch"], repo)
    assert rc == 0, err
    assert "moved branch side" in out and "HEAD is now on branch side" in out
    assert store.refs.read("refs/heads/side") == second != first
    rc, out, err = adb_in_process(["branch", "main", "--switch"], repo)
    assert rc == 0 and "HEAD is now on branch main" in out, err
    rc, out, err = adb_in_process(["branch", "-d", "side"], repo)
    assert rc == 0, err
