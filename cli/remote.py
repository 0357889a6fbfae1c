"""Sharing a store: `adb remote`, `push`, `fetch`, `pull`, `clone` (storage/remote.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from adapterdb.cli.history import JSON
from adapterdb.cli.output import console, emit_json, err_console, human_bytes, short
from adapterdb.errors import NotFoundError
from adapterdb.storage import remote as rm
from adapterdb.storage.refs import HEADS, TAGS
from adapterdb.storage.store import Store

ENDPOINT = typer.Option(
    None, "--endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS)."
)


class BarMeter(rm.Meter):
    """A rich bar on stderr: bytes, bytes/s, objects and objects/s (drawn on a terminal only,
    so scripts and `--json` see nothing but the result)."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.progress = Progress(
            TextColumn(label),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[objs]}"),
            console=err_console,
            transient=True,
            disable=not err_console.is_terminal,
        )
        self.task = self.progress.add_task(label, total=None, objs="")

    def start(self, objects: int | None, nbytes: int | None) -> None:
        self.progress.update(self.task, total=nbytes)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            super().advance(nbytes)
            rate = self.objects / max(time.monotonic() - self._t0, 1e-6)
            objs = f"{self.objects} objects, {rate:.0f}/s"
        self.progress.update(self.task, advance=nbytes, objs=objs)


@contextmanager
def _bar(label: str) -> Iterator[BarMeter]:
    meter = BarMeter(label)
    with meter.progress:
        yield meter


def _summary(verb: str, t: rm.Transfer) -> str:
    rate = t.objects / t.seconds if t.seconds else 0.0
    return (
        f"{verb} {t.objects} objects ({human_bytes(t.bytes)}) in {t.seconds:.1f} s "
        f"({rate:.0f} objects/s)"
    )


def _print_refs(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        old = short(r.get("old")) or "-"
        console.print(f"  {escape(r['ref'])}: {old} -> {short(r['new'])} ({r['status']})")


# -- adb remote -------------------------------------------------------------------------------

remote_app = typer.Typer(
    help="List, add and remove remotes (folders or s3:// prefixes).",
    invoke_without_command=True,
    no_args_is_help=False,
)


@remote_app.callback()
def remote_list(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show URLs and endpoints."),
    as_json: bool = JSON,
) -> None:
    """List remotes (`-v`: with their URLs; credentials are never stored, so never shown)."""
    if ctx.invoked_subcommand is not None:
        return
    known = rm.remotes(Store.find())
    if as_json:
        emit_json([{"name": r.name, "url": r.url, "endpoint": r.endpoint} for r in known.values()])
        return
    for r in known.values():
        where = f"  {r.url}" + (f"  (endpoint {r.endpoint})" if r.endpoint else "")
        console.print(escape(r.name + (where if verbose else "")), soft_wrap=True)


@remote_app.command("add")
def remote_add(
    name: str = typer.Argument(..., help="Short name, e.g. origin."),
    url: str = typer.Argument(..., help="A folder, file:///path or s3://bucket/prefix."),
    endpoint: str = ENDPOINT,
    as_json: bool = JSON,
) -> None:
    """Add a remote (nothing is contacted until push, fetch or pull)."""
    r = rm.add_remote(Store.find(), name, url, endpoint)
    if as_json:
        emit_json({"name": r.name, "url": r.url, "endpoint": r.endpoint})
        return
    console.print(f"added remote {escape(r.name)} -> {escape(r.url)}", soft_wrap=True)


@remote_app.command("remove")
def remote_remove(
    name: str = typer.Argument(..., help="The remote to forget."), as_json: bool = JSON
) -> None:
    """Forget a remote and its remote-tracking refs (the remote itself is not touched)."""
    rm.remove_remote(Store.find(), name)
    if as_json:
        emit_json({"removed": name})
        return
    console.print(f"removed remote {escape(name)}")


# -- push, fetch, pull, clone -----------------------------------------------------------------


def _push_refs(store: Store, names: list[str], all_branches: bool, tags: bool) -> list[str]:
    """Full ref names to push: those named (branch before tag), --all, --tags, else HEAD's."""
    refs: list[str] = []
    for name in names:
        found = next((p + name for p in (HEADS, TAGS) if store.refs.read(p + name)), None)
        if found is None:
            raise NotFoundError(f"no branch or tag '{name}' here; `adb branch` and `adb tag` list")
        refs.append(found)
    if all_branches:
        refs += [HEADS + b for b in store.branches()]
    if tags:
        refs += [TAGS + t for t in store.tags()]
    if not (names or all_branches or tags):
        refs.append(HEADS + store.refs.current_branch())
    return list(dict.fromkeys(refs))


def push(
    remote: str = typer.Argument(None, help="Remote name (default: origin)."),
    refs: list[str] = typer.Argument(None, help="Branches or tags (default: HEAD's branch)."),
    all_branches: bool = typer.Option(False, "--all", help="Push every branch."),
    tags: bool = typer.Option(False, "--tags", help="Push every tag."),
    force: bool = typer.Option(False, "--force", "-f", help="Allow non-fast-forward moves."),
    as_json: bool = JSON,
) -> None:
    """Send the objects the remote lacks, then move its refs by compare-and-swap."""
    store = Store.find()
    target = rm.get_remote(store, remote)
    chosen = _push_refs(store, refs or [], all_branches, tags)
    with _bar(f"push {target.name}") as meter:
        t = rm.push(store, target, chosen, force, meter)
    if as_json:
        emit_json(t.to_json())
        return
    console.print(escape(f"{_summary('pushed', t)} to {target.name} ({target.url})"))
    _print_refs(t.refs)


def fetch(
    remote: str = typer.Argument(None, help="Remote name (default: origin)."),
    as_json: bool = JSON,
) -> None:
    """Download what the remote's branches and tags reach; update REMOTE/BRANCH refs."""
    store = Store.find()
    source = rm.get_remote(store, remote)
    with _bar(f"fetch {source.name}") as meter:
        t = rm.fetch(store, source, meter=meter)
    if as_json:
        emit_json(t.to_json())
        return
    console.print(escape(f"{_summary('fetched', t)} from {source.name}"))
    _print_refs(t.refs)


def pull(
    remote: str = typer.Argument(None, help="Remote name (default: origin)."),
    branch: str = typer.Argument(None, help="Branch (default: HEAD's)."),
    as_json: bool = JSON,
) -> None:
    """Fetch, then fast-forward the branch to REMOTE/BRANCH (diverged: refused)."""
    store = Store.find()
    source = rm.get_remote(store, remote)
    with _bar(f"pull {source.name}") as meter:
        t, row = rm.pull(store, source, branch, meter)
    if as_json:
        emit_json({**t.to_json(), "branch": row})
        return
    console.print(escape(_summary("fetched", t)))
    _print_refs([row])


def clone(
    url: str = typer.Argument(..., help="A folder, file:///path or s3://bucket/prefix."),
    folder: Path = typer.Argument(None, help="Where to create the store (default: URL's name)."),
    branch: str = typer.Option(None, "--branch", "-b", help="Branch to check out."),
    lazy: bool = typer.Option(
        False, "--lazy", help="Commits and manifests only; tensors come when a verb reads them."
    ),
    endpoint: str = ENDPOINT,
    as_json: bool = JSON,
) -> None:
    """Create a store from a remote (`origin`), with its branches and tags."""
    with _bar("clone") as meter:
        store, t, chosen = rm.clone(url, folder, branch, lazy, endpoint, meter)
    if as_json:
        emit_json({**t.to_json(), "store": str(store.root), "branch": chosen, "lazy": lazy})
        return
    kind = " (lazy: tensors on demand)" if lazy else ""
    console.print(escape(f"cloned {url} into {store.root.parent}{kind}, branch {chosen}"))
    console.print(escape(_summary("fetched", t)))


def register(app: typer.Typer) -> None:
    app.add_typer(remote_app, name="remote")
    for verb in (push, fetch, pull, clone):
        app.command()(verb)
