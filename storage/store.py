"""The store: commits of adapters on branches, over immutable objects and CAS-updated refs.

A commit is written objects first (tensors, manifest), the commit object next, the ref last,
so a crash at any moment leaves the branch at its old head or its new one, never at a commit
whose objects are missing.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from adapterdb.errors import AdbError, ConflictError, CorruptObjectError, NotFoundError
from adapterdb.storage.commits import Commit, Manifest, TensorEntry
from adapterdb.storage.objects import ObjectStore, atomic_write
from adapterdb.storage.provenance import author, code_provenance
from adapterdb.storage.refs import HEADS, TAGS, RefStore, check_ref_name
from adapterdb.tensorfile import RawTensor

STORE_DIR = ".adb"
FORMAT = "adapterdb-store 1"
_REV_RE = re.compile(r"^(?P<base>[^~^]+)(?P<ops>(?:[~^]\d*)*)$")
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


class Store:
    """An adapter store rooted at a `.adb` folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = ObjectStore(root)
        self.refs = RefStore(root)

    # -- locating --------------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str] = ".", branch: str = "main") -> Store:
        """Create `PATH/.adb` (refuses to touch an existing store)."""
        root = Path(path) / STORE_DIR
        if (root / "FORMAT").exists():
            raise AdbError(f"{root} is already a store; use it, or pass another PATH")
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
                if (root / "FORMAT").read_text().strip() != FORMAT:
                    raise AdbError(f"{root} is a store of an unknown format; upgrade adapterdb")
                return cls(root)
        raise AdbError(f"{p} is not an adb store; create one with `adb init {p}` or pass --store")

    @classmethod
    def find(cls, explicit: str | None = None, start: Path | None = None) -> Store:
        """`--store`, else `ADB_STORE`, else the nearest `.adb` walking up from `start`."""
        chosen = explicit or os.environ.get("ADB_STORE")
        if chosen:
            return cls.open(chosen)
        here = (start or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            if (folder / STORE_DIR / "FORMAT").is_file():
                return cls.open(folder)
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
            try:
                self.refs.update(
                    target, oid, head, f"{commit.kind}: {commit.message or commit.task or ''}"
                )
                return oid
            except ConflictError:
                if attempt == retries or commit.parents:
                    raise
        raise AssertionError("unreachable")

    # -- reading ---------------------------------------------------------------------------

    def read_commit(self, oid: str) -> Commit:
        doc = self.objects.get_json(oid)
        if not isinstance(doc, dict) or doc.get("type") != "commit":
            raise AdbError(f"{oid[:12]} is not a commit")
        return Commit.from_json(doc)

    def read_manifest(self, oid: str) -> Manifest:
        doc = self.objects.get_json(oid)
        if not isinstance(doc, dict) or doc.get("type") != "manifest":
            raise AdbError(f"{oid[:12]} is not a manifest")
        return Manifest.from_json(doc)

    def manifest_of(self, rev: str) -> Manifest:
        return self.read_manifest(self.read_commit(self.resolve(rev)).manifest)

    def iter_tensors(
        self, manifest: Manifest, pattern: str | None = None
    ) -> Iterator[tuple[str, RawTensor]]:
        """Decoded, hash-verified tensors one at a time (stream: never the whole model)."""
        for name in self.select(manifest, pattern):
            yield name, self.objects.get_tensor(manifest.tensors[name].id)

    def load_tensors(self, manifest: Manifest, pattern: str | None = None) -> dict[str, RawTensor]:
        """All selected tensors, decoded in parallel (for checkout, which writes them at once)."""
        names = self.select(manifest, pattern)
        with ThreadPoolExecutor(_WORKERS) as pool:
            raws = pool.map(lambda n: self.objects.get_tensor(manifest.tensors[n].id), names)
            return dict(zip(names, raws, strict=True))

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
        """A commit id from `main`, `v1`, `HEAD`, a (short) id, with `~N` / `^N` suffixes."""
        m = _REV_RE.fullmatch(rev.strip())
        if not m:
            raise NotFoundError(
                f"'{rev}' is not a revision; use a branch, tag, commit id or HEAD~N"
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
                    f"HEAD ({ref or 'detached'}) has no commits yet; `adb import` one"
                )
            return oid
        for prefix in (HEADS, TAGS, "refs/"):  # main, v1, experts/main/task
            oid = self.refs.read(prefix + base) if check_name_quietly(base) else None
            if oid:
                return oid
        if re.fullmatch(r"[0-9a-f]{4,64}", base):
            matches = [i for i in self._ids_with_prefix(base) if self.objects.kind(i) == "json"]
            commits = [i for i in matches if self.objects.get_json(i).get("type") == "commit"]
            if len(commits) == 1:
                return commits[0]
            if len(commits) > 1:
                raise AdbError(f"'{base}' is ambiguous ({len(commits)} commits); give more digits")
        raise NotFoundError(f"unknown revision '{base}'; see `adb log`, `adb branch` or `adb tag`")

    def _ids_with_prefix(self, prefix: str) -> list[str]:
        folder = self.objects.dir / prefix[:2]
        if not folder.is_dir():
            return []
        return [prefix[:2] + f.name for f in folder.iterdir() if f.name.startswith(prefix[2:])]

    def log(self, rev: str, limit: int | None = None) -> list[tuple[str, Commit]]:
        """Ancestors of `rev` (all parents), newest first."""
        seen: dict[str, Commit] = {}
        stack = [self.resolve(rev)]
        while stack:
            oid = stack.pop()
            if oid in seen:
                continue
            seen[oid] = c = self.read_commit(oid)
            stack.extend(c.parents)
        ordered = sorted(seen.items(), key=lambda kv: kv[1].time, reverse=True)
        return ordered[:limit] if limit else ordered

    def stored_bytes(self, manifest: Manifest) -> int:
        return sum(
            self.objects.size(e.id) for e in {e.id: e for e in manifest.tensors.values()}.values()
        )

    # -- integrity -------------------------------------------------------------------------

    def _roots(self, with_reflog: bool) -> dict[str, str]:
        """Every commit a ref (or, for gc, a reflog line) keeps alive: label -> commit id."""
        roots = {f"refs/{k}": v for k, v in self.refs.list("refs/").items()}  # heads, tags, experts
        ref, oid = self.refs.head()
        if ref is None and oid:
            roots["HEAD"] = oid
        if with_reflog:
            for r in self.refs.reflog_refs():
                for i, e in enumerate(self.refs.reflog(r)):
                    for v in (e.old, e.new):
                        if v:
                            roots[f"{r}@{{{i}}}"] = v
        return roots

    def _reachable(self, roots: Mapping[str, str], errors: list[str]) -> set[str]:
        """Mark phase: commits, manifests, tensors and masks reachable from `roots`.

        A damaged commit stops the walk on its line (its parents are unknown); a damaged or
        missing manifest does not, so the history behind it is still checked.
        """
        live: set[str] = set()
        stack = list(roots.items())
        while stack:
            label, oid = stack.pop()
            if oid in live:
                continue
            try:
                commit = self.read_commit(oid)
            except AdbError as exc:  # missing or corrupt objects are AdbErrors too
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
        for name, e in manifest.tensors.items():
            live.add(e.id)
            if not self.objects.exists(e.id):
                errors.append(
                    f"missing tensor '{name}' ({e.id[:12]}) of commit {oid[:12]} ({label})"
                )

    def fsck(self, progress: Any = None) -> FsckReport:
        """Re-hash every object, then check that every ref reaches only present objects."""
        report = FsckReport()
        for oid in self.objects.ids():
            report.objects += 1
            try:
                self.objects.verify(oid)
            except (CorruptObjectError, NotFoundError) as exc:
                report.errors.append(str(exc))
            if progress:
                progress()
        self._reachable(self._roots(with_reflog=False), report.errors)
        temps = self.objects.temp_files()
        if temps:
            report.notes.append(
                f"{len(temps)} temp file(s) from interrupted writes; `adb gc` removes them"
            )
        return report

    def gc(self, dry_run: bool = False, grace: float = 3600.0) -> GcReport:
        """Mark from refs and reflog, sweep unreachable objects older than `grace` seconds.

        The grace period protects objects a concurrent writer has stored but not yet
        committed (objects are written before the ref that makes them reachable).
        """
        report = GcReport()
        errors: list[str] = []
        with self.refs.locked():
            live = self._reachable(self._roots(with_reflog=True), errors)
        if errors:
            raise AdbError(f"gc refused: the store has problems ({errors[0]}); run `adb fsck`")
        report.reachable = len(live)
        cutoff = time.time() - grace
        for oid in list(self.objects.ids()):
            path = self.objects.path(oid)
            if oid not in live and path.stat().st_mtime <= cutoff:
                report.removed.append(oid)
                report.bytes_freed += path.stat().st_size
                if not dry_run:
                    path.unlink(missing_ok=True)
        for tmp in self.objects.temp_files():
            if tmp.stat().st_mtime <= cutoff:
                report.temp_files.append(str(tmp))
                if not dry_run:
                    tmp.unlink(missing_ok=True)
        return report


def check_name_quietly(name: str) -> bool:
    try:
        check_ref_name(name)
    except AdbError:
        return False
    return True
