"""Every read of on-disk state is validated (issue 12, item 2): refs, HEAD, FORMAT, reflogs,
commit and manifest documents, objects/ entries, adapter_config.json and safetensors headers.

Each finding of the issue has a test here. Damage is always one line naming the file and the
fix, an exit code != 0, the store unchanged, and `fsck` (which gc agrees with) reporting it;
`adb fsck --repair` restores what the reflog can restore.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import lora_tensors, make_peft, one_error_line, peft_config, snapshot
from tiny_models import adb_in_process

from adapterdb.adapter import CONFIG_FILE, WEIGHTS_FILE, read_peft_raw, write_peft_raw
from adapterdb.errors import AdbError, CorruptObjectError, CorruptStateError, NotFoundError
from adapterdb.storage.commits import Commit
from adapterdb.storage.refs import HEADS
from adapterdb.storage.store import STORE_DIR, Store

MAIN = HEADS + "main"


def adb(args: list[str], cwd: Path) -> tuple[int, str, str]:
    return adb_in_process(args, cwd)


def ok(args: list[str], cwd: Path) -> str:
    rc, out, err = adb(args, cwd)
    assert rc == 0, f"adb {' '.join(args)}: {err}"
    return out


def one_error(args: list[str], cwd: Path, *needles: str) -> str:
    """`adb ARGS` fails with exactly one `error:` line on stderr that holds every needle."""
    rc, _, err = adb(args, cwd)
    line = one_error_line(rc, err)
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, Store, list[str]]:
    """A store in repo/ with main = import a <- import b (folders a, b, c beside it)."""
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        make_peft(tmp_path / name, seed)
    repo = tmp_path / "repo"
    repo.mkdir()
    ok(["init"], repo)
    ok(["import", "../a", "--task", "ta"], repo)
    ok(["import", "../b", "--task", "tb"], repo)
    store = Store.open(repo)
    ids = [oid for oid, _ in reversed(store.log("main"))]
    return repo, store, ids


# -- refs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n", b"abc123\n", b"z" * 64 + b"\n", b"\xff\xfe"])
def test_a_broken_ref_is_never_an_empty_branch(
    two: tuple[Path, Store, list[str]], content: bytes
) -> None:
    """Found: an empty ref made `import` start a new root commit (history cut off) and a
    garbage ref became the next commit's parent."""
    repo, store, _ = two
    (store.root / MAIN).write_bytes(content)
    before = snapshot(store.root)
    one_error(["import", "../c"], repo, str(store.root / MAIN), "adb fsck --repair")
    assert snapshot(store.root) == before
    with pytest.raises(CorruptStateError, match="refs/heads/main"):
        store.refs.read(MAIN)
    one_error(["log"], repo, "refs/heads/main")


def test_fsck_and_branch_report_an_empty_ref(two: tuple[Path, Store, list[str]]) -> None:
    """Found: `fsck` said ok and `branch` hid the branch."""
    repo, store, _ = two
    ok(["branch", "side", "main"], repo)
    (store.root / MAIN).write_text("")
    report = store.fsck()
    assert not report.ok and any("refs/heads/main" in e for e in report.errors)
    rc, out, err = adb(["branch"], repo)
    assert rc != 0 and "main" in out and "BROKEN" in out and "side" in out
    assert "refs/heads/main" in err and len(err.strip().splitlines()) == 1
    rc, out, _ = adb(["branch", "--json"], repo)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["main"]["broken"] and not rows["side"]["broken"]
    with pytest.raises(CorruptStateError):
        store.gc()


def test_fsck_repair_restores_a_ref_from_the_reflog(two: tuple[Path, Store, list[str]]) -> None:
    repo, store, ids = two
    (store.root / MAIN).write_text("")
    rc, out, _ = adb(["fsck", "--repair", "--json"], repo)
    doc = json.loads(out)
    assert rc == 0 and doc["ok"], doc
    assert any("refs/heads/main" in line and ids[-1][:12] in line for line in doc["repaired"])
    assert store.refs.read(MAIN) == ids[-1]
    assert store.refs.reflog(MAIN)[-1].message.startswith("fsck --repair")
    ok(["import", "../c"], repo)
    assert store.read_commit(store.refs.read(MAIN) or "").parents == (ids[-1],)


def test_fsck_repair_moves_a_ref_off_an_unreadable_commit(
    two: tuple[Path, Store, list[str]],
) -> None:
    repo, store, ids = two
    store.objects.path(ids[-1]).unlink()  # main's commit is gone: the last good value is ids[0]
    assert not store.fsck().ok
    out = ok(["fsck", "--repair"], repo)
    assert "repaired:" in out and ids[0][:12] in out
    assert store.refs.read(MAIN) == ids[0]


def test_fsck_repair_says_what_it_cannot_restore(repo: Path) -> None:
    store = Store.open(repo)
    (store.root / HEADS / "lost").write_text("garbage")  # no reflog at all
    rc, out, _ = adb(["fsck", "--repair", "--json"], repo)
    doc = json.loads(out)
    assert rc == 1 and not doc["ok"]
    assert doc["repaired"] == [] and "refs/heads/lost" in doc["not_repaired"][0]


# -- HEAD and FORMAT ---------------------------------------------------------------------------


def test_missing_head_is_one_line_naming_it(two: tuple[Path, Store, list[str]]) -> None:
    """Found: a missing HEAD gave a bare "No such file"."""
    repo, store, _ = two
    (store.root / "HEAD").unlink()
    one_error(["log"], repo, str(store.root / "HEAD"), "adb fsck --repair")
    assert not store.fsck().ok
    ok(["fsck", "--repair"], repo)
    assert store.refs.head() == (MAIN, store.refs.read(MAIN))


@pytest.mark.parametrize("content", [b"", b"ref: refs/heads/../../x\n", b"ref:", b"\xff" * 9])
def test_garbage_head_is_one_line_naming_it(
    two: tuple[Path, Store, list[str]], content: bytes
) -> None:
    repo, store, _ = two
    (store.root / "HEAD").write_bytes(content)
    one_error(["show"], repo, str(store.root / "HEAD"))
    ok(["fsck", "--repair"], repo)
    ok(["show"], repo)


@pytest.mark.parametrize("content", [b"", b"adapterdb-store", b"\xff\xfe\x00", b"hello\nworld"])
def test_damaged_format_is_one_line_naming_it(repo: Path, content: bytes) -> None:
    fmt = repo / STORE_DIR / "FORMAT"
    fmt.write_bytes(content)
    one_error(["log"], repo, str(fmt), "adapterdb-store 1")


def test_missing_format_is_one_line_naming_it(repo: Path) -> None:
    fmt = repo / STORE_DIR / "FORMAT"
    fmt.unlink()
    one_error(["log"], repo, str(fmt))


# -- reflogs -----------------------------------------------------------------------------------


def test_fsck_reads_reflogs_like_gc(two: tuple[Path, Store, list[str]]) -> None:
    """Found: a bad reflog line made `gc` refuse while `fsck` said ok."""
    repo, store, _ = two
    log = store.root / "logs" / MAIN
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + "this is not a reflog line\n" + "".join(lines[1:]))
    report = store.fsck()
    assert any(f"{log} line 2" in e for e in report.errors), report.errors
    one_error(["gc"], repo, f"{log} line 2", "adb fsck --repair")
    out = ok(["fsck", "--repair"], repo)
    assert "dropped 1 unreadable line" in out
    assert len(store.refs.reflog(MAIN)) == len(lines)
    ok(["gc"], repo)


def test_a_reflog_entry_naming_a_lost_commit_fails_fsck_as_it_fails_gc(
    two: tuple[Path, Store, list[str]],
) -> None:
    repo, store, ids = two
    with open(store.root / "logs" / MAIN, "a") as f:
        f.write(f"{ids[-1]} {'e' * 64} {time.time():.3f}\tlost\n")
    assert any("e" * 12 in e for e in store.fsck().errors)
    one_error(["gc"], repo, "e" * 12)
    out = ok(["fsck", "--repair"], repo)
    assert "forgot 1 commit(s)" in out and "e" * 12 in out
    ok(["gc"], repo)


def test_an_append_after_a_torn_reflog_line_is_read(two: tuple[Path, Store, list[str]]) -> None:
    """A crash mid-append leaves an unterminated line; the next append continues it."""
    _, store, ids = two
    log = store.root / "logs" / MAIN
    with open(log, "a") as f:
        f.write(f"{ids[0]} {ids[1][:30]}")
    store.refs.update(MAIN, ids[0], ids[1], "after the crash")
    assert [(e.old, e.new) for e in store.refs.reflog(MAIN)][-1] == (ids[1], ids[0])
    assert store.fsck().ok


# -- commit and manifest documents -------------------------------------------------------------


def _doc(store: Store, oid: str) -> dict[str, Any]:
    doc = store.objects.get_json(oid)
    assert isinstance(doc, dict)
    return doc


BAD_COMMITS: list[tuple[str, Any]] = [
    ("parents", "abc"),
    ("parents", ["../../../etc/passwd"]),
    ("manifest", 7),
    ("manifest", None),
    ("time", "yesterday"),
    ("kind", ["import"]),
    ("task", {"a": 1}),
    ("params", []),
    ("eval", 3),
    ("triggers", {"../evil": {"scale": 1.0, "masks": {}}}),
    ("triggers", {"t": {"scale": "big", "masks": {}}}),
    ("triggers", {"t": {"scale": 1.0, "masks": {"x": "../../x"}}}),
    ("sources", [1, 2]),
    ("extra", {"objects": {"x": "not-hex"}}),
]


@pytest.mark.parametrize(("key", "value"), BAD_COMMITS, ids=[f"{k}={v!r}" for k, v in BAD_COMMITS])
def test_schema_broken_commit_is_one_line(
    two: tuple[Path, Store, list[str]], key: str, value: Any
) -> None:
    """Found: commits that hash correctly but break the schema crashed show, log and fsck."""
    repo, store, ids = two
    doc = _doc(store, ids[-1])
    bad = store.objects.put_json({**doc, key: value})
    store.refs.update(HEADS + "bad", bad, None, "crafted")
    for verb in (["show", "bad"], ["log", "bad"], ["checkout", "bad", "-o", "out"]):
        one_error(verb, repo, bad[:12], "schema")
    report = store.fsck()
    assert any(bad[:12] in e for e in report.errors), report.errors


@pytest.mark.parametrize("stamp", [1e300, -5.0, 2**70])
def test_a_commit_time_that_is_no_date_is_one_line(
    two: tuple[Path, Store, list[str]], stamp: float
) -> None:
    """Found by the fuzzer: `log` and `show` crashed printing a time past the year 9999."""
    repo, store, ids = two
    bad = store.objects.put_json({**_doc(store, ids[-1]), "time": stamp})
    store.refs.update(HEADS + "bad", bad, None, "crafted")
    one_error(["log", "bad"], repo, bad[:12], "'time'")


def test_markup_in_a_commit_prints_verbatim(two: tuple[Path, Store, list[str]]) -> None:
    """Found by the fuzzer: '[/]' in a commit's params, kind or eval crashed `show` and `log`
    (rich read it as markup)."""
    repo, store, ids = two
    doc = _doc(store, ids[-1])
    crafted = {**doc, "kind": "k[/]", "method": "[/]", "params": {"p": "[/]"}, "eval": {"e": "[/]"}}
    store.refs.update(HEADS + "odd", store.objects.put_json(crafted), None, "crafted")
    assert "'p': '[/]'" in ok(["show", "odd"], repo)
    assert "k[/]" in ok(["log", "odd"], repo)


def test_commit_missing_its_manifest_field(two: tuple[Path, Store, list[str]]) -> None:
    _, store, ids = two
    doc = {k: v for k, v in _doc(store, ids[-1]).items() if k != "manifest"}
    bad = store.objects.put_json(doc)
    with pytest.raises(CorruptObjectError, match="'manifest' is missing"):
        store.read_commit(bad)


BAD_MANIFESTS: list[tuple[str, Any]] = [
    ("tensors", []),
    ("tensors", {"w": {"id": "x", "dtype": "F32", "shape": [1]}}),
    ("tensors", {"w": {"id": "a" * 64, "dtype": "F99", "shape": [1]}}),
    ("tensors", {"w": {"id": "a" * 64, "dtype": "F32", "shape": "12"}}),
    ("tensors", {"w": {"id": "a" * 64, "dtype": "F32", "shape": [-1]}}),
    ("tensors", {"w": {"id": "a" * 64, "dtype": "F32", "shape": [True]}}),
    ("tensors", {"w": 5}),
    ("config", "lora"),
    ("metadata", {"k": 1}),
]


@pytest.mark.parametrize(
    ("key", "value"), BAD_MANIFESTS, ids=[f"{k}={v!r}"[:40] for k, v in BAD_MANIFESTS]
)
def test_schema_broken_manifest_is_one_line(
    two: tuple[Path, Store, list[str]], key: str, value: Any
) -> None:
    repo, store, ids = two
    commit = _doc(store, ids[-1])
    manifest = store.objects.put_json({**_doc(store, commit["manifest"]), key: value})
    bad = store.objects.put_json({**commit, "manifest": manifest})
    store.refs.update(HEADS + "bad", bad, None, "crafted")
    for verb in (["show", "bad"], ["checkout", "bad", "-o", "out"], ["diff", "main", "bad"]):
        one_error(verb, repo, manifest[:12], "schema")
    assert any(manifest[:12] in e for e in store.fsck().errors)


def test_a_json_object_that_is_not_json(store: Store) -> None:
    """An object whose bytes hash fine but never were JSON is corrupt, not a crash."""
    import hashlib

    from adapterdb.storage import codec
    from adapterdb.storage.objects import MAGIC, canonical_json

    body = b"\xff not json"
    oid = hashlib.sha256(b"json\0" + body).hexdigest()
    frame = codec.compress(body)
    head = canonical_json({"frames": [len(frame)]})
    blob = MAGIC + b"J" + struct.pack("<I", len(head)) + head + frame
    store.objects.path(oid).parent.mkdir(parents=True, exist_ok=True)
    store.objects.path(oid).write_bytes(blob)
    with pytest.raises(CorruptObjectError, match="not JSON"):
        store.read_commit(oid)
    assert not store.fsck().ok


# -- objects/ entries ------------------------------------------------------------------------


@pytest.mark.parametrize("stray", ["ab/cdef", "ab/" + "c" * 62 + "/", "zz/", "notes.txt", "AB/"])
def test_fsck_reports_strays_under_objects(two: tuple[Path, Store, list[str]], stray: str) -> None:
    """Found: fsck aborted on a stray directory under objects/."""
    repo, store, _ = two
    path = store.objects.dir / stray
    if stray.endswith("/"):
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    rc, out, _ = adb(["fsck", "--json"], repo)
    doc = json.loads(out)
    assert rc == 1 and any("stray" in e and str(path.name) in e for e in doc["errors"]), doc
    ok(["gc", "--grace", "0"], repo)
    assert path.exists()  # gc leaves what it does not know alone


# -- the Python API ----------------------------------------------------------------------------


def test_commit_refuses_a_manifest_that_does_not_exist(store: Store) -> None:
    """Found: `Store.commit` accepted a manifest id that does not exist."""
    before = snapshot(store.root)
    for manifest in ("f" * 64, "nope"):
        with pytest.raises(NotFoundError, match="not in the store"):
            store.commit(Commit(manifest=manifest, kind="import"), "main")
    assert snapshot(store.root) == before


def test_commit_refuses_a_commit_id_as_manifest(two: tuple[Path, Store, list[str]]) -> None:
    _, store, ids = two
    with pytest.raises(AdbError, match="not a manifest"):
        store.commit(Commit(manifest=ids[0], kind="import"), "main")


# -- decouple ------------------------------------------------------------------------------------


def test_decouple_never_writes_outside_its_output(tmp_path: Path) -> None:
    """Found: a crafted trigger name made `decouple --all` write outside -o."""
    for name, seed in (("a", 1), ("b", 2)):
        make_peft(tmp_path / name, seed)
    repo = tmp_path / "repo"
    repo.mkdir()
    ok(["init"], repo)
    ok(["merge", "--method", "condu", "--into", "cb", "../a", "../b"], repo)
    store = Store.open(repo)
    head = store.refs.read(HEADS + "cb") or ""
    doc = _doc(store, head)
    trig = doc["triggers"]
    doc["triggers"] = {"../../escaped": next(iter(trig.values())), **trig}
    crafted = store.objects.put_json(doc)
    store.refs.update(HEADS + "crafted", crafted, None, "crafted")
    one_error(["decouple", "crafted", "--all", "-o", "out"], repo, "trigger name")
    assert not (tmp_path / "escaped").exists() and not (repo / "out").exists()
    ok(["decouple", "cb", "--all", "-o", "out"], repo)


# -- adapter_config.json and safetensors ---------------------------------------------------------


BAD_CONFIGS: list[dict[str, Any]] = [
    {"lora_alpha": "16"},
    {"lora_alpha": None},
    {"lora_alpha": [16]},
    {"lora_alpha": True},
    {"lora_alpha": float("nan")},
    {"alpha_pattern": ["lin"]},
    {"alpha_pattern": {"lin": "x"}},
    {"rank_pattern": ["lin"]},
    {"rank_pattern": {"lin": 0}},
    {"r": "2"},
    {"r": 0},
    {"use_rslora": "false"},
]


@pytest.mark.parametrize("patch", BAD_CONFIGS, ids=[repr(p) for p in BAD_CONFIGS])
def test_bad_adapter_config_is_refused_at_import(
    repo: Path, tmp_path: Path, patch: dict[str, Any]
) -> None:
    """Found: a string/null/list lora_alpha was imported, then diff and merge crashed."""
    folder = make_peft(tmp_path / "bad")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**cfg, **patch}))
    before = snapshot(repo / STORE_DIR)
    key = next(iter(patch))
    one_error(["import", str(folder)], repo, str(folder / CONFIG_FILE), key)
    assert snapshot(repo / STORE_DIR) == before


def test_a_bad_config_already_in_the_store_is_one_line(
    two: tuple[Path, Store, list[str]],
) -> None:
    """Stores written before the import check may hold such configs: merge and diff say so."""
    repo, store, ids = two
    commit = _doc(store, ids[-1])
    manifest = _doc(store, commit["manifest"])
    manifest["config"] = {**manifest["config"], "lora_alpha": "sixteen"}
    bad = store.objects.put_json({**commit, "manifest": store.objects.put_json(manifest)})
    store.refs.update(HEADS + "bad", bad, None, "crafted")
    one_error(["diff", "main", "bad"], repo, "lora_alpha")
    one_error(["merge", "--method", "average", "main", "bad", "-o", "out"], repo, "lora_alpha")


def test_rank_zero_lora_is_refused_at_import(repo: Path, tmp_path: Path) -> None:
    """Found: a rank-0 LoRA crashed `merge`."""
    folder = tmp_path / "r0"
    write_peft_raw(folder, peft_config(rank=0), lora_tensors(rank=0))
    before = snapshot(repo / STORE_DIR)
    one_error(["import", str(folder)], repo, "rank")
    assert snapshot(repo / STORE_DIR) == before
    one_error(["merge", "--method", "average", str(folder), str(folder), "-o", "out"], repo, "rank")


def test_mismatched_lora_factors_are_refused_at_import(repo: Path, tmp_path: Path) -> None:
    tensors = lora_tensors()
    tensors["base_model.model.lin.lora_B.weight"] = lora_tensors(rank=3)[
        "base_model.model.lin.lora_B.weight"
    ]
    folder = write_peft_raw(tmp_path / "mixed", peft_config(), tensors)
    one_error(["import", str(folder)], repo, "lin.lora_A.weight", "rank")


def _safetensors(path: Path, header: dict[str, Any], body: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


@pytest.mark.parametrize("metadata", [["a"], "text", 5, {"k": 1}, {"k": None}, {"k": {"x": 1}}])
def test_safetensors_metadata_must_map_strings_to_strings(
    repo: Path, tmp_path: Path, metadata: Any
) -> None:
    """Found: a `__metadata__` that is not a mapping crashed `import`."""
    folder = make_peft(tmp_path / "meta")
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    _safetensors(folder / WEIGHTS_FILE, {"__metadata__": metadata, "w": entry}, b"\0" * 4)
    with pytest.raises(AdbError, match="__metadata__"):
        read_peft_raw(folder)
    one_error(["import", str(folder)], repo, str(folder / WEIGHTS_FILE), "__metadata__")


# -- adb train -----------------------------------------------------------------------------------


def test_train_target_modules_that_match_nothing_is_one_line(tmp_path: Path) -> None:
    """Found: `adb train` showed PEFT's traceback when target_modules matched no layer."""
    from tiny_models import save_bert, topic_task, write_topic_data, write_yaml

    save_bert(tmp_path / "bert")
    write_topic_data(tmp_path / "data", "t1")
    doc = topic_task("t1", str(tmp_path / "bert"), str(tmp_path / "data" / "t1"), steps=1)
    doc["lora"]["target_modules"] = ["no_such_layer", "nor_this"]
    write_yaml(tmp_path / "t.yaml", doc)
    Store.init(tmp_path)
    before = snapshot(tmp_path / STORE_DIR)
    one_error(["train", "t.yaml"], tmp_path, "target_modules", "no_such_layer")
    assert snapshot(tmp_path / STORE_DIR) == before
