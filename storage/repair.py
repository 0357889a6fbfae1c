"""`adb fsck --repair`: restore what the reflog can restore, and say what was done.

Objects are immutable and content-addressed, so a damaged one can only come back from a
backup. Mutable state can often be rebuilt: the reflog remembers every value a ref had, so a
ref that is empty, garbage, or names a commit that cannot be read goes back to the newest
value whose commit (and manifest) reads fine. Reflog lines that do not parse are dropped, and
reflog values naming a commit that is gone or can never be read (it hashes fine but breaks the
schema) are forgotten, as git's `reflog expire --stale-fix` does: they protect nothing, and
they would make gc refuse forever. A value whose object is damaged is kept (a backup may bring
it back). A missing or damaged HEAD points at a branch again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from adapterdb.errors import (
    AdbError,
    CorruptObjectError,
    CorruptStateError,
    SchemaViolationError,
)
from adapterdb.storage.refs import HEADS, ReflogEntry, shown
from adapterdb.storage.store import Store


@dataclass
class RepairReport:
    done: list[str] = field(default_factory=list)  # one line per change made
    left: list[str] = field(default_factory=list)  # damage the reflog cannot undo


def repair(store: Store) -> RepairReport:
    """Repair refs (from the reflogs), then the reflogs, then HEAD (it names a ref)."""
    report = RepairReport()
    with store.refs.locked():  # one lock for all of it: writes use move/write_head, not update
        _repair_refs(store, report)
        for ref in store.refs.reflog_refs():
            _repair_reflog(store, ref, report)
        _repair_head(store, report)
    return report


def _repair_reflog(store: Store, ref: str, report: RepairReport) -> None:
    """Rewrite a reflog without its unparseable lines and its values that are gone for good."""
    log = store.refs.read_reflog(ref)
    stale = {v for e in log.entries for v in (e.old, e.new) if v and _gone(store, v)}
    if not log.bad_lines and not stale:
        return
    lines = log.path.read_bytes().split(b"\n")
    entries = [_forget(e, stale) for e in log.entries]
    store.refs.write_reflog(ref, [e for e in entries if e.old or e.new])
    if log.bad_lines:
        dropped = ", ".join(f"{n}: {shown(lines[n - 1])}" for n in log.bad_lines)
        report.done.append(
            f"logs/{ref}: dropped {len(log.bad_lines)} unreadable line(s) ({dropped})"
        )
    if stale:
        gone = ", ".join(sorted(v[:12] for v in stale))
        report.done.append(
            f"logs/{ref}: forgot {len(stale)} commit(s) that cannot be read ({gone})"
        )


def _gone(store: Store, oid: str) -> bool:
    """Missing, or readable bytes that are not a valid commit: no backup can fix either."""
    if not store.objects.exists(oid):
        return True
    try:
        store.read_commit(oid)
    except SchemaViolationError:
        return True
    except CorruptObjectError:
        return False  # damaged bytes may come back from a backup
    except AdbError:
        return True  # not a commit at all
    return False


def _forget(entry: ReflogEntry, stale: set[str]) -> ReflogEntry:
    return replace(
        entry,
        old=None if entry.old in stale else entry.old,
        new=None if entry.new in stale else entry.new,
    )


def _readable(store: Store, oid: str) -> bool:
    """The commit and its manifest read back (tensors are checked by fsck, not needed here)."""
    try:
        store.read_manifest(store.read_commit(oid).manifest)
    except AdbError:
        return False
    return True


def _repair_refs(store: Store, report: RepairReport) -> None:
    good, broken = store.refs.scan("refs/")
    damaged: dict[str, str | None] = {f"refs/{name}": None for name in broken}
    damaged.update({f"refs/{name}": oid for name, oid in good.items() if not _readable(store, oid)})
    for ref, current in damaged.items():
        entries = store.refs.read_reflog(ref).entries
        values = (v for e in reversed(entries) for v in (e.new, e.old) if v and v != current)
        restore = next((v for v in values if _readable(store, v)), None)
        what = f"named unreadable commit {current[:12]}" if current else "was broken"
        if restore is None:
            report.left.append(
                f"{ref} {what} and no reflog entry names a readable commit; restore the "
                f"objects from a backup, or delete {store.root / ref} to drop it"
            )
            continue
        store.refs.move(ref, current, restore, "fsck --repair: restored from the reflog")
        report.done.append(f"{ref} {what}; reset to {restore[:12]}, its newest readable value")


def _repair_head(store: Store, report: RepairReport) -> None:
    try:
        store.refs.head_ref()
        return
    except CorruptStateError:
        pass
    branches, _ = store.refs.scan(HEADS)
    name = "main" if "main" in branches or not branches else sorted(branches)[0]
    store.refs.write_head(name)
    report.done.append(f"HEAD was missing or damaged; it now names branch {name}")
