"""The store: revisions, history, gc, crash ordering, provenance."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import lora_tensors, peft_config, snapshot

from adapterdb.adapter import read_peft_raw
from adapterdb.errors import AdbError, ConflictError, NotFoundError
from adapterdb.storage.commits import Commit
from adapterdb.storage.objects import canonical_json
from adapterdb.storage.refs import HEADS, RefStore
from adapterdb.storage.store import STORE_DIR, Store
from adapterdb.tensorfile import RawTensor


def commit_adapter(store: Store, seed: int, branch: str = "main", **kw: object) -> str:
    manifest = store.put_adapter(lora_tensors(seed), peft_config())
    fields = {"kind": "import", "task": f"t{seed}", "provenance": {"test": True}, **kw}
    return store.commit(Commit(manifest=manifest, **fields), branch)  # type: ignore[arg-type]


@pytest.fixture
def history(store: Store) -> list[str]:
    """main: c1 <- c2 <- c3, tag v1 at c1."""
    ids = [commit_adapter(store, seed) for seed in range(3)]
    store.refs.update("refs/tags/v1", ids[0], None, "tag")
    return ids


# -- locating ------------------------------------------------------------------------------


def test_init_open_find(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AdbError, match="already a store"):
        Store.init(repo)
    nested = repo / "a" / "b"
    nested.mkdir(parents=True)
    assert Store.find(start=nested).root == repo / STORE_DIR
    assert Store.open(repo).root == Store.open(repo / STORE_DIR).root
    monkeypatch.setenv("ADB_STORE", str(repo))
    assert Store.find(start=Path("/")).root == repo / STORE_DIR
    with pytest.raises(AdbError, match="not an adb store"):
        Store.find(explicit=str(nested))
    (repo / STORE_DIR / "FORMAT").write_text("adapterdb-store 99\n")
    with pytest.raises(AdbError, match="unknown format"):
        Store.open(repo)


# -- revisions -------------------------------------------------------------------------------


def test_revision_parsing(store: Store, history: list[str]) -> None:
    c1, c2, c3 = history
    cases = {
        "main": c3,
        "HEAD": c3,
        "v1": c1,
        c2: c2,
        c2[:4]: c2,
        c2[:10]: c2,
        "HEAD~2": c1,
        "HEAD^": c2,
        "HEAD^1": c2,
        "HEAD~0": c3,
        "HEAD^0": c3,
        "main~1^": c1,
        "HEAD^^": c1,
        f"{c3[:8]}~1": c2,
        " main ": c3,
    }
    for rev, want in cases.items():
        assert store.resolve(rev) == want, rev
    for rev in ("HEAD~3", "v1^", "main~1^^", "HEAD^2"):
        with pytest.raises(NotFoundError, match="past the start"):
            store.resolve(rev)
    for rev in ("nope", "abc", "0" * 64, "~1", "main~x"):
        with pytest.raises(NotFoundError):
            store.resolve(rev)


def test_short_id_of_a_non_commit_is_not_a_revision(store: Store, history: list[str]) -> None:
    manifest = store.read_commit(history[0]).manifest
    with pytest.raises(NotFoundError, match="unknown revision"):
        store.resolve(manifest[:8])


def test_empty_branch_head(store: Store) -> None:
    with pytest.raises(NotFoundError, match="no commits yet"):
        store.resolve("HEAD")


def json_id(doc: dict[str, object]) -> str:
    return hashlib.sha256(b"json\0" + canonical_json(doc)).hexdigest()


def test_ambiguous_short_id(store: Store, history: list[str]) -> None:
    """Two commits sharing 4 hex digits: the 4-digit form is refused, a longer one resolves."""
    manifest = store.read_commit(history[0]).manifest
    by_prefix: dict[str, dict[str, object]] = {}
    for i in itertools.count():
        doc = Commit(manifest=manifest, kind="import", message=f"m{i}", time=1.0).to_json()
        prefix = json_id(doc)[:4]
        if prefix in by_prefix:
            break
        by_prefix[prefix] = doc
    first, second = store.objects.put_json(by_prefix[prefix]), store.objects.put_json(doc)
    assert first[:4] == second[:4] and first != second
    with pytest.raises(AdbError, match="ambiguous"):
        store.resolve(prefix)
    digits = next(n for n in range(5, 64) if first[:n] != second[:n])
    assert store.resolve(first[:digits]) == first
    assert store.resolve(second[:digits] + "~0") == second


# -- history ---------------------------------------------------------------------------------


def test_log_order_and_merges(store: Store, history: list[str]) -> None:
    c1, c2, c3 = history
    assert [oid for oid, _ in store.log("main")] == [c3, c2, c1]
    assert [oid for oid, _ in store.log("main", limit=2)] == [c3, c2]
    assert [oid for oid, _ in store.log("v1")] == [c1]
    side = commit_adapter(store, 7, branch="side")
    merge = commit_adapter(store, 8, parents=(c3, side))
    assert store.refs.read(HEADS + "main") == merge
    assert [oid for oid, _ in store.log("HEAD")] == [merge, side, c3, c2, c1]
    assert store.resolve("HEAD^2") == side
    assert [c.task for _, c in store.log("main")][:2] == ["t8", "t7"]


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_adapter_tensors_round_trip(
    store: Store, peft_dir: Callable[..., Path], dtype: str
) -> None:
    config, tensors, metadata = read_peft_raw(peft_dir("a", seed=4, dtype=dtype))
    manifest = store.read_manifest(store.put_adapter(tensors, config, metadata))
    assert manifest.config == config and manifest.metadata == metadata == {"format": "pt"}
    loaded = store.load_tensors(manifest)
    streamed = dict(store.iter_tensors(manifest))
    for name, t in tensors.items():
        assert loaded[name].data.tobytes() == streamed[name].data.tobytes() == t.data.tobytes()
        assert manifest.tensors[name].shape == t.shape and manifest.tensors[name].dtype == dtype
    assert sorted(store.load_tensors(manifest, "*conv*")) == [
        n for n in sorted(tensors) if "conv" in n
    ]
    with pytest.raises(NotFoundError, match="no tensor matches"):
        store.select(manifest, "*nothing*")


def test_unknown_commit_fields_survive(store: Store) -> None:
    doc = Commit(manifest="ab" * 32, kind="merge").to_json()
    doc["future_field"] = {"x": 1}
    oid = store.objects.put_json(doc)
    commit = store.read_commit(oid)
    assert commit.extra == {"future_field": {"x": 1}}
    assert commit.to_json()["extra"] == {"future_field": {"x": 1}}


# -- crash ordering --------------------------------------------------------------------------


def test_commit_writes_objects_before_the_ref(
    store: Store, history: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = store.refs.read(HEADS + "main")
    seen: dict[str, bool] = {}

    def crash(
        self: RefStore, ref: str, new: str | None, expected: str | None, message: str
    ) -> None:
        commit = store.read_commit(new)  # type: ignore[arg-type]
        manifest = store.read_manifest(commit.manifest)
        seen["complete"] = all(store.objects.exists(e.id) for e in manifest.tensors.values())
        raise OSError("simulated crash before the ref moves")

    monkeypatch.setattr(RefStore, "update", crash)
    with pytest.raises(OSError, match="simulated"):
        commit_adapter(store, 11)
    monkeypatch.undo()
    assert seen == {"complete": True}
    assert store.refs.read(HEADS + "main") == before
    assert [(e.old, e.new) for e in store.refs.reflog(HEADS + "main")][-1][1] == before
    assert store.fsck().ok


def test_pinned_expected_head_conflicts(store: Store, history: list[str]) -> None:
    manifest = store.read_commit(history[0]).manifest
    with pytest.raises(ConflictError):
        store.commit(
            Commit(manifest=manifest, kind="import", provenance={"t": 1}),
            "main",
            expected=history[1],
        )
    assert store.refs.read(HEADS + "main") == history[2]


# -- gc --------------------------------------------------------------------------------------


def age(path: Path, seconds: float) -> None:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def garbage(store: Store, seed: int) -> set[str]:
    """Objects no commit reaches: a tensor and a JSON document."""
    rng = np.random.default_rng(seed)
    t = RawTensor("F32", (16,), rng.integers(0, 256, 64, dtype=np.uint8))
    return {store.objects.put_tensor(t), store.objects.put_json({"junk": seed})}


@pytest.fixture
def gc_store(store: Store, history: list[str]) -> tuple[Store, str, set[str]]:
    """main c1..c3, a deleted branch whose commit only its reflog keeps, and two junk objects."""
    lost = commit_adapter(store, 20, branch="tmp")
    store.refs.update(HEADS + "tmp", None, lost, "branch: delete tmp")
    return store, lost, garbage(store, 0)


def test_gc_removes_unreachable_only(gc_store: tuple[Store, str, set[str]]) -> None:
    store, lost, junk = gc_store
    everything = set(store.objects.ids())
    report = store.gc(grace=0, expire=None)  # reflogs never expire: the deleted branch stays
    assert set(report.removed) == junk
    assert set(store.objects.ids()) == everything - junk
    assert report.bytes_freed > 0 and report.reachable == len(everything - junk)
    assert store.fsck().ok
    for rev in ("main", "HEAD~1", "v1", lost):  # every kept commit still checks out
        manifest = store.manifest_of(rev)
        assert len(store.load_tensors(manifest)) == len(manifest.tensors)


def test_gc_follows_the_reflog(gc_store: tuple[Store, str, set[str]]) -> None:
    store, lost, junk = gc_store
    lost_objects = {lost, store.read_commit(lost).manifest}
    (store.root / "logs" / HEADS / "tmp").unlink()  # forget the deleted branch's history
    removed = set(store.gc(grace=0).removed)
    assert lost_objects | junk <= removed
    assert store.fsck().ok


def test_gc_dry_run_removes_nothing(gc_store: tuple[Store, str, set[str]]) -> None:
    store, _, junk = gc_store
    temp = store.objects.dir / "ab" / ".tmp-1-abcdef"
    temp.parent.mkdir(exist_ok=True)
    temp.write_bytes(b"partial")
    age(temp, 10)
    before = snapshot(store.root)
    report = store.gc(dry_run=True, grace=0, expire=None)
    assert set(report.removed) == junk and report.temp_files == [str(temp)]
    assert snapshot(store.root) == before
    assert store.gc(grace=0, expire=None).temp_files == [str(temp)] and not temp.exists()


def test_gc_grace_keeps_young_objects(gc_store: tuple[Store, str, set[str]]) -> None:
    store, _, junk = gc_store
    young, old = sorted(junk)
    age(store.objects.path(old), 7200)
    assert store.gc(grace=3600).removed == [old]
    assert store.objects.exists(young)


def test_gc_grace_counts_from_the_last_reuse(store: Store, history: list[str]) -> None:
    """An old unreachable object that a writer stores again is young again (not swept)."""
    (junk,) = [o for o in garbage(store, 1) if store.objects.kind(o) == "json"]
    age(store.objects.path(junk), 7200)
    assert store.objects.put_json({"junk": 1}) == junk  # a writer about to commit reuses it
    assert store.gc(grace=3600).removed == []
    assert store.objects.exists(junk)


# -- provenance ------------------------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def test_provenance_records_repo_head_and_dirty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    git(code, "init", "-q")
    (code / "train.py").write_text("print('v1')\n")
    git(code, "add", "train.py")
    git(code, "commit", "-q", "-m", "v1")
    sha = git(code, "rev-parse", "HEAD").strip()
    store = Store.init(code)  # the store itself is untracked: it must not make the tree dirty
    (code / "sub").mkdir()
    monkeypatch.chdir(code / "sub")
    manifest = store.put_adapter(lora_tensors(0), peft_config())
    clean = store.read_commit(store.commit(Commit(manifest=manifest, kind="train"), "main"))
    assert Path(clean.provenance["repo"]).resolve() == code.resolve()
    assert clean.provenance["commit"] == sha and clean.provenance["dirty"] is False
    (code / "train.py").write_text("print('v2')\n")
    dirty = store.read_commit(store.commit(Commit(manifest=manifest, kind="train"), "main"))
    assert dirty.provenance == {**clean.provenance, "dirty": True}
    assert dirty.author and dirty.time >= clean.time


def test_fsck_walks_past_a_missing_manifest(store: Store, history: list[str]) -> None:
    """A head whose manifest is gone is reported, and the history behind it is still checked."""
    head, oldest = store.read_commit(history[2]), store.read_commit(history[0])
    store.objects.path(head.manifest).unlink()
    old_tensor = next(iter(store.read_manifest(oldest.manifest).tensors.values())).id
    store.objects.path(old_tensor).unlink()
    errors = store.fsck().errors
    assert any(f"manifest of commit {history[2][:12]}" in e for e in errors)
    assert any(old_tensor[:12] in e and history[0][:12] in e for e in errors)
