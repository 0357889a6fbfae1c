"""Maintenance verbs: fsck and gc."""

from __future__ import annotations

import typer
from rich.markup import escape

from adapterdb.cli.history import JSON
from adapterdb.cli.output import console, emit_json, human_bytes
from adapterdb.storage.store import Store


def fsck(as_json: bool = JSON) -> None:
    """Re-hash every object and check every reference; exit 1 if anything is wrong."""
    store = Store.find()
    total = sum(1 for _ in store.objects.ids())
    with console.status(f"verifying {total} objects", spinner="dots"):
        report = store.fsck()
    if as_json:
        emit_json(
            {
                "objects": report.objects,
                "ok": report.ok,
                "errors": report.errors,
                "notes": report.notes,
            }
        )
    else:
        for line in report.errors:
            console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
        for line in report.notes:
            console.print(f"note: {line}")
        state = "ok" if report.ok else f"{len(report.errors)} problem(s)"
        console.print(f"checked {report.objects} objects: {state}")
    if not report.ok:
        raise typer.Exit(1)


def gc(
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only say what would go."),
    grace: float = typer.Option(
        3600.0, "--grace", help="Keep unreachable objects younger than this many seconds."
    ),
    as_json: bool = JSON,
) -> None:
    """Delete objects no ref or reflog entry reaches (and temp files of interrupted writes)."""
    store = Store.find()
    report = store.gc(dry_run=dry_run, grace=grace)
    if as_json:
        emit_json(
            {
                "dry_run": dry_run,
                "reachable": report.reachable,
                "removed": report.removed,
                "bytes_freed": report.bytes_freed,
                "temp_files": report.temp_files,
            }
        )
        return
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{verb} {len(report.removed)} object(s) ({human_bytes(report.bytes_freed)}) and "
        f"{len(report.temp_files)} temp file(s); {report.reachable} reachable kept"
    )


def register(app: typer.Typer) -> None:
    app.command()(fsck)
    app.command()(gc)
