"""The store: commits of adapters on branches, over immutable objects and CAS-updated refs.

A commit is written objects first (tensors, manifest), the commit object next, the ref last,
so a crash at any moment leaves the branch at its old head or its new one, never at a commit
whose objects are missing.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from adapterdb import failpoints
from adapterdb.atomic_folder import check_outside_stores
from adapterdb.errors import (
    AdbError,
    ConflictError,
    CorruptObjectError,
    CorruptStateError,
    NotFoundError,
)
from adapterdb.storage.commits import Commit, Manifest, TensorEntry
from adapterdb.storage.objects import ObjectStore, atomic_write, unlocked
from adapterdb.storage.provenance import author, code_provenance
from adapterdb.storage.refs import (
    HEADS,
    OID_RE,
    TAGS,
    ReflogEntry,
    RefStore,
    check_ref_name,
    shown,
)
from adapterdb.tensorfile import RawTensor

STORE_DIR = ".adb"
FORMAT = "adapterdb-store 1"
REFLOG_EXPIRE = 90 * 86400.0  # git's gc.reflogExpire default: 90 days
_REV_RE = re.compile(r"^(?P<base>[^~^]+)(?P<ops>(?:[~^]\d*)*)$")
_AT_RE = re.compile(r"(?P<name>[^@{}]*(?:@[^@{}]+)*)@\{(?P<n>\d{1,9})\}")  # main@{1}, @{1}
# Hashing, zstd and byte copies release the GIL, and each object ends in an fsync that waits on
# the disk, not the CPU: more workers than cores overlap those waits (measured: 252 fsyncs take
# 1.6-2.2 s one after another, 0.2-0.3 s from 8+ threads).
_WORKERS = min(32, 4 * (os.cpu_count() or 1))


@dataclass
class FsckReport:
    objects: int = 0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class GcReport:
    reachable: int = 0
    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    temp_files: list[str] = field(default_factory=list)
    reflog_expired: dict[str, int] = field(default_factory=dict)  # ref -> entries expired


class Store:
    """An adapter store rooted at a `.adb` folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = ObjectStore(root)
        self.refs = RefStore(root, self.objects.exists)

    # -- locating --------------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str] = ".", branch: str = "main") -> Store:
        """Create `PATH/.adb` (refuses to touch an existing store)."""
        root = Path(path) / STORE_DIR
        if (root / "FORMAT").exists():
            raise AdbError(f"{root} is already a store; use it, or pass another PATH")
        check_outside_stores(Path(path))
        if root.exists() and any(root.iterdir()):
            raise AdbError(f"{root} exists and is not empty; remove it or pass another PATH")
        for sub in ("objects", "refs/heads", "refs/tags", "logs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        atomic_write(root / "HEAD", [f"ref: {HEADS}{check_ref_name(branch)}\n".encode()])
        atomic_write(root / "FORMAT", [f"{FORMAT}\n".encode()])
        return cls(root)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open a store given its `.adb` folder or the folder that holds it."""
        p = Path(path)
        for root in (p / STORE_DIR, p):
            if (root / "FORMAT").is_file():
                _check_format(root / "FORMAT")
                return cls(root)
            if (root / "objects").is_dir() and (root / "refs").is_dir():
                raise CorruptStateError(
                    f"{root / 'FORMAT'} is missing from the store {root}; "
                    f"write '{FORMAT}' into it to open the store again"
                )
        raise AdbError(f"{p} is not an adb store; create one with `adb init {p}` or pass --store")

    @classmethod
    def find(cls, explicit: str | None = None, start: Path | None = None) -> Store:
        """`--store`, else `ADB_STORE`, else the nearest `.adb` walking up from `start`."""
        chosen = explicit or os.environ.get("ADB_STORE")
        if chosen:
            return cls.open(chosen)
        here = (start or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            if (folder / STORE_DIR / "FORMAT").is_file() or (folder / STORE_DIR / "refs").is_dir():
                return cls.open(folder)  # a damaged FORMAT is reported, not walked past
        raise AdbError(
            "no adb store here or in any parent folder; run `adb init` or pass --store PATH"
        )

    # -- writing ---------------------------------------------------------------------------

    def put_adapter(
        self,
        tensors: Mapping[str, RawTensor],
        config: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Store every tensor (in parallel) and the manifest; returns the manifest id."""
        names = sorted(tensors)
        with ThreadPoolExecutor(_WORKERS) as pool:
            ids = list(pool.map(lambda n: self.objects.put_tensor(tensors[n]), names))
        entries = {
            n: TensorEntry(i, tensors[n].dtype, tensors[n].shape)
            for n, i in zip(names, ids, strict=True)
        }
        return self.put_manifest(entries, config, metadata)

    def put_manifest(
        self,
        entries: Mapping[str, TensorEntry],
        config: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """The manifest of tensors already stored (streaming writers put them one by one)."""
        manifest = Manifest(dict(entries), dict(config or {}), dict(metadata or {}))
        return self.objects.put_json(manifest.to_json())

    def commit(
        self,
        commit: Commit,
        branch: str | None = None,
        *,
        ref: str | None = None,
        expected: str | bool | None = True,
        retries: int = 0,
    ) -> str:
        """Write `commit` and move `branch` (or any full `ref`, e.g. an expert's) to it.

        On a branch with no explicit `commit.parents`, the parent is the branch head.
        `expected=True` means "the ref as read now"; a string or None pins it. If another
        writer moves the ref first, retry onto the new head up to `retries` times (for
        commits that do not depend on their parent's content, like imports), else raise
        `ConflictError`.
        """
        target = ref or HEADS + check_ref_name(branch or "")
        self._check_manifest(commit.manifest)
        stamp: dict[str, Any] = {"author": commit.author or author()}
        if not commit.provenance:
            stamp["provenance"] = code_provenance()
        commit = replace(commit, **stamp)
        for attempt in range(retries + 1):
            head = self.refs.read(target) if expected is True else expected
            inherit = ref is None and head is not None
            parents = commit.parents or ((head,) if inherit else ())
            # stamped after reading the head (and again on each retry): a commit is then
            # always younger than its parent, which `log`'s newest-first order relies on
            stamped = replace(commit, parents=parents, time=commit.time or time.time())
            oid = self.objects.put_json(stamped.to_json())
            self.objects.sync()  # every object's rename is durable before the ref names it
            try:
                self.refs.update(
                    target, oid, head, f"{commit.kind}: {commit.message or commit.task or ''}"
                )
            except ConflictError:
                if attempt == retries or commit.parents:
                    raise
                continue
            self.objects.release()  # reachable now: gc needs this writer's claims no more
            return oid
        raise AssertionError("unreachable")

    def _check_manifest(self, oid: str) -> None:
        """A commit must never name a manifest that is not stored: it could not be read back."""
        if not (isinstance(oid, str) and OID_RE.fullmatch(oid) and self.objects.exists(oid)):
            raise NotFoundError(
                f"manifest {str(oid)[:12]!r} is not in the store; store the adapter with "
                "put_adapter or put_manifest and commit the id it returns"
            )
        self.read_manifest(oid)

    # -- reading ---------------------------------------------------------------------------

    def read_commit(self, oid: str) -> Commit:
        return self.parse_commit(oid, self.objects.get_json(oid))

    @staticmethod
    def parse_commit(oid: str, doc: Any) -> Commit:
        """A commit from its stored JSON (read here, or downloaded and not yet stored)."""
        if not isinstance(doc, dict) or doc.get("type") != "commit":
            raise AdbError(f"{oid[:12]} is not a commit")
        return Commit.from_json(doc, oid)

    def read_manifest(self, oid: str) -> Manifest:
        doc = self.objects.get_json(oid)
        if not isinstance(doc, dict) or doc.get("type") != "manifest":
            raise AdbError(f"{oid[:12]} is not a manifest")
        return Manifest.from_json(doc, oid)

    def manifest_of(self, rev: str) -> Manifest:
        return self.read_manifest(self.read_commit(self.resolve(rev)).manifest)

    def iter_tensors(
        self, manifest: Manifest, pattern: str | None = None
    ) -> Iterator[tuple[str, RawTensor]]:
        """Decoded, hash-verified tensors one at a time (stream: never the whole model)."""
        names = self.select(manifest, pattern)
        self.prefetch(manifest, names)
        for name in names:
            yield name, self.objects.get_tensor(manifest.tensors[name].id)

    def load_tensors(self, manifest: Manifest, pattern: str | None = None) -> dict[str, RawTensor]:
        """All selected tensors, decoded in parallel (for checkout, which writes them at once)."""
        names = self.select(manifest, pattern)
        self.prefetch(manifest, names)
        with ThreadPoolExecutor(_WORKERS) as pool:
            raws = pool.map(lambda n: self.objects.get_tensor(manifest.tensors[n].id), names)
            return dict(zip(names, raws, strict=True))

    def prefetch(self, manifest: Manifest, names: Iterable[str] | None = None) -> None:
        """A lazy clone fetches the tensors (`names`, default all) a reader is about to decode,
        all at once in parallel: decoded one by one, each would wait for its own round trip to
        the remote. A no-op on a full store."""
        chosen = manifest.tensors if names is None else names
        self.objects.prefetch(manifest.tensors[n].id for n in chosen)

    @staticmethod
    def select(manifest: Manifest, pattern: str | None) -> list[str]:
        names = sorted(manifest.tensors)
        if pattern is None:
            return names
        chosen = [n for n in names if fnmatchcase(n, pattern)]
        if not chosen:
            raise NotFoundError(
                f"no tensor matches '{pattern}'; `adb show REV --tensors` lists them"
            )
        return chosen

    def branches(self) -> dict[str, str]:
        return self.refs.list(HEADS)

    def tags(self) -> dict[str, str]:
        return self.refs.list(TAGS)

    def resolve(self, rev: str) -> str:
        """A commit id from `main`, `v1`, `HEAD`, a full ref name (`refs/heads/main`), a (short)
        id or a reflog entry (`main@{1}`, `HEAD@{1}` and `@{1}` for HEAD's branch), with
        `~N` / `^N` suffixes."""
        m = _REV_RE.fullmatch(rev.strip())
        if not m:
            raise NotFoundError(
                f"'{rev}' is not a revision; use a branch, tag, commit id, HEAD~N or main@{{N}}"
            )
        oid = self._resolve_base(m["base"])
        for op, num in re.findall(r"([~^])(\d*)", m["ops"]):
            n = int(num) if num else 1
            if op == "~":
                for _ in range(n):
                    oid = self._parent(oid, 0, rev)
            elif n:
                oid = self._parent(oid, n - 1, rev)
        return oid

    def _parent(self, oid: str, index: int, rev: str) -> str:
        parents = self.read_commit(oid).parents
        if index >= len(parents):
            raise NotFoundError(f"'{rev}' goes past the start of history; use a smaller number")
        return parents[index]

    def _resolve_base(self, base: str) -> str:
        if base == "HEAD":
            ref, oid = self.refs.head()
            if oid is None:
                raise NotFoundError(
                    f"HEAD ({ref or 'detached'}) has no commits yet; `adb import` one, or "
                    "`adb train` and `adb merge` (`adb status` shows what waits)"
                )
            return oid
        at = _AT_RE.fullmatch(base)
        if at:
            return self._reflog_entry(at["name"], int(at["n"]))
        for ref in self._ref_candidates(base):  # main, v1, experts/main/task, refs/heads/main
            oid = self.refs.read(ref)
            if oid:
                return oid
        if re.fullmatch(r"[0-9a-f]{4,64}", base):
            matches = [i for i in self._ids_with_prefix(base) if self.objects.kind(i) == "json"]
            commits = [i for i in matches if _doc_type(self.objects.get_json(i)) == "commit"]
            if len(commits) == 1:
                return commits[0]
            if len(commits) > 1:
                raise AdbError(f"'{base}' is ambiguous ({len(commits)} commits); give more digits")
        raise NotFoundError(f"unknown revision '{base}'; see `adb log`, `adb branch` or `adb tag`")

    def _ref_candidates(self, name: str) -> list[str]:
        """The full refs a name may mean, in git's order: a full name (`refs/...`) as is, then
        refs/heads/NAME, refs/tags/NAME, refs/NAME (`experts/main/t1`, as `adb train` prints)."""
        if not check_name_quietly(name):
            return []
        exact = [name] if name.startswith("refs/") else []
        return exact + [prefix + name for prefix in (HEADS, TAGS, "refs/", "refs/remotes/")]

    def full_ref(self, name: str) -> str | None:
        """The full ref `name` means (the first candidate that exists), or None."""
        return next((r for r in self._ref_candidates(name) if self.refs.read(r)), None)

    def reflog_ref(self, name: str) -> str:
        """The ref whose reflog `name` means: HEAD's branch for `HEAD` or "", else the ref
        `name` names, or a deleted one whose reflog is still kept (so a deletion can be
        undone with `adb branch NAME NAME@{1}`)."""
        if name in ("", "HEAD"):
            ref, _ = self.refs.head_ref()
            if ref is None:
                raise AdbError("HEAD is detached, so it has no branch reflog; name a branch")
            return ref
        ref = self.full_ref(name) or next(
            (r for r in self._ref_candidates(name) if self.refs.read_reflog(r).entries), None
        )
        if ref is None:
            raise NotFoundError(f"no ref named '{name}'; see `adb branch` or `adb tag`")
        return ref

    def _reflog_entry(self, name: str, n: int) -> str:
        """`NAME@{N}`: the commit NAME pointed at N moves ago (0 = now), from its reflog."""
        ref = self.reflog_ref(name)
        entries = self.refs.reflog(ref)[::-1]
        if n >= len(entries):
            raise NotFoundError(
                f"'{name}@{{{n}}}': the reflog of {ref} has only {len(entries)} entries; "
                f"`adb reflog {name or 'HEAD'}` lists them"
            )
        if entries[n].new is None:
            raise NotFoundError(f"'{name}@{{{n}}}' is the deletion of {ref}; try {n + 1}")
        return entries[n].new

    def _ids_with_prefix(self, prefix: str) -> list[str]:
        folder = self.objects.dir / prefix[:2]
        if not folder.is_dir():
            return []
        found = (prefix[:2] + f.name for f in folder.iterdir() if f.name.startswith(prefix[2:]))
        return [oid for oid in found if OID_RE.fullmatch(oid)]

    def log(self, rev: str, limit: int | None = None) -> list[tuple[str, Commit]]:
        """Ancestors of `rev` (all parents), newest first."""
        return [(oid, c) for oid, c, _ in self.log_refs({rev: self.resolve(rev)}, limit)]

    def log_refs(
        self, starts: Mapping[str, str], limit: int | None = None
    ) -> list[tuple[str, Commit, str]]:
        """Ancestors of every start (label -> commit id), newest first, each with its label:
        the first start (in `starts`' order) that points at it, else the first whose history
        holds it (`adb log --all` marks its rows so: a merged expert keeps its expert ref).
        One walk: every commit is read once however many refs reach it."""
        tips = {oid: label for label, oid in reversed(starts.items())}
        seen: dict[str, tuple[Commit, str]] = {}
        for label, start in starts.items():
            stack = [start]
            while stack:
                oid = stack.pop()
                if oid in seen:
                    continue
                c = self.read_commit(oid)
                seen[oid] = (c, tips.get(oid, label))
                stack.extend(c.parents)
        ordered = sorted(seen.items(), key=lambda kv: kv[1][0].time, reverse=True)
        return [(oid, c, label) for oid, (c, label) in ordered[: limit or None]]

    def stored_bytes(self, manifest: Manifest) -> int:
        """Bytes the manifest's tensors take on disk; a lazy clone fetches them first (in one
        parallel batch, as git's partial clone fetches what `show` needs): only stored
        objects have a size."""
        self.prefetch(manifest)
        return sum(
            self.objects.size(e.id) for e in {e.id: e for e in manifest.tensors.values()}.values()
        )

    # -- integrity -------------------------------------------------------------------------

    def _roots(self, with_reflog: bool, errors: list[str] | None = None) -> dict[str, str]:
        """Every commit a ref (or a reflog line) keeps alive: label -> commit id.

        A damaged ref, HEAD or reflog line may name a commit we cannot see: it raises
        `CorruptStateError` (gc must not sweep), unless `errors` collects it (fsck goes on).
        """
        good, broken = self.refs.scan("refs/")  # heads, tags, experts
        roots = {f"refs/{k}": v for k, v in good.items()}
        problems = list(broken.values())
        try:
            ref, oid = self.refs.head_ref()
            if ref is None and oid:
                roots["HEAD"] = oid
        except CorruptStateError as exc:
            problems.append(str(exc))
        if with_reflog:
            for r in self.refs.reflog_refs():
                log = self.refs.read_reflog(r)
                problems.extend(log.problems())
                roots.update(_reflog_roots(r, log.entries))
        if problems and errors is None:
            raise CorruptStateError(problems[0])
        if errors is not None:
            errors.extend(problems)
        return roots

    def _reachable(self, roots: Mapping[str, str], errors: list[str]) -> set[str]:
        """Mark phase: commits, manifests, tensors and masks reachable from `roots`.

        A damaged commit stops the walk on its line (its parents are unknown); a damaged or
        missing manifest does not, so the history behind it is still checked.
        """
        live: set[str] = set()
        unreadable: set[str] = set()  # reported once, however many refs reach it
        stack = list(roots.items())
        while stack:
            label, oid = stack.pop()
            if oid in live or oid in unreadable:
                continue
            try:
                commit = self.read_commit(oid)
            except AdbError as exc:  # missing or corrupt objects are AdbErrors too
                unreadable.add(oid)
                errors.append(f"{label}: commit {oid[:12]}: {exc}")
                continue
            live.add(oid)
            self._mark_contents(oid, commit, label, live, errors)
            stack.extend((f"{label}^", p) for p in commit.parents)
        return live

    def _mark_contents(
        self, oid: str, commit: Commit, label: str, live: set[str], errors: list[str]
    ) -> None:
        """Mark a commit's manifest, tensors and other objects; report the missing ones."""
        needed = commit.referenced_objects()
        live.update(needed)
        for extra in needed[1:]:
            if not self.objects.exists(extra):
                errors.append(f"missing object {extra[:12]} needed by commit {oid[:12]} ({label})")
        try:
            manifest = self.read_manifest(commit.manifest)
        except AdbError as exc:
            errors.append(f"{label}: manifest of commit {oid[:12]}: {exc}")
            return
        try:
            nested = self.nested_tensors(commit)
        except AdbError as exc:
            errors.append(f"{label}: a manifest named in commit {oid[:12]}'s extra: {exc}")
            nested = []
        for name, tid in [*((n, e.id) for n, e in manifest.tensors.items()), *nested]:
            live.add(tid)
            if not self.objects.exists(tid):
                errors.append(
                    f"missing tensor '{name}' ({tid[:12]}) of commit {oid[:12]} ({label})"
                )

    def nested_tensors(self, commit: Commit) -> list[tuple[str, str]]:
        """(`key/name`, tensor id) of the manifests a commit names in `extra.objects` (a
        merge's sources, a continual method's state): reachable through the commit, so gc
        keeps them, fsck checks them and push sends them, as the commit's own tensors."""
        out: list[tuple[str, str]] = []
        for key, oid in commit.extra.get("objects", {}).items():
            if not (isinstance(oid, str) and self.objects.exists(oid)):
                continue  # missing objects are reported by the caller
            if self.objects.kind(oid) != "json":
                continue
            doc = self.objects.get_json(oid)
            if isinstance(doc, dict) and doc.get("type") == "manifest":
                tensors = Manifest.from_json(doc, oid).tensors
                out += [(f"{key}/{name}", e.id) for name, e in tensors.items()]
        return out

    def fsck(self, progress: Any = None) -> FsckReport:
        """Re-hash every object, then check that refs, HEAD and reflogs parse and reach only
        readable objects: all that gc relies on, so gc never refuses a store fsck calls ok."""
        report = FsckReport()
        for oid in self.objects.ids():
            report.objects += 1
            try:
                self.objects.verify(oid)
            except (CorruptObjectError, NotFoundError) as exc:
                report.errors.append(str(exc))
            if progress:
                progress()
        report.errors.extend(
            f"{p} is not an object (a stray {'folder' if p.is_dir() else 'file'}); "
            "move it out of the store"
            for p in self.objects.strays()
        )
        self._reachable(self._roots(with_reflog=True, errors=report.errors), report.errors)
        temps = self.objects.temp_files()
        if temps:
            report.notes.append(
                f"{len(temps)} temp file(s) from interrupted writes; `adb gc` removes them"
            )
        report.notes.extend(
            f"healed: object {oid[:12]} was corrupt on disk and a write at {_utc(stamp)} UTC "
            "stored it again"
            for stamp, oid in self.objects.healed()
        )
        return report

    def gc(
        self, dry_run: bool = False, grace: float = 3600.0, expire: float | None = REFLOG_EXPIRE
    ) -> GcReport:
        """Expire reflog entries, mark from refs and reflogs, sweep what nothing reaches.

        Reflog entries older than `expire` seconds (None: never) go, and so does the whole
        reflog of a deleted ref (as git drops a deleted branch's reflog), so gc reclaims what
        only old history kept. Objects go when nothing reaches them and they are older than
        `grace` seconds and than this gc's start.

        Safe beside running writers whatever `grace` is, 0 included: the sweep runs under gc's
        exclusive lock and the ref lock, after re-reading refs, reflogs and the claims of live
        writers (objects they stored or reused but have not committed yet, see objects.py); a
        ref update checks its commit is stored under the same ref lock. Temp files go only
        when their writer is dead (it holds a flock on them while it lives).
        """
        if grace < 0 or (expire is not None and expire < 0):
            raise AdbError("gc: --grace and --expire are ages; they cannot be negative")
        start = time.time()
        cutoff = start - grace
        report = GcReport()
        with self.objects.exclusive(), self.refs.locked():
            plan = self._reflog_plan(None if expire is None else start - expire)
            roots = self._roots(with_reflog=False)
            for r, (kept, _) in plan.items():
                roots.update(_reflog_roots(r, kept))
            errors: list[str] = []
            live = self._reachable(roots, errors)
            if errors:
                raise AdbError(f"gc refused: the store has problems ({errors[0]}); run `adb fsck`")
            report.reachable = len(live)
            claimed = self.objects.live_claims()
            report.reflog_expired = {r: n for r, (_, n) in plan.items() if n}
            if not dry_run:  # reflogs first: a crash then leaves garbage, never a dangling line
                for r, (kept, n) in plan.items():
                    if n:
                        self.refs.write_reflog(r, kept)
            for oid in list(self.objects.ids()):
                if oid in live or oid in claimed:
                    continue
                path = self.objects.path(oid)
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if st.st_mtime > cutoff:
                    continue
                report.removed.append(oid)
                report.bytes_freed += st.st_size
                if not dry_run:
                    failpoints.hit("gc.unlink")
                    path.unlink(missing_ok=True)
            for tmp in self.objects.temp_files():
                try:
                    mtime = tmp.stat().st_mtime
                except FileNotFoundError:
                    continue
                legacy = tmp.parent != self.objects.tmp_dir  # beside objects: age decides
                if mtime >= start or (legacy and mtime > cutoff) or not unlocked(tmp):
                    continue
                report.temp_files.append(str(tmp))
                if not dry_run:
                    failpoints.hit("gc.unlink_temp")
                    tmp.unlink(missing_ok=True)
        return report

    def _reflog_plan(self, expire_before: float | None) -> dict[str, tuple[list[ReflogEntry], int]]:
        """Per reflog: (the entries gc keeps, how many expire). A damaged line refuses gc:
        what it named is unknown, so nothing may be swept."""
        plan: dict[str, tuple[list[ReflogEntry], int]] = {}
        for r in self.refs.reflog_refs():
            log = self.refs.read_reflog(r)
            if log.bad_lines:
                raise CorruptStateError(f"gc refused: {log.problems()[0]}")
            if expire_before is None:
                kept = log.entries
            elif self.refs.read(r) is None:  # a deleted ref: its history goes with it
                kept = []
            else:
                kept = [e for e in log.entries if e.time >= expire_before]
            plan[r] = (kept, len(log.entries) - len(kept))
        return plan


def _check_format(path: Path) -> None:
    """FORMAT names the on-disk layout: refuse a newer one, and say so when it is damaged."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", "replace").strip()
    if text == FORMAT:
        return
    if re.fullmatch(r"adapterdb-store \d{1,9}", text):
        raise AdbError(
            f"{path.parent} is a store of an unknown format ({text!r} in {path}); upgrade adapterdb"
        )
    raise CorruptStateError(
        f"{path} is damaged: it holds {shown(raw)}, not '{FORMAT}'; "
        f"write '{FORMAT}' into it if this is an adb store"
    )


def _reflog_roots(ref: str, entries: list[ReflogEntry]) -> dict[str, str]:
    """The commits a reflog's entries keep alive, labelled `ref@{i}`."""
    return {f"{ref}@{{{i}}}": v for i, e in enumerate(entries) for v in (e.old, e.new) if v}


def _doc_type(doc: Any) -> Any:
    return doc.get("type") if isinstance(doc, dict) else None


def check_name_quietly(name: str) -> bool:
    try:
        check_ref_name(name)
    except AdbError:
        return False
    return True


def _utc(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp))
