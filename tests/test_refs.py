"""Refs: compare-and-swap updates, the reflog, and the names that may become paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.errors import AdbError, ConflictError
from adapterdb.storage.commits import check_task_name
from adapterdb.storage.refs import HEADS, RefStore, check_ref_name
from adapterdb.storage.store import STORE_DIR

A, B, C = "a" * 64, "b" * 64, "c" * 64
MAIN = HEADS + "main"


@pytest.fixture
def refs(repo: Path) -> RefStore:
    return RefStore(repo / STORE_DIR)


def test_compare_and_swap(refs: RefStore) -> None:
    refs.update(MAIN, A, None, "first")
    with pytest.raises(ConflictError, match="moved"):
        refs.update(MAIN, B, None, "stale writer")  # expected 'nothing', but main is at A
    with pytest.raises(ConflictError):
        refs.update(MAIN, B, C, "stale writer")
    assert refs.read(MAIN) == A
    assert len(refs.reflog(MAIN)) == 1  # a refused update logs nothing
    refs.update(MAIN, B, A, "second")
    assert refs.read(MAIN) == B
    assert refs.head() == (MAIN, B)


def test_reflog_records_every_move(refs: RefStore) -> None:
    refs.update(MAIN, A, None, "create")
    refs.update(MAIN, B, A, "move\twith a tab\nand a newline")
    refs.update(MAIN, None, B, "delete")
    log = refs.reflog(MAIN)
    assert [(e.old, e.new) for e in log] == [(None, A), (A, B), (B, None)]
    assert [e.message for e in log] == ["create", "move with a tab and a newline", "delete"]
    assert log[0].time <= log[1].time <= log[2].time
    assert refs.read(MAIN) is None
    lines = (refs.root / "logs" / MAIN).read_text().splitlines()
    assert len(lines) == 3
    assert refs.reflog_refs() == [MAIN]


def test_reflog_ignores_a_torn_last_line(refs: RefStore) -> None:
    refs.update(MAIN, A, None, "create")
    with open(refs.root / "logs" / MAIN, "a") as f:
        f.write(f"{A} {B[:20]}")  # a writer killed mid-append
    assert [(e.old, e.new) for e in refs.reflog(MAIN)] == [(None, A)]


def test_list_skips_temp_files_and_nests(refs: RefStore) -> None:
    refs.update(HEADS + "team/feature", A, None, "x")
    refs.update(MAIN, B, None, "x")
    (refs.root / HEADS / ".tmp-123-main").write_text(C)
    assert refs.list(HEADS) == {"main": B, "team/feature": A}


def test_detached_head_has_no_current_branch(refs: RefStore) -> None:
    assert refs.current_branch() == "main"
    (refs.root / "HEAD").write_text(A + "\n")
    assert refs.head() == (None, A)
    with pytest.raises(AdbError, match="detached"):
        refs.current_branch()
    refs.set_head("dev")
    assert refs.current_branch() == "dev"


VALID = ["main", "v1.0", "feature/x-1", "a_b", "release/2024/q1", "x+y@z=w", "0"]
INVALID = [
    "",
    "HEAD",
    "..",
    "a..b",
    "../main",
    "a/../b",
    "/abs",
    "trail/",
    "a//b",
    "-flag",
    ".hidden",
    "x.lock",
    "dot.",
    "has space",
    "tab\there",
    "new\nline",
    "nul\0byte",
    "bell\x07",
    "del\x7f",
    "back\\slash",
    "star*",
    "q?",
    "colon:x",
    "tilde~1",
    "caret^",
    "a" * 201,
]


@pytest.mark.parametrize("name", VALID)
def test_valid_ref_names(name: str) -> None:
    assert check_ref_name(name) == name


@pytest.mark.parametrize("name", INVALID)
def test_invalid_ref_names(name: str) -> None:
    with pytest.raises(AdbError, match="not a valid branch name"):
        check_ref_name(name)


@settings(max_examples=60, deadline=None)
@given(name=st.text(alphabet=st.sampled_from("ab0./-_~^@+ \t\n\x00\\:*"), max_size=14) | st.text())
def test_accepted_ref_names_stay_inside_refs(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    base = tmp_path_factory.getbasetemp() / "refs" / "heads"
    try:
        check_ref_name(name)
    except AdbError:
        return
    assert ".." not in name and not any(ord(c) < 33 or ord(c) == 127 for c in name)
    resolved = (base / name).resolve()
    assert resolved.is_relative_to(base.resolve()) and resolved != base.resolve()
    assert "~" not in name and "^" not in name  # they would clash with HEAD~N syntax


@pytest.mark.parametrize(
    "name", ["a/b", "..", "../x", "a\\b", "tab\tx", "nl\nx", "\x01", "", ".x", "-x", " "]
)
def test_invalid_task_names(name: str) -> None:
    with pytest.raises(AdbError, match="task name"):
        check_task_name(name)


@pytest.mark.parametrize("name", ["sst2", "task-1", "cifar_10.v2", "Ünïcode"])
def test_valid_task_names(name: str) -> None:
    assert check_task_name(name) == name
