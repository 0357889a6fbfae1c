"""`adb status`: where HEAD is, what waits to be merged, the last eval, cheap health checks.

Everything here is a read of refs and a few small commit objects, never a re-hash of the store
and never torch (`adb status` is typed often and must answer at once).
"""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from adapterdb.cli.history import JSON
from adapterdb.cli.output import console, emit_json, short, when
from adapterdb.errors import CorruptStateError
from adapterdb.storage.commits import Commit
from adapterdb.storage.objects import unlocked
from adapterdb.storage.refs import HEADS
from adapterdb.storage.store import Store
from adapterdb.trainers.branchstate import last_eval, unmerged_experts


def status(as_json: bool = JSON) -> None:
    """Current branch and head, experts waiting to be merged, the last eval, store problems."""
    store = Store.find()
    doc = _status(store)
    if as_json:
        emit_json(doc)
    else:
        _print(doc)


def _status(store: Store) -> dict[str, Any]:
    problems = cheap_fsck(store)
    try:
        ref, head = store.refs.head()
    except CorruptStateError:  # a broken HEAD or branch ref (among `problems`): show the rest
        ref, head = None, None
    branch = ref.removeprefix(HEADS) if ref else None
    head_commit = _readable(store, head)
    record = last_eval(store, head) if head_commit else None
    return {
        "branch": branch,
        "detached": ref is None and head is not None,
        "head": _commit_doc(head, head_commit) if head_commit else None,
        "unmerged": _waiting(store, branch) if branch else [],
        "last_eval": _eval_doc(*record) if record else None,
        "problems": problems,
    }


def _readable(store: Store, oid: str | None) -> Commit | None:
    if oid is None or not store.objects.exists(oid):
        return None  # a missing head commit is among `problems` already
    return store.read_commit(oid)


def _commit_doc(oid: str, c: Commit) -> dict[str, Any]:
    return {"id": oid, "kind": c.kind, "task": c.task, "message": c.message, "time": c.time}


def _waiting(store: Store, branch: str) -> list[dict[str, Any]]:
    """The branch's unmerged experts, newest first, with A_t and their health flags (none
    when an expert ref is broken: `cheap_fsck` names it, and status still answers)."""
    rows = []
    try:
        pending = unmerged_experts(store, branch)
    except CorruptStateError:
        return []
    for task, oid, c in pending:
        accuracy = c.eval.get("accuracy") if isinstance(c.eval, dict) else None
        health = c.stats.get("health") if isinstance(c.stats, dict) else None
        flags = health.get("flags", []) if isinstance(health, dict) else None
        rows.append(
            {
                **_commit_doc(oid, c),
                "task": task,
                "accuracy": accuracy.get(task) if isinstance(accuracy, dict) else None,
                # None: no health record (an imported expert), [] : every check passed
                "flags": None
                if flags is None
                else [f.get("check") for f in flags if isinstance(f, dict)],
            }
        )
    return rows


def _eval_doc(oid: str, record: Commit) -> dict[str, Any]:
    return {
        "id": oid,
        "time": record.time,
        "accuracy": record.eval.get("accuracy", {}),
        "routing": record.eval.get("routing"),
    }


def cheap_fsck(store: Store) -> list[str]:
    """What `adb fsck` would flag without reading an object's bytes: refs that do not parse or
    name a commit that is not stored, damaged reflog lines, temp files of killed writers."""
    good, broken = store.refs.scan("refs/")
    problems = list(broken.values())
    problems += [
        f"ref refs/{name} names commit {short(oid)}, which is not in the store; "
        "run `adb fsck --repair`"
        for name, oid in good.items()
        if not store.objects.exists(oid)
    ]
    for ref in store.refs.reflog_refs():
        problems += store.refs.read_reflog(ref).problems()
    try:
        ref, detached = store.refs.head_ref()
    except CorruptStateError as exc:
        return [str(exc), *problems]
    if detached and not store.objects.exists(detached):
        problems.append(
            f"HEAD names commit {short(detached)}, which is not in the store; "
            "switch to a branch with `adb branch NAME --switch`"
        )
    if ref and store.refs.read(ref) is None:  # an empty branch, or a ref file lost
        log = store.refs.read_reflog(ref).entries
        if log and log[-1].new:
            name = ref.removeprefix(HEADS)
            problems.append(
                f"HEAD's branch {ref} is missing, but its reflog says it was at "
                f"{short(log[-1].new)}; restore it with `adb branch {name} {name}@{{0}}`"
            )
    leftovers = [t for t in store.objects.temp_files() if unlocked(t)]
    if leftovers:
        problems.append(
            f"{len(leftovers)} temp file(s) left by interrupted writes; `adb gc` removes them"
        )
    return problems


def _print(doc: dict[str, Any]) -> None:
    if doc["branch"]:
        console.print(f"On branch {escape(doc['branch'])}")
    elif doc["detached"]:
        console.print("HEAD is detached")
    head = doc["head"]
    if head:
        console.print(f"head {short(head['id'])} {head['kind']}: {head['message']}", markup=False)
    elif doc["branch"]:
        console.print("no global adapter yet (no commit on this branch)")
    _print_waiting(doc["unmerged"])
    record = doc["last_eval"]
    if record:
        cells = " ".join(f"{k}={v:.4f}" for k, v in record["accuracy"].items())
        console.print(
            f"last eval of the head ({when(record['time'])} UTC, {record['routing']}): {cells}",
            markup=False,
        )
    elif head:
        console.print(f"the head has no eval record; `adb eval {short(head['id'])}` makes one")
    if doc["problems"]:
        for line in doc["problems"]:
            console.print(f"problem: {line}", markup=False, soft_wrap=True)
    else:
        console.print("no problems found by the quick checks (`adb fsck` re-hashes everything)")


def _print_waiting(rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("no expert waits to be merged")
        return
    console.print(
        f"{len(rows)} expert(s) wait to be merged (`adb merge --method pam` merges the newest):"
    )
    table = Table(box=None, pad_edge=False)
    for col in ("task", "expert", "A_t", "health", "message"):
        table.add_column(col)
    for r in rows:
        acc = r["accuracy"]
        table.add_row(
            escape(r["task"]),
            short(r["id"]),
            "-" if acc is None else f"{acc:.4f}",
            "-" if r["flags"] is None else escape(", ".join(r["flags"]) or "ok"),
            escape(r["message"]),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command()(status)
