"""What a branch holds besides its head: its experts (merged or waiting) and eval records.

Read without torch: `adb status` and `adb log` show these, and a read verb must not pay the
seconds torch takes to import. The workflows that train, merge and evaluate
(`trainers.loop`, `trainers.merge`, `trainers.evaluate`) name the refs through this module.
"""

from __future__ import annotations

from collections.abc import Iterator

from adapterdb.errors import AdbError
from adapterdb.storage.commits import Commit
from adapterdb.storage.refs import HEADS
from adapterdb.storage.store import Store

EXPERTS = "refs/experts/"
EVALS = "refs/evals/"


def experts(store: Store, branch: str) -> dict[str, str]:
    """Task -> expert commit id for every expert trained on `branch`."""
    return store.refs.list(f"{EXPERTS}{branch}/")


def unmerged_experts(store: Store, branch: str) -> list[tuple[str, str, Commit]]:
    """(task, commit id, commit) of every expert of `branch` that no commit in its history
    merged yet, newest first."""
    head = store.refs.read(HEADS + branch)
    history = store.log(head) if head else []
    merged = {oid for oid, _ in history} | {src for _, c in history for src in c.sources}
    pending = [
        (task, oid, store.read_commit(oid))
        for task, oid in experts(store, branch).items()
        if oid not in merged
    ]
    return sorted(pending, key=lambda row: row[2].time, reverse=True)


def newest_unmerged_expert(store: Store, branch: str) -> str:
    """The most recent expert of `branch` that no commit in its history merged yet."""
    pending = unmerged_experts(store, branch)
    if not pending:
        raise AdbError(
            f"branch '{branch}' has no unmerged expert; train one with `adb train` or pass SOURCES"
        )
    return pending[0][1]


def eval_chain(store: Store, oid: str | None) -> Iterator[Commit]:
    """A chain of eval records, newest first: each record's previous one is its parent of kind
    eval. Every record is read once."""
    record = store.read_commit(oid) if oid else None
    while record is not None:
        yield record
        parents = (store.read_commit(p) for p in record.parents)
        record = next((c for c in parents if c.kind == "eval"), None)


def last_eval(store: Store, commit_id: str) -> tuple[str, Commit] | None:
    """(id, record) of the newest eval record of `commit_id`, if it was ever evaluated."""
    oid = store.refs.read(f"{EVALS}{commit_id}")
    return (oid, store.read_commit(oid)) if oid else None
