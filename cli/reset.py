"""Undo verbs: reflog (where a ref has been) and reset (move HEAD's branch back there).

Undoing a bad merge is `adb reset main@{1}`: the reflog keeps every value a ref had, so the
commit a merge replaced stays reachable (gc keeps what a reflog names) and nameable.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from adapterdb.cli.history import JSON
from adapterdb.cli.output import console, emit_json, short, when
from adapterdb.errors import AdbError
from adapterdb.storage.refs import HEADS
from adapterdb.storage.store import Store


def reflog(
    ref: str = typer.Argument("HEAD", help="Branch, tag or full ref (default: HEAD's branch)."),
    limit: int = typer.Option(None, "-n", "--max-count", help="Show at most N entries."),
    as_json: bool = JSON,
) -> None:
    """Where a ref has pointed, newest first; NAME@{N} names the N-th entry for every verb."""
    store = Store.find()
    full = store.reflog_ref(ref)
    entries = store.refs.reflog(full)[::-1][: limit or None]
    name = full.removeprefix(HEADS) if ref in ("", "HEAD") else ref  # HEAD@{N} is its branch's
    rows = [
        {
            "selector": f"{name}@{{{i}}}",
            "ref": full,
            "old": e.old,
            "new": e.new,
            "time": e.time,
            "message": e.message,
        }
        for i, e in enumerate(entries)
    ]
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        console.print(
            f"{short(r['new']) or '(deleted)':<10} {escape(r['selector'])}: "
            f"{escape(r['message'])}  [dim]{when(r['time'])} UTC[/]",
            soft_wrap=True,
        )


def reset(
    rev: str = typer.Argument(..., help="Revision to move HEAD's branch to, e.g. main@{1}."),
) -> None:
    """Move HEAD's branch to REV (recorded in the reflog, so a reset is undone the same way)."""
    store = Store.find()
    ref, head = store.refs.head()
    if ref is None:
        raise AdbError("HEAD is detached: there is no branch to reset; switch to one first")
    target = store.resolve(rev)
    store.refs.update(ref, target, head, f"reset: moving to {rev}")
    message = store.read_commit(target).message
    console.print(
        f"{ref.removeprefix(HEADS)} is now at {short(target)} {message} "
        f"(was {short(head) or 'empty'})",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command()(reflog)
    app.command()(reset)
