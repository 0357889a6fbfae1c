"""What a hostile probe of the new verbs found: outputs, clones and remotes that land inside a
store's own folder (which it reads as its state), a file:// URL with a host, an endpoint that
is not a URL, and task names that cannot be addressed as refs. Each is one line, exit != 0,
and the store unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_peft, one_error_line, snapshot
from tiny_models import adb_in_process


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    make_peft(tmp_path / "a1", seed=1)
    for args in (["init"], ["import", "a1", "--task", "t1"]):
        rc, _, err = adb_in_process(args, tmp_path)
        assert rc == 0, err
    return tmp_path


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["checkout", "main", "-o", ".adb/tmp/o"], "inside the adb store"),
        (["checkout", "main", "-o", ".adb/refs/heads/x"], "inside the adb store"),
        (["clone", "shared", ".adb/tmp/c"], "inside the adb store"),
        (["init", ".adb/pins"], "inside the adb store"),
        (["remote", "add", "self", ".adb"], "is this store"),
        (["remote", "add", "self", "."], "is this store"),
        (["remote", "add", "inner", ".adb/pins/r"], "is this store"),
        (["remote", "add", "f1", "file://relative/x"], "names host 'relative'"),
        (["remote", "add", "s2", "s3://b/p", "--endpoint", "notaurl"], "not a URL"),
        (["import", "a1", "--task", "x~1", "--expert"], "is not allowed"),
        (["import", "a1", "--task", "z:w"], "is not allowed"),
        (["import", "a1", "--task", "main.lock"], "is not allowed"),
    ],
)
def test_refused_in_one_line_with_the_store_unchanged(ws: Path, args: list[str], says: str) -> None:
    shared = ws / "shared"
    if not shared.exists():
        rc, _, err = adb_in_process(["remote", "add", "origin", "shared"], ws)
        assert rc == 0, err
        rc, _, err = adb_in_process(["push"], ws)
        assert rc == 0, err
    before = snapshot(ws)
    rc, _, err = adb_in_process(args, ws)
    assert says in one_error_line(rc, err), err
    assert snapshot(ws) == before
