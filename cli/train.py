"""Training verbs: train (evaluation verbs live in cli/evaluate.py)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from adapterdb.cli.checks import at_least
from adapterdb.cli.history import WRITE_JSON, emit_written
from adapterdb.cli.output import console, err_console, short, status_console
from adapterdb.errors import AdbError
from adapterdb.storage.refs import branch_name
from adapterdb.storage.store import Store
from adapterdb.trainers.branchstate import EXPERTS

THREADS = typer.Option(
    None, "--threads", envvar="ADB_THREADS", help="CPU threads for torch (default: see README)."
)


def set_threads(threads: int | None) -> None:
    """One torch thread by default on CPU: measured fastest on this shared 2-core machine.

    `--threads 0` or a negative count is refused (torch raised a traceback; 0 meant default)."""
    import torch

    at_least("--threads", threads, 1, "the number of CPU threads")
    default = os.environ.get("ADB_DEFAULT_THREADS", "1")
    if not default.strip().isdigit() or int(default) < 1:
        raise AdbError(
            f"ADB_DEFAULT_THREADS={default!r} is not a thread count; set it to 1 or more"
        )
    torch.set_num_threads(threads or int(default))


def train(
    task_file: Path = typer.Argument(..., help="task.yaml"),
    branch: str = typer.Option(
        None, "--branch", "-b", help="Branch whose global adapter to start from."
    ),
    threads: int = THREADS,
    as_json: bool = WRITE_JSON,
) -> None:
    """Train an expert on one task (PAM alignment on), commit it; the global stays as it is."""
    from adapterdb.trainers.config import load_task

    store = Store.find()
    branch = branch_name(branch) if branch else store.refs.current_branch()
    task = load_task(task_file)  # a bad task file fails before torch is imported (seconds)
    from adapterdb.trainers.loop import train as run_training

    set_threads(threads)
    columns = (
        TextColumn(f"[bold]{task.name}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("misaligned {task.fields[mis]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=status_console(as_json), transient=True) as bar:
        handle = bar.add_task("train", total=None, loss=float("nan"), mis="-")

        def progress(step: int, total: int, loss: float, mis: float | None) -> None:
            bar.update(
                handle,
                completed=step,
                total=total,
                loss=loss,
                mis="-" if mis is None else f"{mis:.2%}",
            )

        result = run_training(task, store, branch, progress)
    if result.commit_id is None:
        return  # not the main process
    for flag in result.flags:
        err_console.print(f"warning: {flag.message}", markup=False, style="yellow", soft_wrap=True)
    align = (
        "off"
        if not task.align.enabled
        else (result.align_skipped and f"skipped: {result.align_skipped}")
        or (
            f"{len(result.align)} checks, last reset {result.align[-1]['reset_fraction']:.2%}"
            if result.align
            else "no check ran"
        )
    )
    if as_json:
        warnings = [flag.message for flag in result.flags]
        emit_written(store, result.commit_id, f"{EXPERTS}{branch}/{task.name}", warnings)
        return
    console.print(
        f"[experts/{branch}/{task.name} {short(result.commit_id)}] {result.steps} steps on "
        f"{result.device} in {result.seconds:.1f}s, A_t = {result.accuracy:.4f}, "
        f"alignment: {align}",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command()(train)
