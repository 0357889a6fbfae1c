"""Remotes: push, fetch, pull and clone a store through a folder or S3 (`transport.py`).

Git's order carries over. A push sends objects first (only those the remote lacks: the walk
from what is pushed stops at commits the remote already has, and their objects are not sent
again), makes them durable, and moves each remote ref last with compare-and-swap, so a remote
ref only ever names a commit whose objects are all there; a push that is not a fast-forward is
refused unless forced. A fetch walks the remote's history from its refs, downloads what the
local store lacks, decodes and re-hashes every object before it is stored (a corrupt or
truncated one is named and never enters the store), and only then moves the remote-tracking
refs `refs/remotes/<remote>/<branch>` (`origin/main` in any revision).

A lazy clone fetches commits and manifests only; a read of a tensor or mask it lacks fetches
that object from the remote (`ObjectStore._on_demand`, through `lazy_source`), verifies it and
keeps it. The remote list and the lazy remote live in the store's `config` (JSON); no
credentials are ever written there.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from adapterdb import iopool
from adapterdb.atomic_folder import store_holding
from adapterdb.errors import AdbError, ConflictError, CorruptObjectError, NotFoundError
from adapterdb.storage.commits import Commit
from adapterdb.storage.objects import atomic_write
from adapterdb.storage.refs import HEADS, TAGS, check_ref_name
from adapterdb.storage.store import Store
from adapterdb.storage.transport import Transport, open_transport

CONFIG = "config"
REMOTES = "refs/remotes/"
NOT_FF = "fetch and merge first, or --force"


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    endpoint: str | None = None

    def transport(self) -> Transport:
        return open_transport(self.url, self.endpoint)


class Meter:
    """Progress of a transfer; the CLI's subclass draws a bar. This one counts only."""

    def __init__(self) -> None:
        self.objects = 0
        self.bytes = 0

    def start(self, objects: int | None, nbytes: int | None) -> None:
        """A phase begins: how many objects (and bytes) it will move, where known."""

    def advance(self, nbytes: int) -> None:
        self.objects += 1
        self.bytes += nbytes


@dataclass
class Transfer:
    """What a push or fetch did: objects and bytes moved, time, and each ref's fate."""

    remote: str
    objects: int = 0
    bytes: int = 0
    seconds: float = 0.0
    refs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "remote": self.remote,
            "objects": self.objects,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "refs": self.refs,
        }


# -- configuration -------------------------------------------------------------------------


def read_config(root: Path) -> dict[str, Any]:
    try:
        doc = json.loads((root / CONFIG).read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise AdbError(f"{root / CONFIG} is not JSON; fix or remove it") from None
    if not isinstance(doc, dict):
        raise AdbError(f"{root / CONFIG} is not a JSON object; fix or remove it")
    return doc


def _write_config(root: Path, doc: dict[str, Any]) -> None:
    body = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    atomic_write(root / CONFIG, [body.encode()], tmp_dir=root / "tmp", label="config")


def remotes(store: Store) -> dict[str, Remote]:
    found = read_config(store.root).get("remotes", {})
    return {
        n: Remote(n, str(v.get("url")), v.get("endpoint"))
        for n, v in sorted(found.items())
        if isinstance(v, dict)
    }


def get_remote(store: Store, name: str | None) -> Remote:
    """The named remote; with no name, `origin` or the only one there is."""
    known = remotes(store)
    if name is None:
        name = "origin" if "origin" in known or len(known) != 1 else next(iter(known))
    if name not in known:
        listed = ", ".join(known) or "none yet"
        raise NotFoundError(
            f"no remote named '{name}' (remotes: {listed}); add one with `adb remote add NAME URL`"
        )
    return known[name]


def check_remote_name(name: str) -> str:
    check_ref_name(name, "remote")
    if "/" in name:
        raise AdbError(f"'{name}' is not a valid remote name; it becomes origin/BRANCH: no '/'")
    return name


def normal_url(url: str) -> str:
    """Folder paths become absolute (the remote is found from anywhere); URLs stay as given."""
    if urlparse(url).scheme in ("s3", "file"):
        return url
    return str(Path(url).expanduser().resolve())


def add_remote(store: Store, name: str, url: str, endpoint: str | None) -> Remote:
    check_remote_name(name)
    transport = open_transport(url, endpoint)  # refuses an unknown scheme or a bucket-less URL
    folder = getattr(transport, "root", None)
    if isinstance(folder, Path):
        check_remote_folder(store, folder.resolve(), url)
    doc = read_config(store.root)
    table = doc.setdefault("remotes", {})
    if name in table:
        raise AdbError(f"remote '{name}' exists already; `adb remote remove {name}` first")
    remote = Remote(name, normal_url(url), endpoint)
    table[name] = {"url": remote.url, **({"endpoint": endpoint} if endpoint else {})}
    _write_config(store.root, doc)
    return remote


def check_remote_folder(store: Store, folder: Path, url: str) -> None:
    """A folder remote is a bare store of its own: not this store, not the folder holding it,
    and not a folder inside any store (whose state it would become)."""
    ours = store.root.resolve()
    holder = store_holding(folder)
    if folder in (ours, ours.parent) or (holder is not None and holder != folder):
        raise AdbError(
            f"{url!r} is this store, holds it, or lies inside a store; a folder remote is a "
            "folder of its own (e.g. ../shared)"
        )


def remove_remote(store: Store, name: str) -> None:
    """Forget a remote and its remote-tracking refs (as `git remote remove`)."""
    get_remote(store, name)
    doc = read_config(store.root)
    if doc.get("lazy") == name:
        raise AdbError(f"'{name}' holds the objects this lazy clone has not fetched; keep it")
    for branch, oid in store.refs.list(f"{REMOTES}{name}/").items():
        store.refs.update(f"{REMOTES}{name}/{branch}", None, oid, f"remote remove {name}")
    doc["remotes"].pop(name, None)
    _write_config(store.root, doc)


def lazy_source(root: Path) -> Callable[[str], bytes] | None:
    """For a lazy clone: a reader of objects from its remote (None for a full store)."""
    doc = read_config(root)
    name = doc.get("lazy")
    entry = doc.get("remotes", {}).get(name) if name else None
    if not isinstance(entry, dict):
        return None
    remote = Remote(name, entry["url"], entry.get("endpoint"))
    transport = remote.transport()

    def read(oid: str) -> bytes:
        try:
            return transport.get(object_key(oid))
        except NotFoundError:
            raise NotFoundError(
                f"object {oid[:12]} is neither in this lazy clone nor on its remote "
                f"{remote.url}; the remote lost it: push it again from a full store"
            ) from None

    return read


# -- shared helpers ---------------------------------------------------------------------------


def object_key(oid: str) -> str:
    return f"objects/{oid[:2]}/{oid[2:]}"


def have(store: Store, oid: str) -> bool:
    """Stored here (`ObjectStore.exists` is also true for what a lazy clone left remote)."""
    return store.objects.path(oid).is_file()


def is_ancestor(store: Store, old: str, new: str) -> bool:
    """Whether commit `old` is `new` or one of its ancestors (in the local history)."""
    stack, seen = [new], set()
    while stack:
        oid = stack.pop()
        if oid == old:
            return True
        if oid in seen or not have(store, oid):
            continue
        seen.add(oid)
        stack.extend(store.read_commit(oid).parents)
    return False


def _contents(store: Store, commit: Commit) -> set[str]:
    """Every object a commit needs besides its parents: manifest, masks, tensors."""
    ids = set(commit.referenced_objects())
    ids.update(e.id for e in store.read_manifest(commit.manifest).tensors.values())
    ids.update(tid for _, tid in store.nested_tensors(commit))
    return ids


def _parallel(fn: Callable[[str], Any], items: Iterable[str]) -> list[Any]:
    """Object storage answers each request in milliseconds of network wait, not CPU: many
    requests in flight hide the latency (boto3's client is thread-safe, its pool sized to
    match)."""
    return iopool.run_all(fn, items)


# -- push -------------------------------------------------------------------------------------


def push(
    store: Store, remote: Remote, refs: list[str], force: bool = False, meter: Meter | None = None
) -> Transfer:
    """Send `refs` (full local names) to `remote`: missing objects, then each ref by CAS."""
    meter = meter or Meter()
    started = time.monotonic()
    transport = remote.transport()
    transport.check_store(create=True)
    plan = []  # (ref, new, old, token)
    for ref in refs:
        new = store.refs.read(ref)
        if new is None:
            raise NotFoundError(f"{ref} does not exist here; `adb branch` and `adb tag` list refs")
        old, token = transport.read_ref(ref)
        if old != new and old is not None and not force and not is_ancestor(store, old, new):
            raise ConflictError(
                f"push of {_short(ref)} to {remote.name} is not a fast-forward "
                f"(the remote has commits this store lacks); {NOT_FF}"
            )
        plan.append((ref, new, old, token))
    tracked = store.refs.list(f"{REMOTES}{remote.name}/").values()
    known = {o for o in [*tracked, *(p[2] for p in plan)] if o and have(store, o)}
    missing = _missing_objects(store, transport, [n for _, n, o, _ in plan if n != o], known)
    store.objects.prefetch(missing)  # a lazy clone pushing elsewhere fetches what it lacks
    sizes = {oid: store.objects.size(oid) for oid in missing}
    meter.start(len(missing), sum(sizes.values()))

    def send(oid: str) -> None:
        transport.put_file(object_key(oid), store.objects.path(oid))
        meter.advance(sizes[oid])

    _parallel(send, missing)
    transport.sync()  # every object durable before a ref names it
    result = Transfer(remote.name, meter.objects, meter.bytes)
    for ref, new, old, token in plan:
        result.refs.append(_push_ref(store, transport, remote, ref, new, old, token, force))
    result.seconds = time.monotonic() - started
    return result


def _short(ref: str) -> str:
    for prefix in (HEADS, TAGS):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return ref


def _missing_objects(
    store: Store, transport: Transport, tips: list[str], known: set[str]
) -> list[str]:
    """Objects reachable from `tips` that the remote lacks, in upload order.

    The walk stops at commits the remote has (its refs, our remote-tracking refs): their
    history is there, as a remote ref is only moved once everything it reaches is stored.
    What those commits' manifests name is not sent again either (most tensors of a new
    version are the old ones); whatever is left is asked for with one HEAD per object, in
    parallel (or, with nothing known, found in one listing of the remote's objects), so an
    interrupted push resumes without sending anything twice.
    """
    commits: list[str] = []
    stack, seen = list(tips), set(known)
    while stack:
        oid = stack.pop()
        if oid in seen:
            continue
        seen.add(oid)
        commits.append(oid)
        stack.extend(store.read_commit(oid).parents)
    shared: set[str] = set()
    for oid in known:
        shared |= _contents(store, store.read_commit(oid))
    wanted: dict[str, None] = {}
    for oid in commits:
        for obj in sorted(_contents(store, store.read_commit(oid)) - shared):
            wanted[obj] = None
    wanted.update((c, None) for c in reversed(commits))  # commits after what they name
    candidates = list(wanted)
    if not known:  # a first push: one listing (1000 keys a request) beats a HEAD per object
        listed = {k.replace("/", "")[len("objects") :] for k in transport.list("objects/")}
        return [o for o in candidates if o not in listed]
    there = _parallel(lambda o: transport.exists(object_key(o)), candidates)
    return [o for o, present in zip(candidates, there, strict=True) if not present]


def _push_ref(
    store: Store,
    transport: Transport,
    remote: Remote,
    ref: str,
    new: str,
    old: str | None,
    token: Any,
    force: bool,
) -> dict[str, Any]:
    """CAS one remote ref; a lost race is the non-fast-forward answer (or, forced, a retry)."""
    row = {"ref": ref, "old": old, "new": new}
    if old == new:
        row["status"] = "up to date"
    else:
        for _ in range(5):
            try:
                transport.swap_ref(ref, new, old, token, f"push: {_short(ref)}")
                break
            except ConflictError:
                if not force:
                    raise ConflictError(
                        f"{_short(ref)} on {remote.name} moved while this push ran; {NOT_FF}"
                    ) from None
                old, token = transport.read_ref(ref)
        else:
            raise ConflictError(f"{_short(ref)} on {remote.name} keeps moving; push again")
        forward = old is None or is_ancestor(store, old, new)
        row["status"] = "new" if old is None else "fast-forward" if forward else "forced"
    if ref.startswith(HEADS):
        _track(store, f"{REMOTES}{remote.name}/{ref[len(HEADS) :]}", new, "push")
    return row


def _track(store: Store, ref: str, new: str, why: str) -> None:
    current = store.refs.read(ref)
    if current != new:
        store.refs.update(ref, new, current, f"{why}: {new[:12]}")


# -- fetch, pull, clone -----------------------------------------------------------------------


def fetch(
    store: Store, remote: Remote, lazy: bool | None = None, meter: Meter | None = None
) -> Transfer:
    """Download what the remote's branches and tags reach and this store lacks; move
    `refs/remotes/<remote>/*` (and create tags we do not have) once it is all stored."""
    meter = meter or Meter()
    lazy = store.objects.lazy() if lazy is None else lazy
    started = time.monotonic()
    transport = remote.transport()
    transport.check_store()
    tips = {}
    for key in transport.list(HEADS) + transport.list(TAGS):
        value, _ = transport.read_ref(key)
        if value:
            tips[key] = value
    meter.start(None, None)
    download = _downloader(store, transport, remote, meter)

    def get(oid: str) -> None:
        got = download(oid)
        if got is not None:
            store.objects.keep(oid, got[0])

    complete = _reachable_commits(store)
    frontier = sorted({v for v in tips.values() if v not in complete})
    seen = set(frontier)
    commits: list[Commit] = []
    # One round trip per generation: parents are read from the downloaded bytes, and the
    # writes (fsync, rename) and the manifests' downloads go on while the walk goes deeper.
    pending: list[Future[None]] = []
    try:
        while frontier:
            got = dict(zip(frontier, _parallel(download, frontier), strict=True))
            pending += [iopool.submit(store.objects.keep, o, g[0]) for o, g in got.items() if g]
            generation = [
                store.parse_commit(o, g[1]) if g else store.read_commit(o) for o, g in got.items()
            ]
            pending += [iopool.submit(get, c.manifest) for c in generation]
            commits += generation
            nxt = {p for c in generation for p in c.parents if p not in seen | complete}
            seen |= nxt
            frontier = sorted(nxt)
    finally:
        wait(pending)  # a failed walk leaves no write running behind it
    iopool.settle(pending)
    if not lazy:
        _parallel(get, sorted(set().union(*(_contents(store, c) for c in commits))))
    store.objects.sync()
    result = Transfer(remote.name, meter.objects, meter.bytes)
    for key, value in sorted(tips.items()):
        result.refs.append(_fetched_ref(store, remote, key, value))
    store.objects.release()
    result.seconds = time.monotonic() - started
    return result


def _reachable_commits(store: Store) -> set[str]:
    """Commits the local refs reach: those are whole here (a ref moves only once everything it
    reaches is stored), so a fetch stops there. A commit that is stored but unreachable (a
    killed fetch's) is walked again and what it lacks is fetched."""
    good, _ = store.refs.scan("refs/")
    stack, seen = list(good.values()), set()
    while stack:
        oid = stack.pop()
        if oid not in seen and have(store, oid):
            seen.add(oid)
            stack.extend(store.read_commit(oid).parents)
    return seen


def _downloader(
    store: Store, transport: Transport, remote: Remote, meter: Meter
) -> Callable[[str], tuple[bytes, Any] | None]:
    """`download(oid)`: an object this store lacks, downloaded and re-hashed, as its bytes (for
    `ObjectStore.keep`) and decoded value; None when it is here already."""

    def download(oid: str) -> tuple[bytes, Any] | None:
        if have(store, oid):  # stored only after verification: intact
            return None
        blob = transport.get(object_key(oid))
        try:
            value = store.objects.decode(oid, blob)
        except CorruptObjectError as exc:
            why = str(exc).split("(", 1)[-1].split(")", 1)[0]
            raise CorruptObjectError(
                f"object {oid[:12]} on {remote.name} ({remote.url}) is corrupt or truncated "
                f"({why}); it was not stored here; repair the remote (`adb fsck` on a folder "
                "remote) or push it again from an intact store"
            ) from None
        meter.advance(len(blob))
        return blob, value

    return download


def _fetched_ref(store: Store, remote: Remote, key: str, value: str) -> dict[str, Any]:
    if key.startswith(HEADS):
        local = f"{REMOTES}{remote.name}/{key[len(HEADS) :]}"
        old = store.refs.read(local)
        _track(store, local, value, f"fetch {remote.name}")
        status = "up to date" if old == value else "new" if old is None else "updated"
        return {"ref": local, "old": old, "new": value, "status": status}
    old = store.refs.read(key)
    if old is None:
        store.refs.update(key, value, None, f"fetch {remote.name}: tag")
    status = "new" if old is None else "up to date" if old == value else "kept ours (differs)"
    return {"ref": key, "old": old, "new": value, "status": status}


def pull(
    store: Store, remote: Remote, branch: str | None, meter: Meter | None = None
) -> tuple[Transfer, dict[str, Any]]:
    """Fetch, then fast-forward the branch to its remote-tracking ref (never a merge)."""
    branch = check_ref_name(branch) if branch else store.refs.current_branch()
    transfer = fetch(store, remote, meter=meter)
    theirs = store.refs.read(f"{REMOTES}{remote.name}/{branch}")
    if theirs is None:
        raise NotFoundError(f"{remote.name} has no branch '{branch}'; `adb branch -a` after fetch")
    ref = HEADS + branch
    ours = store.refs.read(ref)
    row = {"ref": ref, "old": ours, "new": theirs}
    if ours == theirs or (ours is not None and is_ancestor(store, theirs, ours)):
        row.update(new=ours, status="up to date")
    elif ours is None or is_ancestor(store, ours, theirs):
        store.refs.update(ref, theirs, ours, f"pull {remote.name}: fast-forward")
        row["status"] = "fast-forward"
    else:
        raise ConflictError(
            f"{branch} and {remote.name}/{branch} have diverged; pull only fast-forwards: merge "
            f"{remote.name}/{branch} into {branch} yourself, or keep yours on another branch"
        )
    return transfer, row


def clone(
    url: str,
    dest: Path | None,
    branch: str | None,
    lazy: bool,
    endpoint: str | None = None,
    meter: Meter | None = None,
) -> tuple[Store, Transfer, str]:
    """A new store in `dest` with `origin` = `url`, its branches fetched (`lazy`: commits and
    manifests only) and `branch` (default: the remote's HEAD) checked out as a local branch.
    On any failure the new folder is removed again."""
    remote = Remote("origin", normal_url(url), endpoint)
    transport = remote.transport()
    transport.check_store()
    chosen = branch or transport.default_branch() or "main"
    if branch and transport.read_ref(HEADS + check_ref_name(branch))[0] is None:
        raise NotFoundError(f"{url} has no branch '{branch}'; leave --branch out for its HEAD")
    target = dest or Path(_clone_name(url))
    if target.exists() and any(target.iterdir()):
        raise AdbError(f"{target} exists and is not empty; pick another folder")
    created = not target.exists()
    try:
        store = Store.init(target, branch=chosen)
        doc: dict[str, Any] = {"remotes": {"origin": {"url": remote.url}}}
        if endpoint:
            doc["remotes"]["origin"]["endpoint"] = endpoint
        if lazy:
            doc["lazy"] = "origin"
        _write_config(store.root, doc)
        store = Store.open(store.root)
        transfer = fetch(store, remote, lazy=lazy, meter=meter)
        tracking = store.refs.list(f"{REMOTES}origin/")
        if chosen not in tracking and tracking and not branch:  # HEAD names no branch there
            chosen = "main" if "main" in tracking else sorted(tracking)[0]
            store.refs.set_head(chosen)
        if chosen in tracking:
            store.refs.update(HEADS + chosen, tracking[chosen], None, f"clone: from {url}")
    except BaseException:
        shutil.rmtree(target if created else target / ".adb", ignore_errors=True)
        raise
    return store, transfer, chosen


def _clone_name(url: str) -> str:
    parsed = urlparse(url)
    path = parsed.path if parsed.scheme else url
    name = Path(path.rstrip("/")).name or parsed.netloc
    return name.removesuffix(".adb") or "store"
