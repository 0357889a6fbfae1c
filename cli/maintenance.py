"""Maintenance verbs: fsck and gc."""

from __future__ import annotations

import re

import typer
from rich.markup import escape

from adapterdb.cli.history import JSON
from adapterdb.cli.output import console, emit_json, human_bytes
from adapterdb.errors import AdbError
from adapterdb.storage.repair import RepairReport, repair
from adapterdb.storage.store import Store


def fsck(
    fix: bool = typer.Option(
        False, "--repair", help="First restore damaged refs, HEAD and reflogs from the reflog."
    ),
    as_json: bool = JSON,
) -> None:
    """Re-hash every object and check every reference; exit 1 if anything is wrong."""
    store = Store.find()
    repaired = repair(store) if fix else RepairReport()
    total = sum(1 for _ in store.objects.ids())
    with console.status(f"verifying {total} objects", spinner="dots"):
        report = store.fsck()
    if as_json:
        doc = {
            "objects": report.objects,
            "ok": report.ok,
            "errors": report.errors,
            "notes": report.notes,
        }
        if fix:
            doc.update(repaired=repaired.done, not_repaired=repaired.left)
        emit_json(doc)
    else:
        for line in repaired.done:
            console.print(f"[green]repaired:[/] {escape(line)}", soft_wrap=True)
        for line in repaired.left:
            console.print(f"[yellow]not repaired:[/] {escape(line)}", soft_wrap=True)
        for line in report.errors:
            console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
        for line in report.notes:
            console.print(f"note: {escape(line)}", soft_wrap=True)
        state = "ok" if report.ok else f"{len(report.errors)} problem(s)"
        console.print(f"checked {report.objects} objects: {state}")
    if not report.ok:
        raise typer.Exit(1)


def gc(
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only say what would go."),
    grace: float = typer.Option(
        3600.0,
        "--grace",
        help="Keep unreachable objects younger than this many seconds (0 is safe beside "
        "running writers: what they stored but have not committed yet is always kept).",
    ),
    expire: str = typer.Option(
        "90d",
        "--expire",
        help="Expire reflog entries older than this (30d, 12h, 2w, 3600, now, never); the "
        "reflogs of deleted branches and tags go whatever the age, unless 'never'.",
    ),
    as_json: bool = JSON,
) -> None:
    """Expire old reflog entries, then delete objects no ref or reflog entry reaches (and temp
    files of interrupted writes)."""
    age = parse_age(expire)
    store = Store.find()
    report = store.gc(dry_run=dry_run, grace=grace, expire=age)
    expired = sum(report.reflog_expired.values())
    if as_json:
        emit_json(
            {
                "dry_run": dry_run,
                "reachable": report.reachable,
                "removed": report.removed,
                "bytes_freed": report.bytes_freed,
                "temp_files": report.temp_files,
                "reflog_expired": report.reflog_expired,
                "reflog_entries_expired": expired,
            }
        )
        return
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{verb} {len(report.removed)} object(s) ({human_bytes(report.bytes_freed)}) and "
        f"{len(report.temp_files)} temp file(s); {report.reachable} reachable kept"
    )
    if expired:
        refs = ", ".join(f"{r} ({n})" for r, n in sorted(report.reflog_expired.items()))
        verb = "would expire" if dry_run else "expired"
        console.print(f"{verb} {expired} reflog entr{'y' if expired == 1 else 'ies'}: {refs}")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_UNIT_WORDS = {"second": "s", "minute": "m", "hour": "h", "day": "d", "week": "w"}


def parse_age(text: str) -> float | None:
    """'90d', '12h', '2.weeks.ago', '3600', 'now' -> seconds; 'never' -> None (git's forms)."""
    t = text.strip().lower().removesuffix(".ago")
    if t == "never":
        return None
    if t in ("now", "all"):
        return 0.0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*\.?\s*([a-z]*)", t)
    unit = m and (_UNIT_WORDS.get(m[2].rstrip("s"), m[2]) if len(m[2]) > 1 else m[2] or "s")
    if not m or unit not in _UNITS:
        raise AdbError(
            f"--expire {text!r} is not an age; use e.g. 90d, 12h, 2w, 3600 (seconds), now or never"
        )
    return float(m[1]) * _UNITS[unit]


def register(app: typer.Typer) -> None:
    app.command()(fsck)
    app.command()(gc)
