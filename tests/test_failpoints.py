"""Fault injection: every durable step of every writing verb, killed or failing, in turn.

For each verb the walk first runs it once with `ADB_FAILPOINT_RECORD` to learn which
failpoints it passes and how often (so a failpoint added later is walked without touching
this file), then, on a fresh copy of one baseline store per case, runs the real `adb` with
one failpoint armed: SIGKILL at its first and last hit, ENOSPC at the first, EIO at the last.
After each case:

- `fsck` is clean and every commit the baseline's refs reached is still there;
- every ref and HEAD holds its old value or the new one (a commit equal to the reference
  run's: same manifest, same parents); a command that *failed* (exit 1, one line) moved
  nothing and left its reflogs as they were;
- an output folder holds the old adapter or the new one, never a mix that reads as valid;
- a retry succeeds and ends where an undisturbed run ends;
- after it no temp file, pin file or stage folder is left, in the store or beside the output
  (after a failure, none is left even before it: a failing write removes its own).

A failure that left everything as it was is not retried: that retry is the reference run.

Plus a real full disk: a small tmpfs filled to each level of free space in turn.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_peft, run_adb

from adapterdb.adapter import CONFIG_FILE, WEIGHTS_FILE, read_peft_raw
from adapterdb.errors import AdbError
from adapterdb.failpoints import RECORD_ENV
from adapterdb.storage.objects import PINS_DIR, TEMP_PREFIX, TMP_DIR
from adapterdb.storage.store import STORE_DIR, Store


@dataclass(frozen=True)
class Verb:
    name: str
    argv: tuple[str, ...]  # run in WORK/repo
    output: str | None = None  # the folder under WORK it writes, if any
    creates: bool = False  # once it got through, running it again says "already"/"not exist"


VERBS = {
    v.name: v
    for v in (
        Verb("import", ("import", "../c", "--task", "tc")),
        Verb("tag", ("tag", "v2", "main"), creates=True),
        Verb("branch", ("branch", "dev", "main~1"), creates=True),
        Verb("branch_delete", ("branch", "-d", "old"), creates=True),
        Verb("switch", ("branch", "side", "--switch")),
        Verb("checkout", ("checkout", "main~1", "-o", "../cout"), output="cout"),
        Verb("checkout_force", ("checkout", "main", "-o", "../exist", "--force"), "exist"),
        Verb("gc", ("gc", "--grace", "0", "--expire", "now")),
        Verb("merge_into", ("merge", "--method", "average", "--into", "main", "../c")),
        Verb(
            "merge_out", ("merge", "--method", "average", "main", "../c", "-o", "../mout"), "mout"
        ),
        Verb("decouple", ("decouple", "cb", "--task", "b", "-o", "../dout"), output="dout"),
    )
}
SLOW = {"merge_into", "merge_out", "decouple"}  # each run imports torch: seconds, not 0.3 s


def ok(args: list[str], cwd: Path) -> str:
    rc, out, err = run_adb(args, cwd)
    assert rc == 0, f"adb {' '.join(args)}: {err}"
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WORK/: PEFT folders a, b, c; an adapter folder `exist` with a README; repo/ with
    main = import a, import b; cb = ConDU of a and b; branches old, side; tag v1; a deleted
    branch (its reflog keeps a commit) and an unreachable object (gc has work to do)."""
    work = tmp_path_factory.mktemp("fp") / "work"
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("gone", 4)):
        make_peft(work / name, seed)
    make_peft(work / "exist", 5)
    (work / "exist" / "README.md").write_text("keep me\n")
    repo = work / "repo"
    repo.mkdir()
    ok(["init"], repo)
    ok(["import", "../a", "--task", "ta"], repo)
    ok(["import", "../b", "--task", "tb"], repo)
    ok(["merge", "--method", "condu", "--into", "cb", "../a", "../b"], repo)
    for args in (
        ["branch", "old", "main~1"],
        ["branch", "side", "main"],
        ["tag", "v1", "main~1"],
        ["import", "../gone", "-b", "gone"],
        ["branch", "-d", "gone"],
    ):
        ok(args, repo)
    store = Store.open(repo)
    store.objects.put_json({"junk": True})
    store.objects.release()
    return work


def refs_of(root: Path) -> dict[str, str]:
    """HEAD and every ref file's content, by path."""
    out = {"HEAD": (root / "HEAD").read_text()}
    for p in sorted((root / "refs").rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = p.read_text()
    return out


def reflogs_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted((root / "logs").rglob("*"))
        if p.is_file()
    }


def folder_files(folder: Path) -> dict[str, bytes] | None:
    if not folder.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def committed(store: Store) -> set[str]:
    """Objects reachable from the refs (not the reflogs): what must never be lost."""
    errors: list[str] = []
    live = store._reachable(store._roots(with_reflog=False), errors)
    assert not errors, errors
    return live


def same_value(store: Store, ref_store: Store, got: str, want: str) -> bool:
    """Equal, or both commits made alike (ids differ only by time and author stamp)."""
    if got == want:
        return True
    if len(got.strip()) != 64 or len(want.strip()) != 64:
        return False
    a, b = store.read_commit(got.strip()), ref_store.read_commit(want.strip())
    return (a.manifest, a.parents, a.kind) == (b.manifest, b.parents, b.kind)


def leftovers(work: Path, verb: Verb) -> list[str]:
    """Temp files, pin files and stage folders: none may survive the next command."""
    root = work / "repo" / STORE_DIR
    found = [str(p) for p in (root / TMP_DIR).glob("*")] if (root / TMP_DIR).is_dir() else []
    found += [str(p) for p in (root / PINS_DIR).glob("*")] if (root / PINS_DIR).is_dir() else []
    found += [str(p) for p in root.rglob(f"{TEMP_PREFIX}*")]
    found += [str(p) for p in work.glob(".*.adb-*")]
    if verb.output and (work / verb.output).is_dir():
        found += [str(p) for p in (work / verb.output).iterdir() if p.name.startswith(".")]
    return found


@dataclass
class Reference:
    refs: dict[str, str]
    reflogs: dict[str, bytes]
    output: dict[str, bytes] | None
    objects: set[str]
    store: Store


def run_verb(work: Path, verb: Verb, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    return run_adb(list(verb.argv), work / "repo", env)


def fresh_copy(baseline: Path, dest: Path) -> Path:
    shutil.copytree(baseline, dest, symlinks=True)
    return dest


def discover(baseline: Path, tmp: Path, verb: Verb) -> tuple[Counter[str], Reference]:
    """Run `verb` undisturbed, recording its failpoints; its end state is the reference."""
    work = fresh_copy(baseline, tmp / "reference")
    record = tmp / "record.txt"
    rc, _, err = run_verb(work, verb, {RECORD_ENV: str(record)})
    assert rc == 0, err
    hits = Counter(record.read_text().split())
    root = work / "repo" / STORE_DIR
    store = Store.open(root)
    output = folder_files(work / verb.output) if verb.output else None
    return hits, Reference(refs_of(root), reflogs_of(root), output, set(store.objects.ids()), store)


def cases(hits: Counter[str], thorough: bool) -> Iterator[tuple[str, str, int]]:
    """(failpoint, action, which hit): kill and ENOSPC at the first hit of each failpoint;
    kill and EIO at the last. The slow verbs (a torch import per run) pass the same store
    steps as `import`, so for them the last hits are walked for the busiest failpoint only."""
    busiest = max(hits, key=lambda k: (hits[k], k))
    for name, n in sorted(hits.items()):
        yield name, "kill", 1
        yield name, "enospc", 1
        if n > 1 and (thorough or name == busiest):
            yield name, "kill", n
            yield name, "eio", n


def check_case(baseline: Path, work: Path, verb: Verb, ref: Reference, spec: str) -> None:
    root = work / "repo" / STORE_DIR
    before_refs, before_logs = refs_of(root), reflogs_of(root)
    before_out = folder_files(work / verb.output) if verb.output else None
    must_keep = committed(Store.open(root))

    rc, _, err = run_verb(work, verb, {"ADB_FAILPOINT": spec})
    what = f"{verb.name} @ {spec}"
    killed = spec.split(":")[1] == "kill"
    if killed:
        assert rc in (-9, 0), f"{what}: rc {rc}: {err}"  # 0: the failpoint came too late
    else:
        assert rc != 0 or "failpoint" not in err, f"{what}: exit 0 despite the failure"
    unchanged = False
    if rc > 0:  # a failure: one line, nothing moved, reflogs untouched (gc may have expired)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: {err}"
        assert "Traceback" not in err
        assert refs_of(root) == before_refs, what
        if verb.name != "gc":
            assert reflogs_of(root) == before_logs, what
        # a failing write cleans up after itself at once, without waiting for the next command
        assert leftovers(work, verb) == [], f"{what}: a failed write left files behind"
        unchanged = verb.output is None or folder_files(work / verb.output) == before_out

    store = Store.open(root)
    report = store.fsck()
    assert report.ok, f"{what}: {report.errors}"
    assert must_keep <= set(store.objects.ids()), f"{what}: a committed object was lost"
    now = refs_of(root)
    for name in set(now) | set(before_refs):
        got, old, new = now.get(name), before_refs.get(name), ref.refs.get(name)
        assert got in (old, new) or (
            got is not None and new is not None and same_value(store, ref.store, got, new)
        ), f"{what}: {name} is {got!r}, neither the old {old!r} nor the new {new!r}"
    if verb.output:
        out = folder_files(work / verb.output)
        if out not in (before_out, ref.output):
            with pytest.raises(AdbError, match="was being written"):  # a mix must not read
                read_peft_raw(work / verb.output)

    if unchanged and verb.name != "gc":
        return  # the baseline again (plus unreachable objects): its retry is the reference run
    retry = list(verb.argv)
    if verb.output and "--force" not in retry:
        retry.append("--force")
    rc, _, err = run_adb(retry, work / "repo")
    if rc != 0:  # only a create/delete that already got through may refuse, saying so
        assert verb.creates and ("already" in err or "does not exist" in err), f"{what}: {err}"
        assert refs_of(root) == ref.refs or all(
            same_value(store, ref.store, refs_of(root)[k], v) for k, v in ref.refs.items()
        ), what
        ok(["tag", "after-retry", "main"], work / "repo")  # the next writing command
    store = Store.open(root)
    assert store.fsck().ok, what
    if verb.output:
        assert folder_files(work / verb.output) == ref.output, f"{what}: retry output differs"
    if verb.name == "gc":
        assert set(store.objects.ids()) == ref.objects, what
    assert leftovers(work, verb) == [], f"{what}: left behind"


def walk(baseline: Path, tmp: Path, verb: Verb) -> int:
    """Every case of `verb`, two at a time: each runs on its own copy, and most of the time
    goes to starting `adb` processes, which two cores do side by side."""
    hits, ref = discover(baseline, tmp, verb)
    assert hits, f"{verb.name} passed no failpoint"
    todo = list(cases(hits, thorough=verb.name not in SLOW))

    def one(i: int) -> None:
        name, action, count = todo[i]
        work = fresh_copy(baseline, tmp / f"case{i}")
        check_case(baseline, work, verb, ref, f"{name}:{action}:{count}")
        shutil.rmtree(work)

    with ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
        for done in [pool.submit(one, i) for i in range(len(todo))]:
            done.result()
    return len(todo)


def test_recording_names_the_steps_of_an_import(baseline: Path, tmp_path: Path) -> None:
    hits, _ = discover(baseline, tmp_path, VERBS["import"])
    for step in ("write", "fsync", "rename", "fsync_dir"):
        assert hits[f"object.{step}"] >= 4, hits  # 4 tensors, a manifest, a commit
    for step in ("ref.cas", "ref.write", "ref.fsync", "ref.rename", "reflog.append"):
        assert hits[step] == 1, hits


@pytest.mark.parametrize("name", sorted(set(VERBS) - SLOW))
def test_walk_every_failpoint(baseline: Path, tmp_path: Path, name: str) -> None:
    assert walk(baseline, tmp_path, VERBS[name]) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_walk_every_failpoint_of_merges(baseline: Path, tmp_path: Path, name: str) -> None:
    assert walk(baseline, tmp_path, VERBS[name]) >= 2


# -- a real full disk ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root: mounting is a privileged call; skipped otherwise)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root (the failpoint walk covers ENOSPC without it)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up to `leave` free bytes (tmpfs counts whole 4 KiB pages)."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(disk)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * size)
    return filler


def test_full_disk_at_every_level(small_disk: Path, tmp_path: Path) -> None:
    """An import on a disk with 0, 1, 2, ... pages free fails cleanly until it fits."""
    src = make_peft(tmp_path / "src", 7, linear=(("lin", 64, 64),), conv=())
    repo = small_disk / "repo"
    repo.mkdir()
    ok(["init"], repo)
    ok(["import", str(make_peft(tmp_path / "first", 1)), "--task", "t0"], repo)
    root = repo / STORE_DIR
    store = Store.open(root)
    head = store.refs.read("refs/heads/main")
    failures = 0
    for pages in range(64):
        filler = fill(small_disk, pages * 4096)
        before, logs = refs_of(root), reflogs_of(root)
        rc, _, err = run_adb(["import", str(src), "--task", "t1"], repo)
        report = Store.open(root).fsck()
        assert report.ok, (pages, report.errors)
        assert leftovers(small_disk, VERBS["import"]) == [], pages
        if rc == 0:
            break
        failures += 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "No space left" in lines[0], err
        assert refs_of(root) == before and reflogs_of(root) == logs, pages
        # the other verbs on the same full disk: one line each, nothing moved
        for args in (["tag", f"full{pages}"], ["branch", f"full{pages}"]):
            rc2, _, err2 = run_adb(args, repo)
            assert rc2 == 0 or len(err2.strip().splitlines()) == 1, err2
        filler.unlink()
    else:
        pytest.fail("the import never fitted")
    assert failures >= 3  # it really ran out of space on the way
    store = Store.open(root)
    assert store.read_commit(store.refs.read("refs/heads/main")).parents == (head,)
    assert store.fsck().ok
    out = tmp_path / "out"
    ok(["checkout", "main", "-o", str(out)], repo)
    assert (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file()
