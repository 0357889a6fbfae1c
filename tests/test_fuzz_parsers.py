"""Property-based fuzzing of every file adb parses (issue 12, item 2).

Refs, HEAD, FORMAT, reflogs, commit and manifest documents, adapter_config.json and
safetensors headers get random bytes, truncations, wrong JSON types, non-UTF-8 and path-like
names. Whatever the input, the answer is a value or an `AdbError` whose message is one line
naming the file (or object) -- never another exception type, never a second line.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import lora_tensors, make_peft, peft_config
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tiny_models import adb_in_process

from adapterdb.adapter import CONFIG_FILE, WEIGHTS_FILE, lora_scale, read_peft_config
from adapterdb.errors import AdbError
from adapterdb.storage.commits import Commit, check_task_name
from adapterdb.storage.refs import HEADS, OID_RE, RefStore
from adapterdb.storage.store import FORMAT, Store
from adapterdb.tensorfile import read_safetensors

FUZZ = settings(
    max_examples=int(os.environ.get("ADB_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
# path-like and control-character names, and rich markup (it must print verbatim)
ODD = ["../x", "../../etc/passwd", "/abs", "a/b", "..", ".", "", " ", "a\nb", "a\x00b", "\\x", "-v"]
PATHLIKE = st.sampled_from([*ODD, "\r", "[/]", "[bold]x[/bold]"])
NAMES = st.text(max_size=12) | PATHLIKE
SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | PATHLIKE | HEX
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=8,
)


def one_line(exc: AdbError, *names: str) -> None:
    """The fuzzers' one assertion about an error: a single line that names the file."""
    message = str(exc)
    assert "\n" not in message and "\r" not in message, message
    for name in names:
        assert name in message, message


def mutated(data: bytes, how: st.DataObject) -> bytes:
    """`data` truncated, with bytes flipped, or replaced by random bytes."""
    kind = how.draw(st.sampled_from(["truncate", "flip", "random"]))
    if kind == "random" or not data:
        return how.draw(st.binary(max_size=200))
    if kind == "truncate":
        return data[: how.draw(st.integers(0, len(data) - 1))]
    buf = bytearray(data)
    for _ in range(how.draw(st.integers(1, 4))):
        buf[how.draw(st.integers(0, len(buf) - 1))] = how.draw(st.integers(0, 255))
    return bytes(buf)


@pytest.fixture(scope="module")
def hist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Store, list[str]]]:
    """A store (repo/) whose main has two imports; each test restores what it damages."""
    root = tmp_path_factory.mktemp("fuzz")
    repo = root / "repo"
    store = Store.init(repo)
    ids = []
    for seed in (1, 2):
        manifest = store.put_adapter(lora_tensors(seed), peft_config())
        commit = Commit(manifest=manifest, kind="import", task=f"t{seed}", provenance={"t": 1})
        ids.append(store.commit(commit, "main"))
    yield repo, store, ids


# -- refs, HEAD, FORMAT, reflog ------------------------------------------------------------------


@FUZZ
@given(how=st.data())
def test_fuzz_ref_files(hist: tuple[Path, Store, list[str]], how: st.DataObject) -> None:
    _, store, ids = hist
    path = store.root / HEADS / "fuzzed"
    path.write_bytes(mutated(f"{ids[0]}\n".encode(), how))
    try:
        value = store.refs.read(HEADS + "fuzzed")
        assert value is not None and OID_RE.fullmatch(value)
    except AdbError as exc:
        one_line(exc, str(path), "adb fsck --repair")
        _, broken = store.refs.scan(HEADS)
        assert "fuzzed" in broken
    finally:
        path.unlink()


@FUZZ
@given(how=st.data())
def test_fuzz_head(hist: tuple[Path, Store, list[str]], how: st.DataObject) -> None:
    _, store, _ = hist
    path = store.root / "HEAD"
    good = path.read_bytes()
    path.write_bytes(mutated(good, how) if how.draw(st.booleans()) else how.draw(st.binary()))
    try:
        ref, oid = store.refs.head_ref()
        assert (ref and ref.startswith(HEADS)) or (oid and OID_RE.fullmatch(oid))
    except AdbError as exc:
        one_line(exc, str(path))
    finally:
        path.write_bytes(good)


@FUZZ
@given(how=st.data())
def test_fuzz_format(hist: tuple[Path, Store, list[str]], how: st.DataObject) -> None:
    repo, store, _ = hist
    path = store.root / "FORMAT"
    path.write_bytes(mutated(f"{FORMAT}\n".encode(), how))
    try:
        assert Store.open(repo).root == store.root
    except AdbError as exc:
        one_line(exc, str(path))
    finally:
        path.write_bytes(f"{FORMAT}\n".encode())


@FUZZ
@given(how=st.data())
def test_fuzz_reflog(hist: tuple[Path, Store, list[str]], how: st.DataObject) -> None:
    _, store, _ = hist
    path = store.root / "logs" / HEADS / "main"
    good = path.read_bytes()
    path.write_bytes(mutated(good, how))
    try:
        log = store.refs.read_reflog(HEADS + "main")  # never raises: it reports
        assert all(e.old is None or OID_RE.fullmatch(e.old) for e in log.entries)
        assert all(e.new is None or OID_RE.fullmatch(e.new) for e in log.entries)
        try:
            store.refs.reflog(HEADS + "main")
        except AdbError as exc:
            one_line(exc, str(path), "adb fsck --repair")
        for problem in store.fsck().errors:
            assert "\n" not in problem
    finally:
        path.write_bytes(good)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(0, 10_000))
def test_a_reflog_cut_anywhere_reads_without_error(tmp_path_factory: Any, cut: int) -> None:
    """A crash mid-append tears only the last line: that is tolerated, never reported."""
    refs = RefStore(tmp_path_factory.getbasetemp())
    path = refs.root / "logs" / "refs" / "heads" / "cut"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{'-' if i == 0 else 'a' * 64} {'b' * 64} {i}.125\tstep {i}\n" for i in range(4)]
    data = "".join(lines).encode()
    path.write_bytes(data[: cut % (len(data) + 1)])
    log = refs.read_reflog("refs/heads/cut")
    assert not log.bad_lines
    assert len(log.entries) == data[: cut % (len(data) + 1)].count(b"\n")


# -- commit and manifest documents ---------------------------------------------------------------

COMMIT_KEYS = [
    "manifest", "kind", "parents", "task", "method", "params", "sources", "base_model",
    "triggers", "eval", "stats", "provenance", "author", "time", "message", "extra", "type",
    "schema",
]  # fmt: skip
NUMBERS = st.floats() | st.integers(-(2**70), 2**70)
TRIGGERS = st.dictionaries(
    NAMES, st.fixed_dictionaries({"scale": JSON, "masks": st.dictionaries(NAMES, HEX | NAMES)})
)


def _crafted_ref(store: Store, oid: str) -> None:
    path = store.root / HEADS / "fuzz"
    path.write_text(oid + "\n")


@FUZZ
@given(patch=st.dictionaries(st.sampled_from(COMMIT_KEYS), JSON | TRIGGERS | NUMBERS, max_size=4))
def test_fuzz_commit_documents(hist: tuple[Path, Store, list[str]], patch: dict[str, Any]) -> None:
    repo, store, ids = hist
    doc = {**store.objects.get_json(ids[-1]), **patch}
    oid = store.objects.put_json(doc)
    try:
        commit = store.read_commit(oid)
    except AdbError as exc:
        one_line(exc, oid[:12])
        return
    assert OID_RE.fullmatch(commit.manifest) and all(OID_RE.fullmatch(p) for p in commit.parents)
    assert all(check_task_name(t) for t in commit.triggers)
    assert math.isfinite(commit.time)
    _crafted_ref(store, oid)
    for verb in (["show", "fuzz", "--tensors"], ["log", "fuzz"], ["show", "fuzz", "--json"]):
        rc, _, err = adb_in_process(verb, repo)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
        assert rc == 0 or err.startswith("error: "), err


TENSOR = st.fixed_dictionaries(
    {"id": HEX | NAMES, "dtype": st.sampled_from(["F32", "BF16", "X"]) | JSON, "shape": JSON}
)


@FUZZ
@given(
    patch=st.dictionaries(
        st.sampled_from(["tensors", "config", "metadata", "type", "schema"]),
        JSON | st.dictionaries(NAMES, TENSOR | JSON, max_size=3),
        max_size=3,
    )
)
def test_fuzz_manifest_documents(
    hist: tuple[Path, Store, list[str]], patch: dict[str, Any]
) -> None:
    repo, store, ids = hist
    commit = store.objects.get_json(ids[-1])
    manifest = store.objects.put_json({**store.objects.get_json(commit["manifest"]), **patch})
    oid = store.objects.put_json({**commit, "manifest": manifest})
    try:
        store.read_manifest(manifest)
    except AdbError as exc:
        one_line(exc, manifest[:12])
    _crafted_ref(store, oid)
    for verb in (["show", "fuzz", "--tensors"], ["show", "fuzz", "--json"]):
        rc, _, err = adb_in_process(verb, repo)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
        assert rc == 0 or err.startswith("error: "), err


@FUZZ
@given(doc=JSON)
def test_fuzz_whole_documents_never_crash_fsck(
    hist: tuple[Path, Store, list[str]], doc: Any
) -> None:
    """Any JSON at all where a commit is expected: fsck reports it on one line."""
    _, store, _ = hist
    oid = store.objects.put_json(doc)
    errors: list[str] = []
    store._reachable({"fuzz": oid}, errors)
    assert all("\n" not in e for e in errors)


# -- adapter_config.json and safetensors -----------------------------------------------------------

CONFIG_KEYS = ["r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "target_modules"]


@FUZZ
@given(
    patch=st.dictionaries(
        st.sampled_from(CONFIG_KEYS), JSON | st.dictionaries(NAMES, JSON, max_size=2), max_size=3
    ),
    raw=st.none() | st.binary(max_size=40),
)
def test_fuzz_adapter_config(
    tmp_path_factory: Any, patch: dict[str, Any], raw: bytes | None
) -> None:
    folder = tmp_path_factory.getbasetemp() / "cfg"
    folder.mkdir(exist_ok=True)
    path = folder / CONFIG_FILE
    path.write_bytes(raw if raw is not None else json.dumps({**peft_config(), **patch}).encode())
    try:
        config = read_peft_config(folder)
    except AdbError as exc:
        one_line(exc, str(path))
        return
    for module in ("lin", "a.lin", "conv"):
        assert math.isfinite(lora_scale(config, module, 2)) or True  # computes, never crashes


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = make_peft(tmp_path_factory.mktemp("st") / "a")
    return (folder / WEIGHTS_FILE).read_bytes()


def _header(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _with_header(data: bytes, header: Any) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data[8 + n :]


@FUZZ
@given(how=st.data())
def test_fuzz_safetensors_bytes(tmp_path_factory: Any, weights: bytes, how: st.DataObject) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(mutated(weights, how))
    try:
        read_safetensors(path)
    except AdbError as exc:
        one_line(exc, str(path))


@FUZZ
@given(
    patch=st.dictionaries(
        st.sampled_from(["__metadata__", "base_model.model.lin.lora_A.weight", "x"]) | NAMES,
        JSON | st.fixed_dictionaries({"dtype": JSON, "shape": JSON, "data_offsets": JSON}),
        max_size=3,
    )
)
def test_fuzz_safetensors_header(
    tmp_path_factory: Any, weights: bytes, patch: dict[str, Any]
) -> None:
    assume(patch)
    path = tmp_path_factory.getbasetemp() / "fuzz-header.safetensors"
    path.write_bytes(_with_header(weights, {**_header(weights), **patch}))
    try:
        tensors, metadata = read_safetensors(path)
    except AdbError as exc:
        one_line(exc, str(path))
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    for t in tensors.values():
        assert t.data.size == t.numel * t.itemsize
