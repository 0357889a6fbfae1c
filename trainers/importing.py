"""Committing an adapter made elsewhere: `adb import` and `adapterdb.Store.commit`.

Both call `import_adapter`, so a PEFT folder imported from the shell and an adapter committed
from Python are checked the same way and land as the same commit. Torch-free: the tensors
arrive as raw bytes (a folder's, or `from_torch` of an in-memory adapter's).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from adapterdb.errors import AdbError
from adapterdb.storage.commits import Commit, check_task_name
from adapterdb.storage.refs import HEADS, branch_name
from adapterdb.storage.store import Store
from adapterdb.tensorfile import RawTensor
from adapterdb.trainers.branchstate import EXPERTS
from adapterdb.trainers.config import TASK_NAME


def target_branch(store: Store, branch: str | None, option: str = "--branch") -> str:
    """`branch` checked, or HEAD's branch when None (as git commits to the checked-out one);
    `option` is how the caller's user names a branch instead, for the detached-HEAD line."""
    return branch_name(branch) if branch else store.refs.current_branch(option)


def check_import(
    store: Store, task: str | None, branch: str | None, expert: bool = False, kind: str = "import"
) -> str:
    """Refuse a bad task name, kind or branch before anything is read; returns the branch.

    An expert is filed under its task (`refs/experts/BRANCH/TASK`), so it must name one."""
    if task is not None:
        check_task_name(task)
        if not re.fullmatch(TASK_NAME, task) or task.endswith(".lock"):  # as task.yaml's name
            raise AdbError(
                f"task name {task!r} is not allowed: it names the expert ref "
                "refs/experts/BRANCH/TASK, so use letters, digits, '-', '_' or '.' only"
            )
    elif expert:
        raise AdbError("an expert belongs to a task; pass its name (--task NAME, task=NAME)")
    if not kind.isidentifier():
        raise AdbError(f"kind {kind!r} is not a commit kind; use a word such as import or train")
    return target_branch(store, branch)


def import_adapter(
    store: Store,
    config: Mapping[str, Any],
    tensors: Mapping[str, RawTensor],
    metadata: Mapping[str, str],
    *,
    branch: str,
    task: str | None,
    message: str,
    expert: bool = False,
    kind: str = "import",
) -> tuple[str, str]:
    """Store the adapter and commit it on `branch` (checked by `check_import`): (commit id,
    the ref it moved).

    The tensors come checked from where they were read (`read_peft_raw`, `adapter_raw`), so
    a large import is not scanned twice. `expert=True` files the adapter as an expert of
    `branch` (on `refs/experts/BRANCH/TASK`, its parent the branch head, as `adb train`
    does) and leaves the branch where it is: the next `adb merge --into BRANCH` merges it.
    """
    manifest = store.put_adapter(tensors, config, metadata)
    head = store.refs.read(HEADS + branch) if expert else None
    base_model = config.get("base_model_name_or_path")
    commit = Commit(
        manifest=manifest,
        kind=kind,
        parents=(head,) if head else (),
        task=task,
        base_model=base_model if isinstance(base_model, str) else None,  # the schema's type
        message=message,
        extra={"branch": branch} if expert else {},
    )
    if expert:
        ref = f"{EXPERTS}{branch}/{task}"
        return store.commit(commit, ref=ref), ref
    return store.commit(commit, branch, retries=20), HEADS + branch
