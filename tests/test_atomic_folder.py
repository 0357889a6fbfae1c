"""Output folders written as a unit (adapterdb/atomic_folder.py), in process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import lora_tensors, peft_config

from adapterdb.adapter import CONFIG_FILE, WEIGHTS_FILE, read_peft_raw, write_peft_raw
from adapterdb.atomic_folder import check_complete, write_folder
from adapterdb.errors import AdbError


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_new_empty_and_full_folders(tmp_path: Path) -> None:
    fresh, empty, full = tmp_path / "a" / "fresh", tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "README.md").write_text("mine")
    for out in (fresh, empty, full):
        write_peft_raw(out, peft_config(), lora_tensors(1))
        assert read_peft_raw(out)[1].keys() == lora_tensors(1).keys()
    assert names(full) == ["README.md", CONFIG_FILE, WEIGHTS_FILE]
    assert [p for p in tmp_path.rglob(".*")] == []  # no stage, no temp file anywhere


def test_current_folder_is_written_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty folder that is the working directory is not swapped for another inode."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    write_peft_raw(".", peft_config(), lora_tensors(2))
    assert here.stat().st_ino == inode and names(here) == [CONFIG_FILE, WEIGHTS_FILE]


def test_stage_inside_when_the_parent_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kw: object) -> None:
        if self.parent == tmp_path and self.name.startswith("."):
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    write_peft_raw(out, peft_config(), lora_tensors(3))
    assert names(out) == [CONFIG_FILE, WEIGHTS_FILE]


def test_leftovers_of_dead_writers_are_finished_or_dropped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_peft_raw(out, peft_config(), {})
    pid = dead_pid()
    new = tmp_path / f".out.adb-{pid}-aa.new"  # killed while writing: dropped
    new.mkdir()
    (new / WEIGHTS_FILE).write_bytes(b"partial")
    ready = tmp_path / f".out.adb-{pid}-bb.ready"  # killed while moving in: finished
    ready.mkdir()
    (ready / "extra.txt").write_text("late")
    (out / f".{WEIGHTS_FILE}.tmp{pid}").write_bytes(b"old version temp file")
    with pytest.raises(AdbError, match="was being written"):
        check_complete(out)
    write_folder(out, {"x.txt": lambda p: p.write_text("x")})
    assert not new.exists() and not ready.exists()
    assert names(out) == [CONFIG_FILE, WEIGHTS_FILE, "extra.txt", "x.txt"]
    check_complete(out)


def test_a_live_writers_stage_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    busy = tmp_path / f".out.adb-{os.getppid()}-cc.new"
    busy.mkdir()
    write_peft_raw(out, peft_config(), lora_tensors(1))
    assert busy.is_dir()


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(AdbError, match="not a folder"):
        write_peft_raw(tmp_path / "f", peft_config(), lora_tensors(1))
