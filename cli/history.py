"""History verbs: init, import, log, show, checkout, diff, branch, tag."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from adapterdb.adapter import WEIGHTS_FILE, read_peft_raw, write_peft_raw
from adapterdb.cli.output import console, emit_json, fmt, human_bytes, short, status_console, when
from adapterdb.errors import AdbError, CorruptStateError
from adapterdb.storage.commits import Commit
from adapterdb.storage.refs import HEADS, TAGS, check_ref_name
from adapterdb.storage.store import Store
from adapterdb.trainers.branchstate import EVALS, EXPERTS, unmerged_experts
from adapterdb.trainers.importing import check_import, import_adapter

JSON = typer.Option(False, "--json", help="Print a JSON document instead of a table.")
WRITE_JSON = typer.Option(
    False, "--json", help="Print the new commit as a JSON document (progress goes to stderr)."
)


def init(path: Path = typer.Argument(Path("."), help="Folder to create .adb in.")) -> None:
    """Create an empty store (`PATH/.adb`)."""
    store = Store.init(path)
    console.print(f"Initialised empty adb store in {store.root}", markup=False)


def import_(
    peft_dir: Path = typer.Argument(..., help="A PEFT adapter folder."),
    task: str = typer.Option(None, "--task", help="Task this adapter was trained on."),
    branch: str = typer.Option(
        None, "--branch", "-b", help="Branch to commit to (default: HEAD's)."
    ),
    expert: bool = typer.Option(
        False,
        "--expert",
        help="Commit it as the branch's expert for --task (as `adb train` does), to merge later.",
    ),
    message: str = typer.Option("", "--message", "-m"),
    as_json: bool = WRITE_JSON,
) -> None:
    """Commit a PEFT adapter folder (Linear and Conv LoRA, any dtype)."""
    store = Store.find()
    branch = check_import(store, task, branch, expert)
    config, tensors, metadata = read_peft_raw(peft_dir)
    with status_console(as_json).status(f"storing {len(tensors)} tensors", spinner="dots"):
        oid, ref = import_adapter(
            store,
            config,
            tensors,
            metadata,
            branch=branch,
            task=task,
            message=message or f"import {peft_dir}",
            expert=expert,
        )
    if as_json:
        emit_written(store, oid, ref)
        return
    console.print(
        f"[{ref.removeprefix(HEADS).removeprefix('refs/')} {short(oid)}] import: "
        f"{len(tensors)} tensors from {peft_dir}",
        markup=False,
    )


def emit_written(
    store: Store, oid: str, ref: str, warnings: Sequence[str] = (), **extra: Any
) -> None:
    """The `--json` answer of a writing verb: the new commit, the ref it moved, the warnings."""
    branch = ref.removeprefix(HEADS) if ref.startswith(HEADS) else None
    doc = {**_commit_row(oid, store.read_commit(oid)), "ref": ref, "branch": branch}
    emit_json({**doc, "warnings": list(warnings), **extra})


def _commit_row(oid: str, c: Commit) -> dict[str, Any]:
    return {
        "id": oid,
        "time": c.time,
        "kind": c.kind,
        "task": c.task,
        "method": c.method,
        "params": c.params,
        "parents": list(c.parents),
        "sources": list(c.sources),
        "eval": c.eval,
        "message": c.message,
        "author": c.author,
    }


def _metrics_cell(c: Commit) -> str:
    acc = c.eval.get("accuracy") if isinstance(c.eval, dict) else None
    if isinstance(acc, dict) and acc:
        return " ".join(f"{k}={v:.3f}" for k, v in acc.items() if isinstance(v, int | float))
    return ""


def log(
    rev: str = typer.Argument("HEAD", help="Revision to start from."),
    limit: int = typer.Option(None, "-n", "--max-count", help="Show at most N commits."),
    all_refs: bool = typer.Option(
        False, "--all", help="Every ref's history: branches, tags, experts, eval records."
    ),
    as_json: bool = JSON,
) -> None:
    """History of a revision: kind, task, method, metrics, message."""
    store = Store.find()
    if all_refs:
        entries = store.log_refs(_all_refs(store), limit)
    else:
        waiting = _waiting_note(store, rev)
        if waiting and as_json:  # no history to list: an empty one for scripts
            emit_json([])
            return
        if waiting:  # and the reason for people
            console.print(waiting, markup=False, soft_wrap=True)
            return
        entries = [(oid, c, None) for oid, c in store.log(rev, limit)]
    if as_json:
        emit_json([{**_commit_row(oid, c), **_ref_cell(ref)} for oid, c, ref in entries])
        return
    table = Table(box=None, pad_edge=False)
    columns = ("commit", "date (UTC)", "kind", "task", "method", "metrics", "message")
    for col in ("ref", *columns) if all_refs else columns:
        table.add_column(col)
    for oid, c, ref in entries:
        cells = (
            short(oid),
            when(c.time),
            escape(c.kind),  # documents are data: '[/]' in one must print, not raise
            escape(c.task or ""),
            escape(c.method or ""),
            escape(_metrics_cell(c)),
            escape(c.message),
        )
        table.add_row(*((escape(ref or ""), *cells) if all_refs else cells))
    console.print(table)


def _ref_cell(ref: str | None) -> dict[str, str]:
    return {} if ref is None else {"ref": ref}


_REF_ORDER = (HEADS, TAGS, EXPERTS, EVALS)  # a commit several refs reach is marked by the first


def _all_refs(store: Store) -> dict[str, str]:
    """Full ref name -> commit for every ref, branches first, then tags, experts, evals."""
    refs = {f"refs/{name}": oid for name, oid in store.refs.list("refs/").items()}
    return {r: refs[r] for r in sorted(refs, key=lambda r: (_ref_group(r), r))}


def _ref_group(ref: str) -> int:
    """The position of `ref`'s kind in `_REF_ORDER`; any other ref comes after those."""
    return next((i for i, p in enumerate(_REF_ORDER) if ref.startswith(p)), len(_REF_ORDER))


def _waiting_note(store: Store, rev: str) -> str | None:
    """For HEAD's branch with no commit yet but trained experts: what waits and how to merge
    it (`adb train` commits experts only, so the branch is empty until the first merge)."""
    ref, head = store.refs.head()
    if ref is None or head is not None or rev not in ("HEAD", ref, ref.removeprefix(HEADS)):
        return None
    branch = ref.removeprefix(HEADS)
    pending = unmerged_experts(store, branch)
    if not pending:
        return None
    tasks = ", ".join(task for task, _, _ in pending)
    return (
        f"branch '{branch}' has no global adapter yet; {len(pending)} expert(s) wait to be "
        f"merged ({tasks}): `adb merge --method pam` merges the newest, `adb status` lists them"
    )


def show(
    rev: str = typer.Argument("HEAD"),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
    as_json: bool = JSON,
) -> None:
    """One commit in detail: tensors, parameters, bytes raw and stored."""
    store = Store.find()
    oid = store.resolve(rev)
    c = store.read_commit(oid)
    m = store.read_manifest(c.manifest)
    raw = sum(e.numel * _itemsize(e.dtype) for e in m.tensors.values())
    stored = store.stored_bytes(m)
    doc = {
        **_commit_row(oid, c),
        "manifest": c.manifest,
        "base_model": c.base_model,
        "provenance": c.provenance,
        "stats": c.stats,
        "triggers": {k: {"scale": t.scale, "tensors": len(t.masks)} for k, t in c.triggers.items()},
        "tensor_count": len(m.tensors),
        "parameters": sum(e.numel for e in m.tensors.values()),
        "bytes_raw": raw,
        "bytes_stored": stored,
        "peft_config": m.config,
    }
    if tensors:
        doc["tensors"] = {
            k: {"dtype": e.dtype, "shape": list(e.shape), "id": e.id} for k, e in m.tensors.items()
        }
    if as_json:
        emit_json(doc)
        return
    console.print(f"[bold]commit {oid}[/]")
    for key in ("kind", "task", "method", "base_model", "author", "message"):
        if doc[key]:
            console.print(f"{key:>12}: {doc[key]}", markup=False)
    console.print(f"{'time':>12}: {when(c.time)} UTC")
    if c.parents:
        console.print(f"{'parents':>12}: {' '.join(short(p) for p in c.parents)}")
    if c.sources:
        console.print(f"{'sources':>12}: {' '.join(short(p) for p in c.sources)}")
    if c.params:
        console.print(f"{'params':>12}: {c.params}", markup=False)
    if c.provenance:
        p = c.provenance
        dirty = " (dirty)" if p.get("dirty") else ""
        console.print(
            f"{'code':>12}: {p.get('repo')} @ {short(p.get('commit'))}{dirty}", markup=False
        )
    ratio = stored / raw if raw else 0.0
    console.print(
        f"{'tensors':>12}: {len(m.tensors)} ({doc['parameters']:,} parameters), "
        f"{human_bytes(raw)} raw, {human_bytes(stored)} stored ({ratio:.2f}x)"
    )
    for task, trig in doc["triggers"].items():
        console.print(
            f"{'trigger':>12}: {task} scale={trig['scale']:.4f} masks={trig['tensors']}",
            markup=False,
        )
    if c.eval:
        console.print(f"{'eval':>12}: {c.eval}", markup=False)
    if tensors:
        for name, e in m.tensors.items():
            console.print(f"  {name}  {e.dtype} {list(e.shape)}  {short(e.id)}", markup=False)


def _itemsize(dtype: str) -> int:
    from adapterdb.tensorfile import DTYPES

    return DTYPES[dtype][0]


def checkout(
    rev: str = typer.Argument(..., help="Revision to write out."),
    out: Path = typer.Option(..., "-o", "--output", help="Folder to write the PEFT adapter to."),
    tensor: str = typer.Option(None, "--tensor", help="Only tensors matching this glob."),
    force: bool = typer.Option(False, "--force", help="Overwrite an adapter already in OUT."),
) -> None:
    """Write a revision as a PEFT folder (`PeftModel.from_pretrained` loads it)."""
    store = Store.find()
    oid = store.resolve(rev)
    m = store.read_manifest(store.read_commit(oid).manifest)
    if (out / WEIGHTS_FILE).exists() and not force:
        raise AdbError(
            f"{out} already holds an adapter; pass --force to overwrite or pick another -o"
        )
    with console.status("decoding tensors", spinner="dots"):
        tensors = store.load_tensors(m, tensor)
    write_peft_raw(out, m.config, tensors, m.metadata)
    console.print(f"wrote {len(tensors)} tensors of {short(oid)} to {out}", markup=False)


def diff(
    a: str = typer.Argument(..., help="Old revision (or PEFT folder)."),
    b: str = typer.Argument(..., help="New revision (or PEFT folder)."),
    top: int = typer.Option(20, "--top", help="Rows to print, most changed first (0 = all)."),
    as_json: bool = JSON,
) -> None:
    """Per tensor: relative L2, cosine, sign agreement, changed fraction; LoRA also on ΔW."""
    from adapterdb.trainers.diff import diff_sources
    from adapterdb.trainers.merge import open_source

    store = None if all(Path(s).is_dir() for s in (a, b)) else Store.find()
    result = diff_sources(open_source(a, store), open_source(b, store))
    if as_json:
        emit_json(result)
        return
    for title, rows, summary in (
        ("tensors", result["tensors"], result["summary"]),
        ("ΔW = B·A·scale per LoRA layer", result["delta_w"], result["summary_delta_w"]),
    ):
        if not rows:
            continue
        table = Table(title=title, box=None, pad_edge=False)
        for col in ("name", "rel L2", "cosine", "sign agree", "changed"):
            table.add_column(col, justify="left" if col == "name" else "right")
        ranked = sorted(rows.items(), key=lambda kv: -kv[1]["rel_l2"])
        for name, r in ranked[: top or None]:
            table.add_row(
                escape(name),
                fmt(r["rel_l2"]),
                fmt(r["cosine"]),
                fmt(r["sign_agreement"]),
                fmt(r["changed"]),
            )
        if top and len(ranked) > top:
            table.add_row(f"... {len(ranked) - top} more (--top 0 shows all)", "", "", "", "")
        table.add_row(
            "[bold]summary[/]",
            fmt(summary["rel_l2"]),
            fmt(summary["cosine"]),
            fmt(summary["sign_agreement"]),
            fmt(summary["changed"]),
        )
        console.print(table)
    for key, label in (("only_a", a), ("only_b", b), ("shape_mismatch", "both, shapes differ")):
        if result[key]:
            console.print(
                f"{len(result[key])} tensor(s) only in {label}: {', '.join(result[key][:5])}",
                markup=False,
            )


def _list_refs(store: Store, prefix: str, current: str | None, as_json: bool) -> None:
    """List refs; a broken one is listed as broken (then the exit is an error), never hidden:
    hiding it looked like a missing branch, and the next import started history anew."""
    refs, broken = store.refs.scan(prefix)
    rows = {**refs, **dict.fromkeys(broken)}
    if as_json:
        emit_json(
            [
                {"name": k, "commit": rows[k], "current": k == current, "broken": k in broken}
                for k in sorted(rows)
            ]
        )
    else:
        for name in sorted(rows):
            mark = "*" if name == current else " "
            state = "BROKEN" if name in broken else short(rows[name])
            console.print(f"{mark} {escape(name):<30} {state}")
    if broken:
        raise CorruptStateError(next(iter(broken.values())))


def branch(
    name: str = typer.Argument(None, help="Branch to create (omit to list)."),
    start: str = typer.Argument(None, help="Where the new branch starts (default: HEAD)."),
    delete: bool = typer.Option(False, "-d", "--delete", help="Delete the branch."),
    switch: bool = typer.Option(False, "--switch", "-s", help="Make it HEAD's branch."),
    force: bool = typer.Option(
        False, "--force", "-f", help="Move an existing branch to START (the reflog keeps the old)."
    ),
    as_json: bool = JSON,
) -> None:
    """List, create, delete or switch branches."""
    store = Store.find()
    if name is None and (start is not None or delete or switch or force):
        raise AdbError("name the branch: adb branch NAME [START] [-d | --switch | -f]")
    if delete and (start is not None or switch or force):
        raise AdbError("-d deletes a branch; it takes no START, --switch or -f")
    if name is None:
        ref, _ = store.refs.head_ref()
        current = ref[len(HEADS) :] if ref and ref.startswith(HEADS) else None
        _list_refs(store, HEADS, current, as_json)
        return
    check_ref_name(name)
    ref = HEADS + name
    existing = store.refs.read(ref)
    if delete:
        if existing is None:
            raise AdbError(f"branch '{name}' does not exist; `adb branch` lists branches")
        if store.refs.head()[0] == ref:
            raise AdbError(f"branch '{name}' is HEAD's branch; switch to another one first")
        store.refs.update(ref, None, existing, f"branch: delete {name}")
        console.print(f"deleted branch {name} (was {short(existing)})")
        return
    if existing is None:
        empty = start is None and store.refs.head()[1] is None
        if not empty:
            origin = start or "HEAD"
            store.refs.update(ref, store.resolve(origin), None, f"branch: create from {origin}")
            console.print(f"created branch {name} at {short(store.refs.read(ref))}")
    elif force:  # like `git branch -f NAME [START]`
        origin = start or "HEAD"
        target = store.resolve(origin)
        store.refs.update(ref, target, existing, f"branch: reset to {origin}")
        console.print(f"moved branch {name} to {short(target)} (was {short(existing)})")
    elif start is not None:  # silently switching without moving it would ignore START
        raise AdbError(
            f"branch '{name}' already exists (at {short(existing)}); pass -f to move it to "
            f"{start}, or drop START (`adb branch {name} --switch`) to switch to it as it is"
        )
    elif not switch:
        raise AdbError(f"branch '{name}' already exists; pass --switch to make it current")
    if switch:
        store.refs.set_head(name)
        console.print(f"HEAD is now on branch {name}")


def tag(
    name: str = typer.Argument(None, help="Tag to create (omit to list)."),
    rev: str = typer.Argument("HEAD", help="Revision to tag."),
    delete: bool = typer.Option(False, "-d", "--delete", help="Delete the tag."),
    as_json: bool = JSON,
) -> None:
    """List, create or delete tags (immutable names for commits)."""
    store = Store.find()
    if name is None:
        _list_refs(store, TAGS, None, as_json)
        return
    ref = TAGS + check_ref_name(name, "tag")
    existing = store.refs.read(ref)
    if delete:
        if existing is None:
            raise AdbError(f"tag '{name}' does not exist; `adb tag` lists tags")
        store.refs.update(ref, None, existing, f"tag: delete {name}")
        console.print(f"deleted tag {name}")
        return
    if existing is not None:
        raise AdbError(
            f"tag '{name}' already exists (at {short(existing)}); delete it first with -d"
        )
    oid = store.resolve(rev)
    store.refs.update(ref, oid, None, f"tag: {name}")
    console.print(f"tagged {short(oid)} as {name}")


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command("import")(import_)
    app.command()(log)
    app.command()(show)
    app.command()(checkout)
    app.command()(diff)
    app.command()(branch)
    app.command()(tag)
