"""Remotes (issue 14): push, fetch, pull, clone and lazy clones on a folder and on S3.

The S3 remote is a real S3 API server, moto's standalone server, started once per session in
this process on 127.0.0.1 (a free port); every S3 test gets its own bucket and fake
credentials in its own environment only. Each behaviour test runs on both remotes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import adb_env, lora_tensors, make_peft, one_error_line, peft_config, snapshot
from readme_blocks import block
from tiny_models import adb_in_process

from adapterdb.errors import AdbError, ConflictError
from adapterdb.storage import remote as rm
from adapterdb.storage.commits import Commit
from adapterdb.storage.refs import HEADS
from adapterdb.storage.store import STORE_DIR, Store
from adapterdb.storage.transport import open_transport, s3_error

SECRET = "fake-secret-" + "x" * 20
KINDS = ["folder", "s3"]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Fake credentials and the local endpoint, for this test only; no AWS files, no instance
    metadata lookups (nothing beyond 127.0.0.1)."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "fake-key-id",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return s3_endpoint


def new_bucket() -> str:
    import boto3

    name = f"adb-{secrets.token_hex(6)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=KINDS)
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty remote location: a folder, or a prefix in a fresh bucket."""
    if request.param == "folder":
        return str(tmp_path / "remote")
    request.getfixturevalue("s3_env")
    return f"s3://{new_bucket()}/team/store"


def adb(args: list[str], cwd: Path) -> str:
    rc, out, err = adb_in_process(args, cwd)
    assert rc == 0, err
    return out


def adb_json(args: list[str], cwd: Path) -> dict:
    return json.loads(adb([*args, "--json"], cwd))


def new_repo(tmp_path: Path, name: str, url: str | None = None, commits: int = 1) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    adb(["init"], folder)
    for i in range(commits):
        commit(folder, i)
    if url:
        adb(["remote", "add", "origin", url], folder)
    return folder


def commit(repo: Path, seed: int, task: str | None = None) -> str:
    peft = make_peft(repo.parent / f"peft-{repo.name}-{seed}", seed=seed, rank=4)
    adb(["import", str(peft), "--task", task or f"t{seed}", "-m", f"seed {seed}"], repo)
    return Store.open(repo).resolve("main")


def local_objects(repo: Path) -> set[str]:
    return set(Store.open(repo).objects.ids())


# -- the verbs, on both remotes -----------------------------------------------------------------


def test_push_clone_fetch_pull_round_trip(tmp_path: Path, remote_url: str) -> None:
    a = new_repo(tmp_path, "a", remote_url, commits=2)
    first = adb_json(["push"], a)
    assert first["refs"][0]["status"] == "new" and first["objects"] == len(local_objects(a))
    assert adb_json(["push"], a)["objects"] == 0  # nothing new: nothing sent

    clone = adb_json(["clone", remote_url, str(tmp_path / "b")], tmp_path)
    b = tmp_path / "b"
    assert clone["branch"] == "main" and local_objects(b) == local_objects(a)
    assert Store.open(b).resolve("main") == Store.open(b).resolve("origin/main")
    assert Store.open(b).fsck().ok

    head = commit(a, 7)
    second = adb_json(["push"], a)
    new_objects = local_objects(a) - local_objects(b)
    assert second["objects"] == len(new_objects)  # only what the remote lacks
    pulled = adb_json(["pull"], b)
    assert pulled["branch"]["status"] == "fast-forward" and pulled["objects"] == len(new_objects)
    assert Store.open(b).resolve("main") == head and local_objects(b) == local_objects(a)
    adb(["checkout", "origin/main~1", "-o", str(tmp_path / "out")], b)
    assert adb_json(["fetch"], b)["objects"] == 0


def test_a_push_killed_before_its_ref_moved_resumes_without_resending(
    tmp_path: Path, remote_url: str
) -> None:
    a = new_repo(tmp_path, "a", remote_url, commits=2)
    adb(["push"], a)
    # what a push killed before its ref update leaves: every object there, no ref anywhere
    transport = open_transport(remote_url)
    if remote_url.startswith("s3://"):
        transport.client.delete_object(Bucket=transport.bucket, Key=transport._key(HEADS + "main"))
    else:
        (Path(remote_url) / HEADS / "main").unlink()
    store = Store.open(a)
    store.refs.update("refs/remotes/origin/main", None, store.resolve("main"), "test")
    again = adb_json(["push"], a)
    assert again["objects"] == 0 and again["refs"][0]["status"] == "new"


def test_tags_and_named_refs(tmp_path: Path, remote_url: str) -> None:
    a = new_repo(tmp_path, "a", remote_url, commits=1)
    adb(["tag", "v1"], a)
    adb(["branch", "side"], a)
    pushed = adb_json(["push", "origin", "side", "--tags"], a)
    assert [r["ref"] for r in pushed["refs"]] == ["refs/heads/side", "refs/tags/v1"]
    b = tmp_path / "b"
    adb(["clone", remote_url, str(b), "--branch", "side"], tmp_path)
    store = Store.open(b)
    assert store.tags() == {"v1": store.resolve("side")} and store.refs.current_branch() == "side"
    # the remote's HEAD names main, which nobody pushed: a clone checks out what is there
    assert adb_json(["clone", remote_url, str(tmp_path / "c")], tmp_path)["branch"] == "side"


def test_non_fast_forward_is_refused_then_forced(tmp_path: Path, remote_url: str) -> None:
    a = new_repo(tmp_path, "a", remote_url, commits=1)
    adb(["push"], a)
    b = tmp_path / "b"
    adb(["clone", remote_url, str(b)], tmp_path)
    commit(a, 1)
    adb(["push"], a)
    mine = commit(b, 2)
    remote_before = open_transport(remote_url).read_ref(HEADS + "main")[0]
    rc, _, err = adb_in_process(["push"], b)
    assert "fetch and merge first, or --force" in one_error_line(rc, err)
    assert open_transport(remote_url).read_ref(HEADS + "main")[0] == remote_before
    before = snapshot(b / STORE_DIR)
    rc, _, err = adb_in_process(["pull"], b)
    assert "diverged" in one_error_line(rc, err)
    assert Store.open(b).resolve("main") == mine  # the local branch did not move
    assert set(before) <= set(snapshot(b / STORE_DIR))
    assert adb_json(["push", "--force"], b)["refs"][0]["status"] == "forced"
    assert open_transport(remote_url).read_ref(HEADS + "main")[0] == mine


def test_remote_list_add_remove_never_shows_credentials(tmp_path: Path, s3_env: str) -> None:
    a = new_repo(tmp_path, "a")
    adb(["remote", "add", "origin", "s3://bucket/p", "--endpoint", s3_env], a)
    added = adb_json(["remote", "add", "disk", str(tmp_path / "r")], a)
    assert added == {"name": "disk", "url": str(tmp_path / "r"), "endpoint": None}
    listing = adb(["remote", "-v"], a)
    assert "s3://bucket/p" in listing and str(tmp_path / "r") in listing
    config = (a / STORE_DIR / "config").read_text()
    for text in (listing, config):
        assert SECRET not in text and "fake-key-id" not in text
    assert adb(["remote"], a).split() == ["disk", "origin"]
    assert adb_json(["remote", "remove", "disk"], a) == {"removed": "disk"}
    assert [r["name"] for r in json.loads(adb(["remote", "--json"], a))] == ["origin"]


# -- integrity -------------------------------------------------------------------------------


def _corrupt_one_tensor(remote_url: str, repo: Path) -> str:
    """Truncate one tensor object on the remote; returns its id."""
    store = Store.open(repo)
    manifest = store.manifest_of("main")
    oid = sorted(e.id for e in manifest.tensors.values())[0]
    transport = open_transport(remote_url)
    blob = transport.get(rm.object_key(oid))
    transport.put_bytes(rm.object_key(oid), blob[: len(blob) // 2])
    return oid


def test_a_corrupt_remote_object_never_enters_the_store(tmp_path: Path, remote_url: str) -> None:
    a = new_repo(tmp_path, "a", remote_url, commits=1)
    adb(["push"], a)
    b = tmp_path / "b"
    adb(["clone", remote_url, str(b)], tmp_path)
    commit(a, 1)
    adb(["push"], a)
    bad = _corrupt_one_tensor(remote_url, a)

    rc, _, err = adb_in_process(["clone", remote_url, str(tmp_path / "c")], tmp_path)
    assert bad[:12] in one_error_line(rc, err) and "corrupt" in err
    assert not (tmp_path / "c").exists()  # a failed clone leaves no folder
    before = Store.open(b).refs.read("refs/remotes/origin/main")
    rc, _, err = adb_in_process(["fetch"], b)
    assert bad[:12] in one_error_line(rc, err)
    assert bad not in local_objects(b)
    assert Store.open(b).refs.read("refs/remotes/origin/main") == before
    assert Store.open(b).fsck().ok


# -- bad input -------------------------------------------------------------------------------


def _refused(args: list[str], repo: Path) -> str:
    before = snapshot(repo / STORE_DIR)
    rc, _, err = adb_in_process(args, repo)
    line = one_error_line(rc, err)
    assert SECRET not in err and "fake-key-id" not in err
    assert snapshot(repo / STORE_DIR) == before
    return line


def test_bad_remotes_get_one_line_and_change_nothing(tmp_path: Path, s3_env: str) -> None:
    a = new_repo(tmp_path, "a")
    assert "no remote named 'nowhere'" in _refused(["push", "nowhere"], a)
    assert "no remote named 'origin'" in _refused(["fetch"], a)
    assert "not supported" in _refused(["remote", "add", "x", "http://example.com/s"], a)
    line = _refused(["remote", "add", "x", f"s3://AKIAFAKE:{SECRET}@bucket/p"], a)
    assert "credentials in a remote URL are not accepted" in line and "AKIAFAKE" not in line
    adb(["remote", "add", "down", "s3://b/p", "--endpoint", "http://127.0.0.1:9"], a)
    assert "cannot reach http://127.0.0.1:9" in _refused(["push", "down"], a)
    adb(["remote", "add", "nobucket", "s3://no-such-bucket-here/p"], a)
    assert "bucket 'no-such-bucket-here' does not exist" in _refused(["push", "nobucket"], a)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    adb(["remote", "add", "junk", str(junk)], a)
    assert "is not an adb store" in _refused(["push", "junk"], a)
    assert "is not an adb store" in _refused(["fetch", "junk"], a)
    bucket = new_bucket()
    open_transport(f"s3://{bucket}").put_bytes("data/x.bin", b"123")
    adb(["remote", "add", "s3junk", f"s3://{bucket}/data"], a)
    assert "is not an adb store" in _refused(["fetch", "s3junk"], a)
    rc, _, err = adb_in_process(["clone", str(junk), str(tmp_path / "c")], tmp_path)
    assert "is not an adb store" in one_error_line(rc, err) and not (tmp_path / "c").exists()


def test_missing_and_wrong_credentials(
    tmp_path: Path, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = new_repo(tmp_path, "a")
    adb(["remote", "add", "origin", f"s3://{new_bucket()}/p"], a)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert "no S3 credentials" in _refused(["push"], a)
    # moto accepts any key, so the refusal a real server sends is built here: its message text
    # (which can echo the key id) must not reach the user, only its code
    from botocore.exceptions import ClientError

    exc = ClientError(
        {"Error": {"Code": "InvalidAccessKeyId", "Message": f"key AKIAFAKE {SECRET}"}}, "GetObject"
    )
    line = str(s3_error(exc, "s3://b/p", "b", "FORMAT"))
    assert "refused the credentials" in line and SECRET not in line and "AKIAFAKE" not in line


def test_moto_enforces_conditional_writes(s3_env: str) -> None:
    """What the test server supports, as the README says: a stale If-Match and an
    If-None-Match: * on an existing key are refused (412)."""
    import boto3
    from botocore.exceptions import ClientError

    s3, bucket = boto3.client("s3"), new_bucket()
    etag = s3.put_object(Bucket=bucket, Key="ref", Body=b"1", IfNoneMatch="*")["ETag"]
    s3.put_object(Bucket=bucket, Key="ref", Body=b"2", IfMatch=etag)
    for cond in ({"IfMatch": etag}, {"IfNoneMatch": "*"}):
        with pytest.raises(ClientError) as info:
            s3.put_object(Bucket=bucket, Key="ref", Body=b"3", **cond)
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=bucket, Key="ref")["Body"].read() == b"2"


# -- lazy clones -----------------------------------------------------------------------------


def test_lazy_clone_fetches_tensors_on_demand(tmp_path: Path, remote_url: str) -> None:
    a = new_repo(tmp_path, "a", remote_url, commits=3)
    adb(["push"], a)
    lazy = tmp_path / "lazy"
    adb(["clone", remote_url, str(lazy), "--lazy"], tmp_path)
    store = Store.open(lazy)
    past = store.manifest_of("main~1")
    tensors = {e.id for e in past.tensors.values()}
    assert not tensors & local_objects(lazy)  # commits and manifests only
    adb(["checkout", "main~1", "-o", str(tmp_path / "out")], lazy)
    full = tmp_path / "full"
    adb(["checkout", "main~1", "-o", str(full)], a)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        full / "adapter_model.safetensors"
    ).read_bytes()
    kept = local_objects(lazy)
    assert (
        tensors <= kept
        and not {e.id for e in store.manifest_of("main").tensors.values()} - (tensors) <= kept
    )
    report = Store.open(lazy).fsck()
    assert report.ok, report.errors
    assert Store.open(lazy).gc(grace=0).removed == []
    commit(a, 9)
    adb(["push"], a)
    assert adb_json(["pull"], lazy)["branch"]["status"] == "fast-forward"
    rc, _, err = adb_in_process(["remote", "remove", "origin"], lazy)
    assert "lazy clone" in one_error_line(rc, err)
    # pushed elsewhere, a lazy clone sends everything: what it lacks comes from origin first
    adb(["remote", "add", "mirror", str(tmp_path / "mirror")], lazy)
    adb(["push", "mirror"], lazy)
    mirror, _, _ = rm.clone(str(tmp_path / "mirror"), tmp_path / "from-mirror", None, lazy=False)
    assert mirror.fsck().ok and local_objects(tmp_path / "from-mirror") == local_objects(a)


def test_lazy_decouple_fetches_one_task(tmp_path: Path, remote_url: str) -> None:
    a = new_repo(tmp_path, "a", remote_url, commits=0)
    peft = [make_peft(tmp_path / f"e{i}", seed=i, rank=4) for i in range(3)]
    adb(["merge", "--method", "condu", "--into", "cb", *map(str, peft)], a)
    adb(["push", "origin", "cb"], a)
    lazy = tmp_path / "lazy"
    adb(["clone", remote_url, str(lazy), "--lazy", "--branch", "cb"], tmp_path)
    c = Store.open(lazy).read_commit(Store.open(lazy).resolve("cb"))
    task = sorted(c.triggers)[0]
    adb(["decouple", "cb", "--task", task, "-o", str(tmp_path / "one")], lazy)
    adb(["decouple", "cb", "--task", task, "-o", str(tmp_path / "ref")], a)
    assert (tmp_path / "one" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "ref" / "adapter_model.safetensors"
    ).read_bytes()
    kept = local_objects(lazy)
    others = {m for t, trig in c.triggers.items() if t != task for m in trig.masks.values()}
    assert set(c.triggers[task].masks.values()) <= kept and not others & kept


def test_lazy_read_of_a_corrupt_remote_object_fails_cleanly(
    tmp_path: Path, remote_url: str
) -> None:
    a = new_repo(tmp_path, "a", remote_url, commits=1)
    adb(["push"], a)
    lazy = tmp_path / "lazy"
    adb(["clone", remote_url, str(lazy), "--lazy"], tmp_path)
    bad = _corrupt_one_tensor(remote_url, a)
    rc, _, err = adb_in_process(["checkout", "main", "-o", str(tmp_path / "out")], lazy)
    assert bad[:12] in one_error_line(rc, err)
    assert bad not in local_objects(lazy)


def test_lazy_reads_fetch_each_needed_object_once_all_in_flight_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """checkout, diff and show on a lazy clone fetch exactly the tensors they read, each once,
    all at the same time (a barrier the size of the batch: one-by-one fetches would time out)
    instead of one round trip after another."""
    url = str(tmp_path / "remote")
    a = new_repo(tmp_path, "a", url, commits=3)
    adb(["push"], a)
    lazy = tmp_path / "lazy"
    adb(["clone", url, str(lazy), "--lazy"], tmp_path)
    calls: list[str] = []
    gate: list[threading.Barrier] = []
    real = rm.lazy_source

    def counting(root: Path) -> Callable[[str], bytes] | None:
        read = real(root)

        def fetch(oid: str) -> bytes:
            calls.append(oid)
            gate[0].wait()
            return read(oid)

        return fetch if read else read

    monkeypatch.setattr(rm, "lazy_source", counting)
    for verb, rev in (
        (["checkout", "main~2", "-o", str(tmp_path / "out")], "main~2"),
        (["diff", "main~2", "main~1"], "main~1"),
        (["show", "main", "--tensors"], "main"),
    ):
        needed = {e.id for e in Store.open(lazy).manifest_of(rev).tensors.values()}
        needed -= local_objects(lazy)
        calls.clear()
        gate[:] = [threading.Barrier(len(needed), timeout=10)]
        adb(verb, lazy)
        assert sorted(calls) == sorted(needed), verb[0]
    assert Store.open(lazy).fsck().ok


# -- concurrency and crashes -------------------------------------------------------------------


def test_two_pushes_at_once_exactly_one_wins(
    tmp_path: Path, remote_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = new_repo(tmp_path, "base", remote_url, commits=1)
    adb(["push"], base)
    clones = [tmp_path / n for n in ("x", "y")]
    for i, c in enumerate(clones):
        adb(["clone", remote_url, str(c)], tmp_path)
        commit(c, 10 + i)
    # both read the remote ref before either swaps it: the race the CAS must decide
    barrier = threading.Barrier(2)
    swap = rm._push_ref

    def racing(*args: object, **kw: object) -> dict:
        barrier.wait(timeout=30)
        return swap(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rm, "_push_ref", racing)
    results: dict[Path, object] = {}

    def run(c: Path) -> None:
        store = Store.open(c)
        try:
            results[c] = rm.push(store, rm.get_remote(store, None), [HEADS + "main"])
        except AdbError as exc:
            results[c] = exc

    threads = [threading.Thread(target=run, args=(c,)) for c in clones]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    losers = [c for c in clones if isinstance(results[c], ConflictError)]
    winners = [c for c in clones if isinstance(results[c], rm.Transfer)]
    assert len(losers) == 1 and len(winners) == 1, results
    assert rm.NOT_FF in str(results[losers[0]])
    tip = open_transport(remote_url).read_ref(HEADS + "main")[0]
    assert tip == Store.open(winners[0]).resolve("main")
    # the loser's commit is not lost: it is still its branch, and after a fetch it sees both
    loser = Store.open(losers[0])
    rm.fetch(loser, rm.get_remote(loser, None))
    assert loser.resolve("origin/main") == tip and loser.resolve("main") != tip


def _push_child(repo: str) -> None:
    store = Store.open(repo)
    rm.push(store, rm.get_remote(store, None), [HEADS + "main"])


def _check_remote(remote: rm.Remote, allowed: set[str], checker: Store) -> str:
    """The remote's main is one of `allowed`, and a fetch into `checker` (which downloads and
    re-hashes every object main reaches that it lacks, and fails on a missing one) succeeds."""
    transfer = rm.fetch(checker, remote)
    tip = checker.resolve("origin/main")
    assert tip in allowed and transfer.refs[0]["new"] == tip
    return tip


def test_kill_9_during_push_leaves_old_or_new_refs(tmp_path: Path, remote_url: str) -> None:
    a = new_repo(tmp_path, "a", remote_url, commits=1)
    store = Store.open(a)
    remote = rm.get_remote(store, None)
    started = time.monotonic()
    _push_child(str(a))
    duration = max(time.monotonic() - started, 0.05)
    pushed = store.resolve("main")
    checker, _, _ = rm.clone(remote_url, tmp_path / "checker", None, lazy=False)
    fork = multiprocessing.get_context("fork")
    rng = random.Random(14)
    outcomes = {"old": 0, "new": 0}
    for attempt in range(20):
        manifest = store.put_adapter(lora_tensors(100 + attempt, rank=4), peft_config(4))
        new = store.commit(Commit(manifest, "import", task=f"t{attempt}"), "main")
        child = fork.Process(target=_push_child, args=(str(a),))
        child.start()
        time.sleep(rng.uniform(0, 1.5 * duration))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
        pushed = _check_remote(remote, {pushed, new}, checker)
        outcomes["new" if pushed == new else "old"] += 1
        if attempt % 5 == 4:  # and the next push completes
            _push_child(str(a))
            pushed = _check_remote(remote, {new}, checker)
    _push_child(str(a))
    _check_remote(remote, {store.resolve("main")}, checker)
    assert checker.fsck().ok
    assert outcomes["old"] > 0, outcomes  # the kills did land mid-push


# -- README ------------------------------------------------------------------------------------


def test_readme_remotes_block(tmp_path: Path) -> None:
    make_peft(tmp_path / "lora-task1", seed=1)
    make_peft(tmp_path / "lora-task2", seed=2)
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block("remotes")],
        cwd=tmp_path,
        env={**adb_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
