"""Output folders written as a unit: an adapter's config and weights appear together or not.

`checkout`, `merge -o`, `decouple` and `align` write two files that only mean something
together (weights without their config, or new weights beside an old config, load wrong or not
at all). Renaming each file into place on its own, a kill between the two renames leaves such
a pair. So the files are written into a stage folder *beside* the output
(`.NAME.adb-PID-RAND.new`, never a hidden file inside it), each fsynced, and then:

- the output does not exist or is empty (the usual case): the stage folder is renamed onto
  it, one atomic step;
- the output holds other files (a `--force` overwrite, a checkpoint folder): the stage folder
  is first renamed `….ready` (complete, durable), then its files are moved in one by one and
  it is removed. A kill in between leaves the `.ready` folder: the next write to the same
  output finishes the moves, and reading the output meanwhile is refused (`check_complete`).

A stage still named `.new` whose writer is dead is an interrupted write: the next write to that
output deletes it. Nothing is ever left inside the output folder itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from adapterdb import failpoints
from adapterdb.durable import fsync_dir, pid_alive
from adapterdb.errors import AdbError

_STAGE = re.compile(r"\.(?P<name>.+)\.adb-(?P<pid>\d+)-[0-9a-f]+\.(?P<state>new|ready)")


def _stages(out: Path) -> list[tuple[Path, int, str]]:
    """Stage folders beside `out` (or inside it, see `write_folder`): (path, writer pid,
    'new' or 'ready')."""
    found = []
    for folder in (out.parent, out):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
            for entry in os.scandir(folder):
                m = _STAGE.fullmatch(entry.name)
                if m and m["name"] == out.name:
                    found.append((Path(entry.path), int(m["pid"]), m["state"]))
    return found


def _move_in(stage: Path, out: Path) -> None:
    """Move a complete stage's files into `out` (weights before config: PEFT needs both) and
    remove the stage; running it again after a kill finishes the job. Past the first move
    there is no way back (the old files are replaced), so a failure is met by finishing the
    moves once more before it is reported: the folder is then new and whole, not a mix."""

    def moves() -> None:
        for name in sorted(os.listdir(stage), key=lambda n: n.endswith(".json")):
            failpoints.hit("output.move")
            os.replace(stage / name, out / name)
        stage.rmdir()
        fsync_dir(out, "output")

    try:
        moves()
    except BaseException:
        if stage.is_dir():
            with contextlib.suppress(OSError):
                moves()
        raise


def recover(out: Path) -> None:
    """Finish or undo what a killed write to `out` left beside it (writers still alive are
    left alone): a complete `.ready` stage is moved in, an incomplete `.new` one deleted."""
    for stage, pid, state in _stages(out):
        if pid_alive(pid) and pid != os.getpid():
            continue
        if state == "ready" and out.is_dir():
            _move_in(stage, out)
        else:
            shutil.rmtree(stage, ignore_errors=True)
    for name in os.listdir(out) if out.is_dir() else []:  # temp files of older versions
        m = re.fullmatch(r"\..+\.tmp(\d+)", name)
        if m and not pid_alive(int(m[1])):
            with contextlib.suppress(OSError):
                os.unlink(out / name)


def check_complete(folder: Path) -> None:
    """Refuse to read an output whose last write was cut off between its files."""
    if any(state == "ready" for _, _, state in _stages(folder.absolute())):
        raise AdbError(
            f"{folder} was being written when its writer stopped (some files are new, some "
            "old); write it again (e.g. rerun the checkout with --force)"
        )


def write_folder(out: str | os.PathLike[str], files: Mapping[str, Callable[[Path], None]]) -> Path:
    """Write `files` (file name -> function writing that file, fsynced, at the path it gets)
    into the folder `out` as one unit; other files already in `out` stay."""

    def fill(stage: Path) -> None:
        for name, write in files.items():
            failpoints.hit("output.write")
            write(stage / name)

    return write_staged(out, fill)


def write_staged(out: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Write the folder `out` as one unit: `fill(stage)` writes every file of it into an empty
    stage folder and fsyncs them, for writers that name their own files (`save_pretrained`);
    other files already in `out` stay."""
    out = Path(out).absolute()
    if out.is_symlink():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise AdbError(f"{out} is a file, not a folder; pass a folder to write the adapter to")
    check_outside_stores(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    stage = out.parent / f".{out.name}.adb-{tag}.new"
    try:
        stage.mkdir()
    except PermissionError:  # a folder we may write in, inside one we may not: stage inside
        if not out.is_dir():
            raise
        stage = out / stage.name
        stage.mkdir()
    try:
        fill(stage)
        fsync_dir(stage, "output")
        in_place = stage.parent == out or out == Path.cwd()  # never swap a folder in use
        if not in_place and (not out.is_dir() or not any(out.iterdir())):
            was_empty_folder = out.is_dir()
            failpoints.hit("output.rename")
            os.rename(stage, out)  # onto a missing or empty folder: atomic
            try:
                fsync_dir(out.parent, "output")
            except BaseException:  # not durable: take it back, so the error means "unchanged"
                os.rename(out, stage)
                if was_empty_folder:
                    out.mkdir()
                raise
            return out
        ready = stage.with_suffix(".ready")
        failpoints.hit("output.rename")
        os.rename(stage, ready)
        stage = ready
        fsync_dir(stage.parent, "output")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _move_in(stage, out)  # from here on a failure is finished by the next write, not undone
    return out


def store_holding(path: Path) -> Path | None:
    """The adb store folder (`.adb`, or a bare store: a folder with `FORMAT` and `objects/`)
    that `path` is, or lies inside; None if there is none."""
    for folder in (path.resolve(), *path.resolve().parents):
        if (folder / "FORMAT").is_file() and (folder / "objects").is_dir():
            return folder
    return None


def check_outside_stores(path: Path) -> None:
    """Refuse to write user files into a store: the store reads every folder of its own
    (refs/, pins/, tmp/, objects/) as its state, so an adapter written there breaks
    later commands while `fsck` still passes."""
    store = store_holding(path)
    if store is not None:
        raise AdbError(
            f"{path} is inside the adb store {store}; write it to a folder outside the store"
        )


def write_text(path: Path, text: str) -> None:
    """A small file written and fsynced (the stage folder makes it atomic)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
