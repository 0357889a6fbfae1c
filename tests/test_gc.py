"""gc beside running writers, reflog expiry, healing of corrupt objects, clean failures.

Each test here reproduces a finding of issue 12 that the store got wrong before: gc --grace 0
deleting a commit in flight, a corrupt object reused forever, a ref moved although its reflog
line failed, temp files piling up on a full disk, a checkout killed between its two files,
and reflogs that never let go of a deleted branch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ADB, adb_env, lora_tensors, make_peft, peft_config, run_adb

from adapterdb import failpoints
from adapterdb.adapter import CONFIG_FILE, WEIGHTS_FILE
from adapterdb.errors import CorruptObjectError
from adapterdb.storage.commits import Commit
from adapterdb.storage.objects import PINS_DIR, TMP_DIR
from adapterdb.storage.refs import HEADS, ReflogEntry
from adapterdb.storage.store import STORE_DIR, Store

MAIN = HEADS + "main"


def commit_adapter(store: Store, seed: int, branch: str = "main") -> str:
    manifest = store.put_adapter(lora_tensors(seed), peft_config())
    return store.commit(Commit(manifest=manifest, kind="import", provenance={"t": 1}), branch)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# -- gc beside writers -----------------------------------------------------------------------


def test_gc_grace_0_keeps_what_a_writer_has_not_committed_yet(store: Store) -> None:
    """A writer has stored its tensors and manifest; gc (another Store, as another process
    would be) runs with --grace 0 before the ref moves; the commit must still be whole."""
    base = commit_adapter(store, 0)
    writer = Store(store.root)
    manifest = writer.put_adapter(lora_tensors(1), peft_config())
    report = Store(store.root).gc(grace=0)
    assert manifest not in report.removed and writer.objects.exists(manifest)
    oid = writer.commit(Commit(manifest=manifest, kind="import", provenance={"t": 1}), "main")
    assert store.read_commit(oid).parents == (base,)
    assert store.fsck().ok and len(store.load_tensors(store.manifest_of("main"))) == 4
    assert list((store.root / PINS_DIR).iterdir()) == []  # committed: the claim is dropped


def test_gc_grace_0_keeps_an_old_object_a_writer_reuses(store: Store) -> None:
    """A writer reuses an unreachable (deleted branch) object: gc must not sweep it."""
    commit_adapter(store, 0)
    lost = commit_adapter(store, 5, branch="tmp")
    store.refs.update(HEADS + "tmp", None, lost, "branch: delete tmp")
    old = time.time() - 7200
    for oid in store.objects.ids():
        os.utime(store.objects.path(oid), (old, old))
    writer = Store(store.root)
    manifest = writer.put_adapter(lora_tensors(5), peft_config())  # all of it exists already
    Store(store.root).gc(grace=0, expire=0)  # the deleted branch's reflog expires too
    writer.commit(Commit(manifest=manifest, kind="import", provenance={"t": 1}), "main")
    assert store.fsck().ok and len(store.load_tensors(store.manifest_of("main"))) == 4


GC_LOOP = """
import subprocess, sys, time
from pathlib import Path
adb, repo, stop = sys.argv[1:]
runs = refused = 0
while not Path(stop).exists():
    p = subprocess.run([adb, "gc", "--grace", "0"], cwd=repo, capture_output=True, text=True)
    runs += 1
    if p.returncode != 0:
        refused += 1
        print(p.stderr.strip(), file=sys.stderr)
print(runs, refused)
"""


@pytest.mark.slow
def test_gc_grace_0_looping_beside_imports(repo: Path, tmp_path: Path) -> None:
    """The reproduction of the issue: `gc --grace 0` in a loop beside `adb import`s (before,
    about 1 import in 25 ended with a ref naming a commit whose manifest gc had deleted)."""
    folders = [make_peft(tmp_path / f"a{i}", 100 + i) for i in range(30)]
    stop = tmp_path / "stop"
    loop = subprocess.Popen(
        [sys.executable, "-c", GC_LOOP, ADB, str(repo), str(stop)],
        env=adb_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        commits = []
        for i, folder in enumerate(folders):
            rc, out, err = run_adb(["import", str(folder), "-m", f"i{i}"], repo)
            assert rc == 0, err
            commits.append(out.split()[1].rstrip("]"))
            store = Store.open(repo)
            store.load_tensors(store.manifest_of("main"))  # every new head checks out
    finally:
        stop.touch()
        out, err = loop.communicate(timeout=120)
    runs, refused = map(int, out.split())
    assert runs >= 3 and refused == 0, err
    store = Store.open(repo)
    assert store.fsck().ok
    log = [oid[:10] for oid, _ in store.log("main")]
    assert log == commits[::-1]


# -- failures leave nothing moved and nothing behind ----------------------------------------


def test_reflog_write_failing_moves_no_ref(repo: Path, peft_dir) -> None:  # type: ignore[no-untyped-def]
    """Disk full at the reflog append: before, the ref had already moved (exit 1, yet
    committed), so the retry committed twice."""
    a, b = peft_dir("a", 1), peft_dir("b", 2)
    assert run_adb(["import", str(a)], repo)[0] == 0
    store = Store.open(repo)
    head, log = store.refs.read(MAIN), (store.root / "logs" / MAIN).read_bytes()
    for point in ("reflog.append", "reflog.fsync", "ref.rename", "ref.fsync_dir"):
        rc, _, err = run_adb(["import", str(b)], repo, {"ADB_FAILPOINT": f"{point}:enospc"})
        assert rc == 1 and "No space left" in one_line(err), (point, err)
        assert store.refs.read(MAIN) == head, point
        assert (store.root / "logs" / MAIN).read_bytes() == log, point
    assert run_adb(["import", str(b)], repo)[0] == 0  # the retry commits once
    assert [c for c, _ in store.log("main")][1:] == [head]


def test_failed_imports_leave_no_temp_files(repo: Path, peft_dir) -> None:  # type: ignore[no-untyped-def]
    """Before: 36 temp files after 9 failed imports on a full disk."""
    for seed in range(9):
        folder = peft_dir(f"x{seed}", seed)
        spec = f"object.{('write', 'fsync', 'rename')[seed % 3]}:enospc:{1 + seed % 4}"
        rc, _, err = run_adb(["import", str(folder)], repo, {"ADB_FAILPOINT": spec})
        assert rc == 1, err
    root = repo / STORE_DIR
    assert Store.open(root).objects.temp_files() == []
    assert list((root / PINS_DIR).iterdir()) == [] and list((root / TMP_DIR).iterdir()) == []
    assert Store.open(root).refs.read(MAIN) is None and Store.open(root).fsck().ok


def test_killed_checkout_leaves_neither_half_nor_hidden_files(
    repo: Path,
    peft_dir,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """Killed after the weights, before the config: before, OUT held weights without config
    and a hidden temp file; now OUT does not exist, and the next checkout cleans up."""
    assert run_adb(["import", str(peft_dir("a", 1))], repo)[0] == 0
    out = tmp_path / "out"
    for spec in ("output.write:kill:2", "output.fsync_dir:kill:1", "output.rename:kill"):
        rc, _, _ = run_adb(["checkout", "main", "-o", str(out)], repo, {"ADB_FAILPOINT": spec})
        assert rc == -9 and not out.exists(), spec
    assert run_adb(["checkout", "main", "-o", str(out)], repo)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_killed_forced_checkout_is_finished_by_the_next(
    repo: Path,
    peft_dir,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """Overwriting a folder that holds more files: killed between its two moves, the mix is
    refused by every reader, and the next write finishes it (other files kept)."""
    assert run_adb(["import", str(peft_dir("a", 1))], repo)[0] == 0
    out = peft_dir("old", 9)
    (out / "README.md").write_text("mine\n")
    spec = {"ADB_FAILPOINT": "output.move:kill:2"}
    assert run_adb(["checkout", "main", "-o", str(out), "--force"], repo, spec)[0] == -9
    rc, _, err = run_adb(["import", str(out)], repo)
    assert rc != 0 and "was being written" in one_line(err)
    assert run_adb(["checkout", "main", "-o", str(out), "--force"], repo)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", CONFIG_FILE, WEIGHTS_FILE]
    assert [p.name for p in out.parent.iterdir() if ".adb-" in p.name] == []
    rc, _, err = run_adb(["import", str(out)], repo)
    assert rc == 0, err


def test_failpoint_spec_is_checked() -> None:
    with pytest.raises(Exception, match="NAME:ACTION"):
        failpoints.arm("object.write:explode")
    failpoints.arm(None)


# -- healing ---------------------------------------------------------------------------------


def corrupt(store: Store, oid: str) -> None:
    path = store.objects.path(oid)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF  # inside the compressed frames: decodes wrong or not at all
    path.chmod(0o644)
    path.write_bytes(bytes(blob))


def test_corrupt_object_is_rewritten_by_the_next_commit_that_needs_it(
    repo: Path,
    peft_dir,  # type: ignore[no-untyped-def]
) -> None:
    """Before: re-importing reused the corrupt object, exit 0, and the commit could not be
    checked out."""
    folder = peft_dir("a", 1)
    assert run_adb(["import", str(folder)], repo)[0] == 0
    store = Store.open(repo)
    victim = sorted(e.id for e in store.manifest_of("main").tensors.values())[0]
    corrupt(store, victim)
    with pytest.raises(CorruptObjectError):
        store.objects.verify(victim)
    assert not store.fsck().ok
    rc, _, err = run_adb(["import", str(folder), "-m", "again"], repo)
    assert rc == 0, err
    store.objects.verify(victim)  # healed
    assert len(store.load_tensors(store.manifest_of("main"))) == 4
    rc, out, _ = run_adb(["fsck", "--json"], repo)
    report = json.loads(out)
    assert rc == 0 and report["ok"], report
    assert any(victim[:12] in n and "healed" in n for n in report["notes"]), report


def test_reuse_of_intact_objects_heals_nothing(store: Store) -> None:
    commit_adapter(store, 1)
    commit_adapter(store, 1)
    assert store.objects.healed() == [] and not store.fsck().notes


# -- reflog expiry ---------------------------------------------------------------------------


def age_reflog(store: Store, ref: str, days: float) -> None:
    entries = store.refs.reflog(ref)
    stamp = time.time() - days * 86400
    with store.refs.locked():
        store.refs.write_reflog(ref, [ReflogEntry(e.old, e.new, stamp, e.message) for e in entries])


def test_gc_expires_a_deleted_branch_and_reclaims_its_space(store: Store) -> None:
    """Before: reflogs never expired, so a deleted branch's commits were kept forever."""
    commit_adapter(store, 0)
    lost = commit_adapter(store, 7, branch="tmp")
    store.refs.update(HEADS + "tmp", None, lost, "branch: delete tmp")
    lost_objects = {lost, store.read_commit(lost).manifest} | {
        e.id for e in store.manifest_of(lost).tensors.values()
    }
    dry = Store(store.root).gc(dry_run=True, grace=0)
    assert dry.reflog_expired == {HEADS + "tmp": 2} and lost_objects <= set(dry.removed)
    assert (store.root / "logs" / HEADS / "tmp").is_file() and store.objects.exists(lost)
    kept = Store(store.root).gc(grace=0, expire=None)  # never: the reflog keeps it
    assert kept.removed == [] and kept.reflog_expired == {}
    done = Store(store.root).gc(grace=0)
    assert set(done.removed) == set(dry.removed) and done.bytes_freed == dry.bytes_freed > 0
    assert not (store.root / "logs" / HEADS / "tmp").exists()
    assert not any(store.objects.exists(o) for o in lost_objects) and store.fsck().ok


def test_gc_expires_entries_older_than_the_age(store: Store) -> None:
    first = commit_adapter(store, 0)
    second = commit_adapter(store, 1)
    store.refs.update(MAIN, first, second, "reset: back to the first")  # second: reflog only
    age_reflog(store, MAIN, 40)
    store.refs.update(MAIN, first, first, "touch")  # a young entry stays
    report = Store(store.root).gc(grace=0, expire=30 * 86400)
    assert report.reflog_expired == {MAIN: 3} and second in report.removed
    assert [e.message for e in store.refs.reflog(MAIN)] == ["touch"]
    assert store.refs.read(MAIN) == first and store.fsck().ok


def test_gc_cli_expire_dry_run_and_json(repo: Path, peft_dir) -> None:  # type: ignore[no-untyped-def]
    for i, args in enumerate((["-b", "main"], ["-b", "tmp"])):
        assert run_adb(["import", str(peft_dir(f"a{i}", i)), *args], repo)[0] == 0
    assert run_adb(["branch", "-d", "tmp"], repo)[0] == 0
    before = {p: p.read_bytes() for p in (repo / STORE_DIR).rglob("*") if p.is_file()}
    rc, out, err = run_adb(["gc", "--dry-run", "--grace", "0", "--json"], repo)
    assert rc == 0, err
    dry = json.loads(out)
    assert dry["reflog_expired"] == {"refs/heads/tmp": 2} and dry["reflog_entries_expired"] == 2
    assert len(dry["removed"]) == 6 and dry["bytes_freed"] > 0  # commit, manifest, 4 tensors
    after = {p: p.read_bytes() for p in (repo / STORE_DIR).rglob("*") if p.is_file()}
    assert after == before  # a dry run changes nothing
    rc, out, _ = run_adb(["gc", "--dry-run", "--grace", "0"], repo)
    assert "would remove 6 object(s)" in out and "would expire 2 reflog entries" in out
    rc, out, _ = run_adb(["gc", "--grace", "0", "--expire", "now", "--json"], repo)
    done = json.loads(out)
    assert rc == 0 and sorted(done["removed"]) == sorted(dry["removed"])
    assert done["reflog_expired"] == {"refs/heads/main": 1, "refs/heads/tmp": 2}
    assert Store.open(repo).fsck().ok
    for bad in (["--expire", "soon"], ["--grace", "-1"]):
        rc, _, err = run_adb(["gc", *bad], repo)
        assert rc != 0 and one_line(err), err
