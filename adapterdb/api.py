"""The public Python API: `import adapterdb as adb`.

    store = adb.init("path")                  # or adb.open(): the nearest .adb upwards
    c = store.commit("lora-t1", task="t1")    # a PEFT folder, an Adapter or a dict of tensors
    a = store.checkout("main~1")              # an Adapter: tensors + PEFT config
    m = adb.merge("ties", [a, "lora-t2"], density=0.2)
    store.merge("pam", into="main")           # the continual step

Thin on purpose: each method calls the workflow its CLI verb calls (`trainers.importing` for
`adb import`, `trainers.merge` for `adb merge` and `adb decouple`, `trainers.diff` for
`adb diff`, the store for the rest), so the CLI and the API cannot drift apart. It sits above
the layers and imports them inside functions: `import adapterdb` loads neither torch nor the
store. Bad input is one `AdbError` saying what to fix; what a merge wants the user to know
(a PAM source without a training record, tensors merged as values) is an `AdbWarning`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterdb.adapter import Adapter, adapter_raw, load_peft, read_peft_raw, to_torch
from adapterdb.errors import AdbError

if TYPE_CHECKING:
    import torch

    from adapterdb.merging.registry import Params
    from adapterdb.storage import store as storage
    from adapterdb.storage.commits import Commit
    from adapterdb.trainers.merge import Source


class AdbWarning(UserWarning):
    """Something a merge did that the user should know (the CLI prints these as warnings)."""


@dataclass(frozen=True)
class CommitRecord:
    """One commit, as `adb log --json` and `adb show --json` describe it."""

    id: str
    kind: str  # import, train (an expert), merge, eval
    task: str | None
    method: str | None
    message: str
    time: float  # seconds since 1970, UTC
    author: str
    parents: tuple[str, ...]
    sources: tuple[str, ...]  # what a merge merged (commit ids, or folder:PATH)
    params: dict[str, Any]
    eval: dict[str, Any]
    stats: dict[str, Any]
    base_model: str | None
    manifest: str
    tasks: tuple[str, ...]  # a ConDU commit's tasks: what `Store.decouple` rebuilds

    @property
    def date(self) -> datetime:
        """`time` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.time, tz=timezone.utc)

    @classmethod
    def of(cls, oid: str, c: Commit) -> CommitRecord:
        return cls(
            id=oid,
            kind=c.kind,
            task=c.task,
            method=c.method,
            message=c.message,
            time=c.time,
            author=c.author,
            parents=tuple(c.parents),
            sources=tuple(c.sources),
            params=dict(c.params),
            eval=dict(c.eval),
            stats=dict(c.stats),
            base_model=c.base_model,
            manifest=c.manifest,
            tasks=tuple(c.triggers),
        )


# -- module functions ------------------------------------------------------------------------


def init(path: str | os.PathLike[str] = ".", branch: str = "main") -> Store:
    """Create an empty store in `PATH/.adb` (`adb init`) and open it."""
    from adapterdb.storage.store import Store as Storage

    return Store(Storage.init(_path(path, "path"), _text(branch, "branch")))


def open(path: str | os.PathLike[str] | None = None) -> Store:
    """The store at `path` (a folder holding `.adb`, or `.adb` itself); with no path, the one
    the CLI would use: `ADB_STORE`, else the nearest `.adb` from the current folder upwards."""
    from adapterdb.storage.store import Store as Storage

    if path is None:
        return Store(Storage.find())
    return Store(Storage.open(_path(path, "path")))


def load(path: str | os.PathLike[str]) -> Adapter:
    """A PEFT adapter folder as an `Adapter` (`load_peft`)."""
    return load_peft(_path(path, "path"))


def methods() -> dict[str, dict[str, Any]]:
    """Every merge method `merge` takes, with its parameters' defaults (the papers'):
    the registry's methods (per-tensor and whole-layer: opcm, tsv, ...), plus `pam`
    (average's parameters) and `condu` (emr's; `Store.merge` only)."""
    from adapterdb.merging import registry
    from adapterdb.trainers.merge import ALIASES

    names = sorted({*registry.methods(), *ALIASES})
    return {name: _defaults(registry.get(ALIASES.get(name, name)).params) for name in names}


def merge(
    method: str,
    adapters: Sequence[Adapter | str | os.PathLike[str] | Mapping[str, torch.Tensor]],
    *,
    space: str = "factors",
    rank: int | None = None,
    force: bool = False,
    **params: Any,
) -> Adapter:
    """Merge adapters with a registered method into a new `Adapter` (`adb merge -o`).

    `params` are the method's (`methods()` lists them; `lambda` is spelled `lam`, or passed
    as `**{"lambda": 0.5}`). `space="factors"` merges A and B element-wise; `"product"`
    merges ΔW = B·A·s per layer and refactors to `rank`. Tensors that are values (a
    classifier head, DoRA magnitudes) are merged as weights, as the CLI does.
    """
    from adapterdb.trainers import merge as wf

    if isinstance(adapters, str | os.PathLike | Adapter | Mapping) or not isinstance(
        adapters, Sequence
    ):
        raise AdbError("merge(method, adapters): pass the adapters as a list, e.g. [a1, a2]")
    _check_space(space, rank)
    chosen = _params(_text(method, "method"), params)
    sources = [_source(a, None, f"adapters[{i}]") for i, a in enumerate(adapters)]
    result = wf.merge_standalone(method, chosen, sources, space, rank, force)
    tensors = dict(result.tensors)
    _warn(result.notes)
    return Adapter(tensors, result.config)


# -- the store -------------------------------------------------------------------------------


class Store:
    """A store, opened with `adb.init` or `adb.open`: commit, check out, diff and merge
    adapters, with git's names for things (as GitPython's `Repo`).

    The low-level `adapterdb.storage.Store` it wraps is `.storage`, for what this class does
    not cover (objects, refs, reflogs).
    """

    def __init__(self, storage: storage.Store) -> None:
        self.storage = storage

    def __repr__(self) -> str:
        return f"adapterdb.Store({str(self.path)!r})"

    # -- where things are --------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The `.adb` folder."""
        return self.storage.root

    @property
    def head(self) -> str | None:
        """The commit HEAD is at; None while its branch has no commit."""
        return self.storage.refs.head()[1]

    @property
    def active_branch(self) -> str | None:
        """HEAD's branch; None when HEAD is detached."""
        from adapterdb.storage.refs import HEADS

        ref, _ = self.storage.refs.head_ref()
        return ref.removeprefix(HEADS) if ref else None

    @property
    def branches(self) -> dict[str, str]:
        """Branch name -> commit id."""
        return self.storage.branches()

    @property
    def tags(self) -> dict[str, str]:
        """Tag name -> commit id."""
        return self.storage.tags()

    def experts(self, branch: str | None = None) -> dict[str, str]:
        """Task -> expert commit id of the experts committed on `branch` (HEAD's by default),
        merged or waiting for `merge`."""
        from adapterdb.trainers.branchstate import experts
        from adapterdb.trainers.importing import target_branch

        return experts(
            self.storage, target_branch(self.storage, _text(branch, "branch", optional=True))
        )

    def resolve(self, rev: str) -> str:
        """The commit id of a revision: `main`, `v1`, `HEAD~1`, `main@{1}`, a (short) id."""
        return self.storage.resolve(_text(rev, "revision"))

    # -- history -----------------------------------------------------------------------------

    def commit(
        self,
        adapter: Adapter | str | os.PathLike[str] | Mapping[str, torch.Tensor],
        task: str | None = None,
        message: str = "",
        branch: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        expert: bool = False,
        kind: str = "import",
    ) -> str:
        """Commit an adapter on `branch` (HEAD's by default) as `adb import` does; its id.

        `adapter` is an `Adapter`, a PEFT folder, or a dict of torch tensors with its PEFT
        `config` (a dict or a `peft.LoraConfig`). `expert=True` commits it as the branch's
        expert for `task` (`refs/experts/BRANCH/TASK`, as `adb train` does), leaving the
        branch where it is, so that `merge("pam")` merges it next.
        """
        from adapterdb.trainers.importing import check_import, import_adapter

        target = check_import(
            self.storage,
            _text(task, "task", optional=True),
            _text(branch, "branch", optional=True),
            expert,
            _text(kind, "kind"),
        )
        cfg, raw, metadata, label = _raw_adapter(adapter, config)
        oid, _ = import_adapter(
            self.storage,
            cfg,
            raw,
            metadata,
            branch=target,
            task=task,
            message=_text(message, "message") or f"import {label}",
            expert=expert,
            kind=kind,
        )
        return oid

    def checkout(self, rev: str = "HEAD", tensors: str | None = None) -> Adapter:
        """A revision's adapter (`adb checkout`); `tensors` keeps the names matching a glob.
        `adapterdb.save_peft(adapter, DIR)` writes it as a PEFT folder."""
        manifest = self.storage.manifest_of(_text(rev, "revision"))
        raw = self.storage.load_tensors(manifest, _text(tensors, "tensors", optional=True))
        loaded = {name: to_torch(t) for name, t in raw.items()}
        return Adapter(loaded, dict(manifest.config), dict(manifest.metadata))

    def log(self, rev: str = "HEAD", limit: int | None = None) -> list[CommitRecord]:
        """The history of `rev`, newest first (`adb log`); at most `limit` records."""
        if limit is not None and (type(limit) is not int or limit < 1):
            raise AdbError(f"limit={limit!r}: pass a whole number >= 1, or None for all")
        entries = self.storage.log(_text(rev, "revision"), limit)
        return [CommitRecord.of(oid, c) for oid, c in entries]

    def show(self, rev: str = "HEAD") -> CommitRecord:
        """One commit (`adb show`)."""
        oid = self.resolve(rev)
        return CommitRecord.of(oid, self.storage.read_commit(oid))

    def diff(
        self,
        a: Adapter | str | os.PathLike[str] | Mapping[str, torch.Tensor],
        b: Adapter | str | os.PathLike[str] | Mapping[str, torch.Tensor],
    ) -> dict[str, Any]:
        """Per-tensor and per-LoRA-layer (ΔW) figures of a → b, as `adb diff --json`: relative
        L2, cosine, sign agreement, changed fraction, with summaries. `a` and `b` are
        revisions, PEFT folders or adapters."""
        from adapterdb.trainers.diff import diff_sources

        return diff_sources(_source(a, self.storage, "a"), _source(b, self.storage, "b"))

    # -- branches and tags -------------------------------------------------------------------

    def branch(self, name: str, start: str = "HEAD") -> str:
        """Create branch `name` at `start` (`adb branch NAME START`); the commit it is at."""
        return self._create_ref(name, start, "branch", f"branch: create from {start}")

    def tag(self, name: str, rev: str = "HEAD") -> str:
        """Tag `rev` as `name` (`adb tag NAME REV`); the commit tagged."""
        return self._create_ref(name, rev, "tag", f"tag: {name}")

    def switch(self, name: str) -> None:
        """Make `name` HEAD's branch (`adb branch NAME --switch`)."""
        from adapterdb.storage.refs import check_ref_name

        if check_ref_name(_text(name, "branch")) not in self.branches:
            raise AdbError(f"branch '{name}' does not exist; create it with store.branch('{name}')")
        self.storage.refs.set_head(name)

    def _create_ref(self, name: str, rev: str, what: str, reflog: str) -> str:
        from adapterdb.storage.refs import HEADS, TAGS, check_ref_name

        ref = (HEADS if what == "branch" else TAGS) + check_ref_name(_text(name, what), what)
        existing = self.storage.refs.read(ref)
        if existing is not None:
            raise AdbError(
                f"{what} '{name}' already exists (at {existing[:10]}); pick another name"
            )
        oid = self.resolve(rev)
        self.storage.refs.update(ref, oid, None, reflog)
        return oid

    # -- merging -----------------------------------------------------------------------------

    def merge(
        self,
        method: str,
        into: str | None = None,
        sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = (),
        *,
        space: str = "factors",
        rank: int | None = None,
        force: bool = False,
        message: str = "",
        **params: Any,
    ) -> str:
        """The continual step (`adb merge --into`): merge `sources` (revisions or PEFT folders;
        by default the newest expert not merged yet) into the global adapter of `into` (HEAD's
        branch by default) and commit; the new commit id. `pam` refuses an expert trained
        without alignment unless `force`; `condu` stores triggers for `decouple`."""
        from adapterdb.trainers import merge as wf
        from adapterdb.trainers.importing import target_branch

        _check_space(space, rank)
        chosen = _params(_text(method, "method"), params)
        branch = target_branch(self.storage, _text(into, "into", optional=True))
        specs = [_path(s, "sources") for s in _listed(sources)]
        note = _text(message, "message")
        outcome = wf.merge_into(
            self.storage, branch, method, chosen, specs, space, rank, force, note
        )
        _warn(outcome.warnings)
        return outcome.commit_id

    def decouple(self, rev: str, task: str) -> Adapter:
        """The expert of `task` rebuilt from a ConDU commit (`adb decouple`)."""
        from adapterdb.trainers.merge import decouple_task

        raw, config = decouple_task(self.storage, _text(rev, "revision"), _text(task, "task"))
        return Adapter({name: to_torch(t) for name, t in raw.items()}, dict(config))

    def router(self, rev: str = "HEAD", top_k: int = 2) -> torch.nn.Module:
        """A module that routes each input to its top-k decoupled experts by ConDU's
        prototypes (the paper's inference without task ids)."""
        from adapterdb.trainers.router import router

        return router(self.storage, _text(rev, "revision"), top_k)

    # -- maintenance -------------------------------------------------------------------------

    def fsck(self) -> storage.FsckReport:
        """Re-hash every object and check every ref (`adb fsck`); `.ok`, `.errors`, `.notes`."""
        return self.storage.fsck()

    def gc(self, dry_run: bool = False, **ages: float | None) -> storage.GcReport:
        """Delete what no ref or reflog entry reaches (`adb gc`). `grace=` (seconds, default an
        hour) keeps younger objects; `expire=` (seconds, default 90 days, None: never) first
        drops older reflog entries."""
        unknown = set(ages) - {"grace", "expire"}
        if unknown:
            raise AdbError(
                f"gc() takes dry_run, grace and expire, not {', '.join(sorted(unknown))}"
            )
        for key, value in ages.items():
            if not _number(value) and not (key == "expire" and value is None):
                raise AdbError(f"gc({key}={value!r}): pass an age in seconds")
        return self.storage.gc(dry_run=dry_run, **ages)


# -- checking what Python hands in -----------------------------------------------------------


def _text(value: Any, what: str, optional: bool = False) -> Any:
    """`value` if it is a str (or None, where `optional`): a number or a Path where a name
    belongs would otherwise fail deep inside with a TypeError."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise AdbError(f"{what} must be a str, not {type(value).__name__} ({str(value)[:40]!r})")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_space(space: Any, rank: Any) -> None:
    """`check_space`, after the types Python may get wrong (the CLI's parser gets them right)."""
    from adapterdb.trainers.merge import check_space

    if rank is not None and type(rank) is not int:
        raise AdbError(f"rank={rank!r}: pass a whole number >= 1, or None for the largest input's")
    check_space(_text(space, "space"), rank)


def _path(value: Any, what: str) -> str:
    if not isinstance(value, str | os.PathLike):
        raise AdbError(f"{what}: expected a path (str or Path), not {type(value).__name__}")
    return os.fspath(value)


def _listed(sources: Any) -> list[Any]:
    """One source or a list of them."""
    if isinstance(sources, str | os.PathLike):
        return [sources]
    if not isinstance(sources, Sequence):
        raise AdbError(f"sources: pass revisions or PEFT folders in a list, not {type(sources)}")
    return list(sources)


def _raw_adapter(adapter: Any, config: Any) -> tuple[dict[str, Any], dict[str, Any], Any, str]:
    """(config, raw tensors, metadata, label) of what `Store.commit` was given, checked as
    `adb import` checks a folder."""
    if isinstance(adapter, Mapping) and not isinstance(adapter, Adapter):
        if config is None:
            raise AdbError(
                "a dict of tensors needs its PEFT config: commit(tensors, config=lora_config)"
            )
        config = config.to_dict() if hasattr(config, "to_dict") else config
        adapter = Adapter(dict(adapter), config)
    elif config is not None:
        raise AdbError("config= goes with a dict of tensors; an Adapter or a folder has its own")
    if isinstance(adapter, Adapter):
        cfg, raw = adapter_raw(adapter, "the adapter")
        return cfg, raw, adapter.metadata, "an in-memory adapter"
    if isinstance(adapter, str | os.PathLike):
        cfg, raw, metadata = read_peft_raw(adapter)
        return cfg, raw, metadata, os.fspath(adapter)
    raise AdbError(
        f"commit() takes an Adapter, a PEFT folder or a dict of torch tensors, not "
        f"{type(adapter).__name__}"
    )


def _source(value: Any, store: storage.Store | None, label: str) -> Source:
    """A merge or diff input: a revision or PEFT folder (as the CLI's SOURCES), an `Adapter`,
    or a dict of tensors."""
    from adapterdb.trainers.merge import adapter_source, open_source

    if isinstance(value, Adapter):
        return adapter_source(value, label)
    if isinstance(value, Mapping):
        return adapter_source(Adapter(dict(value)), label)
    if isinstance(value, str | os.PathLike):
        return open_source(os.fspath(value), store)
    raise AdbError(
        f"{label} is a {type(value).__name__}; pass an Adapter, a dict of tensors, a PEFT "
        "folder or a revision"
    )


def _params(method: str, values: Mapping[str, Any]) -> Params:
    """Keyword arguments -> the method's typed parameters, through the parser `--param`
    uses, so both accept and refuse the same values with the same messages."""
    from adapterdb.trainers.merge import parse_params

    return parse_params(method, [f"{key}={_param_text(v)}" for key, v in values.items()])


def _param_text(value: Any) -> str:
    """A Python value as `--param` writes it (`weights=[0.3, 0.7]` -> `0.3,0.7`); str() of a
    float round-trips exactly."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _defaults(params: type) -> dict[str, Any]:
    from adapterdb.merging.registry import cli_name

    return {cli_name(f.name): f.default for f in dataclasses.fields(params)}


def _warn(notes: Sequence[str]) -> None:
    for note in notes:
        warnings.warn(note, AdbWarning, stacklevel=3)
