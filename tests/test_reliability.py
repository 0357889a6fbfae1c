"""Crash and concurrency safety: kill -9 mid-import, writers racing on one branch."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ADB, adb_env, lora_tensors, make_peft, peft_config, run_adb

from adapterdb.adapter import WEIGHTS_FILE
from adapterdb.errors import ConflictError
from adapterdb.storage.commits import Commit
from adapterdb.storage.refs import HEADS
from adapterdb.storage.store import Store
from adapterdb.tensorfile import RawTensor, read_safetensors

MAIN = HEADS + "main"
KILLS = 30
# ~16 MiB of fp32 LoRA factors: 32 Linear layers 4096 -> 4096 at rank 16, plus one Conv
BIG = {"rank": 16, "linear": [(f"l{i}", 4096, 4096) for i in range(32)], "conv": [("conv", 64, 64)]}


def small_commit(store: Store, seed: int) -> str:
    manifest = store.put_adapter(lora_tensors(seed), peft_config())
    return store.commit(Commit(manifest=manifest, kind="import", provenance={"t": 1}), "main")


def assert_same_tensors(got: dict[str, RawTensor], source: Path) -> None:
    want, _ = read_safetensors(source / WEIGHTS_FILE)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert (got[name].shape, got[name].data.tobytes()) == (t.shape, t.data.tobytes()), name


def assert_head_is_complete(store: Store, source: Path) -> None:
    """HEAD's manifest holds every tensor of `source`, byte for byte (what checkout writes)."""
    assert_same_tensors(store.load_tensors(store.manifest_of("HEAD")), source)


def assert_same_folder_tensors(folder: Path, source: Path) -> None:
    assert_same_tensors(read_safetensors(folder / WEIGHTS_FILE)[0], source)


@pytest.mark.slow
def test_kill_9_during_import_leaves_old_or_new_head(tmp_path: Path) -> None:
    source = make_peft(tmp_path / "big", 0, "F32", **BIG)
    assert (source / WEIGHTS_FILE).stat().st_size > 16 << 20
    warm = tmp_path / "warm"
    warm.mkdir()
    Store.init(warm)
    start = time.monotonic()
    rc, _, err = run_adb(["import", str(source)], warm)
    full = time.monotonic() - start
    assert rc == 0, err
    assert_head_is_complete(Store.open(warm), source)
    complete = {n: e.id for n, e in Store.open(warm).manifest_of("HEAD").tensors.items()}

    rng = random.Random(20240)
    outcomes: Counter[str] = Counter()
    repo = tmp_path / "warm"
    for i in range(KILLS):
        shutil.rmtree(repo)
        repo = tmp_path / f"kill{i}"
        repo.mkdir()
        store = Store.init(repo)
        old = small_commit(store, 1)
        old_objects = set(store.objects.ids())
        proc = subprocess.Popen(
            [ADB, "import", str(source)],
            cwd=repo,
            env=adb_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0, 1.2 * full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report = store.fsck()
        assert report.ok, f"kill {i}: {report.errors}"
        head = store.refs.read(MAIN)
        if head == old:
            written = set(store.objects.ids()) - old_objects
            outcomes["old head, objects written" if written else "old head, nothing written"] += 1
        else:
            assert store.read_commit(head).parents == (old,)
            # fsck re-hashed every object, so equal ids mean every tensor is there and intact
            assert {n: e.id for n, e in store.manifest_of("HEAD").tensors.items()} == complete
            outcomes["new head"] += 1
    assert outcomes["old head, nothing written"] + outcomes["old head, objects written"] > 0
    # the CLI agrees on the last store, and gc clears what the killed writers left behind
    assert run_adb(["fsck"], repo)[0] == 0
    assert run_adb(["checkout", "HEAD", "-o", str(tmp_path / "out")], repo)[0] == 0
    if Store.open(repo).refs.read(MAIN) != old:
        assert_same_folder_tensors(tmp_path / "out", source)
    rc, out, err = run_adb(["gc", "--grace", "0", "--json"], repo)
    assert rc == 0, err
    assert Store.open(repo).objects.temp_files() == [] and not Store.open(repo).fsck().notes
    print(f"import takes {full:.2f}s; {KILLS} kills: {dict(outcomes)}; last gc: {json.loads(out)}")


WORKER = """
import json, subprocess, sys, time
from pathlib import Path
adb, repo, folder, name, rounds, ready, go = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.002)
results = []
for j in range(int(rounds)):
    p = subprocess.run([adb, "import", folder, "--task", name, "-m", f"{name}-{j}"],
                       cwd=repo, capture_output=True, text=True)
    results.append([p.returncode, p.stdout, p.stderr])
print(json.dumps(results))
"""


@pytest.mark.slow
def test_concurrent_imports_lose_no_commit(repo: Path, tmp_path: Path) -> None:
    workers, rounds = 4, 3
    folders = [make_peft(tmp_path / f"w{k}", 10 + k, "BF16") for k in range(workers)]
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                ADB,
                str(repo),
                str(f),
                f"w{k}",
                str(rounds),
                str(tmp_path / f"ready{k}"),
                str(go),
            ],
            env=adb_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for k, f in enumerate(folders)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{k}").exists() for k in range(workers)):
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.005)
    go.touch()  # all workers start importing at the same moment
    succeeded: dict[str, str] = {}  # short id -> task
    attempts = 0
    for k, proc in enumerate(procs):
        for rc, out, err in json.loads(proc.communicate(timeout=300)[0]):
            attempts += 1
            if rc == 0:
                succeeded[re.match(r"\[main ([0-9a-f]{10})\]", out).group(1)] = f"w{k}"  # type: ignore[union-attr]
            else:  # a writer that gave up: one line saying the branch moved
                assert err.count("\n") == 1 and "moved" in err and "Traceback" not in err, err
    assert attempts == workers * rounds
    rc, out, err = run_adb(["log", "--json"], repo)
    assert rc == 0, err
    log = json.loads(out)
    assert {c["id"][:10]: c["task"] for c in log} == succeeded  # no commit lost
    assert len(log) == len(succeeded) >= attempts - 2  # 20 retries rarely run out
    for newer, older in itertools.pairwise(log):
        assert newer["parents"] == [older["id"]]  # linear: every commit on top of the last
    assert log[-1]["parents"] == []
    assert Store.open(repo).fsck().ok


def test_store_race_loser_gets_conflict(store: Store) -> None:
    """Writer A reads the head, B commits, A's compare-and-swap (retries=0) must fail."""
    base = small_commit(store, 0)
    a_has_read, b_done = threading.Event(), threading.Event()
    a_store = Store(store.root)
    a_put = a_store.objects.put_json

    def slow_put(doc: object) -> str:
        if isinstance(doc, dict) and doc.get("type") == "commit":
            a_has_read.set()  # A has read the head: hold it there until B has committed
            assert b_done.wait(30)
        return a_put(doc)

    a_store.objects.put_json = slow_put  # type: ignore[method-assign]
    outcome: dict[str, object] = {}

    def writer_a() -> None:
        try:
            outcome["a"] = small_commit(a_store, 1)
        except ConflictError as exc:
            outcome["a"] = exc

    thread = threading.Thread(target=writer_a)
    thread.start()
    assert a_has_read.wait(30)
    b = small_commit(store, 2)
    b_done.set()
    thread.join(30)
    assert isinstance(outcome["a"], ConflictError)
    assert "moved" in str(outcome["a"])
    assert store.refs.read(MAIN) == b and store.read_commit(b).parents == (base,)
    assert [e.new for e in store.refs.reflog(MAIN)] == [base, b]
    assert store.fsck().ok
    retried = Commit(manifest=store.read_commit(b).manifest, kind="import", provenance={"t": 1})
    assert store.read_commit(a_store.commit(retried, "main")).parents == (b,)  # try again


def test_threads_racing_with_no_retries_lose_nothing(store: Store) -> None:
    """Every commit() that returned is in the history; the others raised ConflictError."""
    barrier = threading.Barrier(4)
    won: list[str] = []
    lost: list[Exception] = []

    def writer(k: int) -> None:
        barrier.wait()
        for j in range(8):
            try:
                won.append(small_commit(store, 100 * k + j))
            except ConflictError as exc:
                lost.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    history = [oid for oid, _ in store.log("main")]
    assert sorted(history) == sorted(won) and len(won) + len(lost) == 32
    chain, oid = [], store.refs.read(MAIN)
    while oid:
        chain.append(oid)
        parents = store.read_commit(oid).parents
        assert len(parents) <= 1
        oid = parents[0] if parents else None
    assert sorted(chain) == sorted(won)
    assert store.fsck().ok
