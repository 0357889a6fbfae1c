"""The Python API (`import adapterdb as adb`): the README example, parity with the CLI verbs
it shares its workflows with, and one-line `AdbError`s that leave the store unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import lora_tensors, make_peft, peft_config, snapshot, to_raw
from readme_blocks import block
from tiny_models import adb_in_process

import adapterdb as adb
from adapterdb.adapter import write_peft_raw
from adapterdb.cli.output import _jsonable
from adapterdb.errors import AdbError, NotFoundError

HEAD_NAME = "base_model.model.classifier.modules_to_save.default.weight"


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """tmp_path holding lora-task1..3 (tiny Linear + Conv LoRAs, seeds 1..3)."""
    for i in (1, 2, 3):
        make_peft(tmp_path / f"lora-task{i}", i)
    return tmp_path


@pytest.fixture
def api_store(folders: Path) -> adb.Store:
    """A store with t1 and t2 committed through the API."""
    store = adb.init(folders)
    store.commit(folders / "lora-task1", task="t1")
    store.commit(folders / "lora-task2", task="t2")
    return store


def cli(args: list[str], cwd: Path) -> str:
    rc, out, err = adb_in_process(args, cwd)
    assert rc == 0, err
    return out


def test_import_adapterdb_loads_neither_torch_nor_the_store(folders: Path) -> None:
    """`import adapterdb; adapterdb.open` stays as cheap as `adb log`: reading history from
    Python never imports torch."""
    adb.init(folders).commit(folders / "lora-task1", task="t1")  # a store to read
    code = (
        "import sys, adapterdb\n"
        "adapterdb.open, adapterdb.Store, adapterdb.merge\n"
        "assert 'torch' not in sys.modules and 'adapterdb.storage.store' not in sys.modules\n"
        "store = adapterdb.open()\n"
        "assert [r.task for r in store.log()] == ['t1'] and store.active_branch == 'main'\n"
        "assert 'torch' not in sys.modules, 'reading history imported torch'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=folders, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_readme_example_runs(folders: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folders)
    namespace: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(block("python-api"), namespace)  # the README's text, as a reader copies it
    assert any(issubclass(w.category, adb.AdbWarning) for w in caught)  # as the README says
    store: adb.Store = namespace["store"]
    assert [(r.kind, r.task) for r in store.log("main")] == [
        ("merge", "t3"),
        ("import", "t3"),  # the expert, a parent of the merge
        ("import", "t2"),
        ("import", "t1"),
    ]
    assert store.show("main").method == "pam" and store.show("tasks").tasks == ("t1", "t2")
    merged = adb.load(folders / "merged")
    assert set(merged.tensors) == set(namespace["a1"].tensors)
    expert, t2 = namespace["e"], adb.load(folders / "lora-task2")
    assert set(expert.tensors) == set(t2.tensors)
    same_sign = [
        (expert.tensors[n].sign() == t2.tensors[n].sign()).float().mean() for n in t2.tensors
    ]
    assert min(same_sign) > 0.5  # a decoupled expert keeps most of its task's signs


def test_commit_forms_give_the_commit_adb_import_gives(folders: Path) -> None:
    """A folder, an Adapter and a dict of tensors + config (a PEFT-style config with a set)
    store the tensors and config `adb import` stores: one workflow behind both (a dict has
    no safetensors metadata to keep)."""
    store = adb.init(folders)
    cli(["import", "lora-task1", "--task", "t1"], folders)
    by_cli = store.show("main")
    loaded = adb.load(folders / "lora-task1")
    config = dict(loaded.config, target_modules=set(loaded.config["target_modules"]))
    ids = [
        store.commit(folders / "lora-task1", task="t1"),
        store.commit(loaded, task="t1", message="from memory"),
        store.commit(dict(loaded.tensors), task="t1", config=config),
    ]
    records = [store.show(i) for i in ids]
    assert {r.manifest for r in records[:2]} == {by_cli.manifest}
    manifests = [store.storage.read_manifest(r.manifest) for r in (by_cli, records[2])]
    assert manifests[0].tensors == manifests[1].tensors
    assert manifests[0].config == manifests[1].config
    assert [r.kind for r in records] == ["import"] * 3
    assert records[1].message == "from memory" and records[0].parents == (by_cli.id,)
    assert store.log(limit=2)[0].id == ids[-1]


def test_expert_commit_waits_for_merge(api_store: adb.Store, folders: Path) -> None:
    head = api_store.head
    oid = api_store.commit(folders / "lora-task3", task="t3", expert=True)
    assert api_store.head == head  # the branch did not move
    assert api_store.experts() == {"t3": oid} and api_store.show(oid).parents == (head,)
    assert api_store.resolve("refs/experts/main/t3") == oid
    with pytest.warns(adb.AdbWarning, match="no training record"):
        merged = api_store.merge("pam")
    record = api_store.show("main")
    assert record.id == merged and record.sources == (oid,) and record.method == "pam"
    assert record.parents == (head, oid)


def test_diff_equals_adb_diff_json(api_store: adb.Store, folders: Path) -> None:
    got = api_store.diff("main~1", "main")
    want = json.loads(cli(["diff", "--json", "main~1", "main"], folders))
    assert json.loads(json.dumps(_jsonable(got))) == want
    # an Adapter against a folder: the same figures as the two revisions they equal
    mixed = api_store.diff(api_store.checkout("main~1"), folders / "lora-task2")
    assert mixed["summary"] == got["summary"] and mixed["delta_w"] == got["delta_w"]
    assert api_store.diff("main", "main")["summary"]["rel_l2"] == 0.0


def test_merge_equals_adb_merge_o(folders: Path) -> None:
    """`adb.merge` and `adb merge -o` give the same tensors, in both spaces."""
    for space, extra in (("factors", []), ("product", ["--rank", "3"])):
        out = f"cli-{space}"
        cli(
            ["merge", "-M", "ties", "-p", "density=0.5", "-p", "lambda=0.7", "--space", space,
             *extra, "lora-task1", "lora-task2", "-o", out],
            folders,
        )  # fmt: skip
        rank = 3 if extra else None
        got = adb.merge(
            "ties",
            [folders / "lora-task1", adb.load(folders / "lora-task2")],
            space=space,
            rank=rank,
            density=0.5,
            **{"lambda": 0.7},
        )
        want = adb.load(folders / out)
        assert got.config == want.config
        assert {n: t.tolist() for n, t in got.tensors.items()} == {
            n: t.tolist() for n, t in want.tensors.items()
        }
    same = adb.merge("task_arithmetic", [folders / "lora-task1"] * 2, lam=0.5, weights=[1, 1])
    one = adb.load(folders / "lora-task1")
    assert all(torch.equal(same.tensors[n], one.tensors[n]) for n in one.tensors)


def _with_head(folder: Path, seed: int, value: float = 1.0) -> Path:
    """A PEFT folder whose classifier head (all `value`) is saved as a value (modules_to_save)."""
    tensors = lora_tensors(seed)
    tensors[HEAD_NAME] = to_raw(np.full((3, 4), value), "F32")
    return write_peft_raw(folder, peft_config(), tensors)


def test_merge_classifies_tensor_kinds(tmp_path: Path) -> None:
    """A head is a value: TIES must average it (-1), not elect a sign and keep the agreeing
    source (-3), as `merge_adapters` with kinds=None would; and the user is told."""
    a, b = _with_head(tmp_path / "a", 1, 1.0), _with_head(tmp_path / "b", 3, -3.0)
    with pytest.warns(adb.AdbWarning, match="merged as weights"):
        merged = adb.merge("ties", [a, b], density=0.2)
    assert torch.equal(merged.tensors[HEAD_NAME], torch.full((3, 4), -1.0))


def test_records_refs_and_maintenance(
    api_store: adb.Store, folders: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = adb.open(folders)
    assert store.path == api_store.path and repr(store).startswith("adapterdb.Store(")
    log = store.log()
    assert [(r.kind, r.task) for r in log] == [("import", "t2"), ("import", "t1")]
    assert log[0].parents == (log[1].id,) and log[0].date.year >= 2024
    assert store.head == log[0].id == store.resolve("HEAD") == store.branches["main"]
    assert store.resolve(log[1].id[:8]) == log[1].id
    assert store.branch("dev", "main~1") == log[1].id and store.tag("v1") == log[0].id
    assert store.tags == {"v1": log[0].id} and store.branches["dev"] == log[1].id
    store.switch("dev")
    assert store.active_branch == "dev" and store.head == log[1].id
    oid = store.commit(folders / "lora-task3", task="t3")  # on dev, HEAD's branch
    assert store.branches["dev"] == oid and store.branches["main"] == log[0].id
    adapter = store.checkout("v1", tensors="*lora_A*")
    assert adapter.tensors and all("lora_A" in n for n in adapter.tensors)
    assert adapter.config == adb.load(folders / "lora-task2").config
    assert store.fsck().ok and store.gc(dry_run=True, grace=0).removed == []
    (folders / "sub").mkdir()
    monkeypatch.chdir(folders / "sub")
    monkeypatch.delenv("ADB_STORE", raising=False)
    assert adb.open().path == store.path  # from cwd's parents, as the CLI finds it


def test_methods_lists_the_registry_and_workflow_names() -> None:
    from adapterdb.merging import registry

    methods = adb.methods()
    assert set(registry.methods()) | {"pam", "condu"} == set(methods)
    assert methods["ties"]["density"] == 0.2 and methods["ties"]["lambda"] == 1.0
    assert methods["pam"] == methods["average"]


def test_router_calls_the_router_workflow(
    api_store: adb.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    fake = types.ModuleType("adapterdb.trainers.router")
    fake.router = lambda store, rev, top_k=2: calls.append((store, rev, top_k)) or "module"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "adapterdb.trainers.router", fake)
    assert api_store.router("main", top_k=3) == "module"
    assert calls == [(api_store.storage, "main", 3)]


def _bad_calls(store: adb.Store, folders: Path) -> list[tuple[Callable[[], Any], str]]:
    loaded = adb.load(folders / "lora-task1")
    nan = adb.Adapter(dict(loaded.tensors), loaded.config)
    name = next(iter(nan.tensors))
    nan.tensors[name] = nan.tensors[name].clone()
    nan.tensors[name][0, 0] = float("nan")
    pair = [folders / "lora-task1", folders / "lora-task2"]
    return [
        (lambda: store.commit(42), "takes an Adapter"),
        (lambda: store.commit(folders / "missing"), "is not a folder"),
        (lambda: store.commit(dict(loaded.tensors)), "needs its PEFT config"),
        (lambda: store.commit({"x": [1.0]}, config={}), "torch tensors"),
        (lambda: store.commit(nan), "NaN or inf"),
        (lambda: store.commit(loaded, config={}), "goes with a dict"),
        (lambda: store.commit(adb.Adapter(loaded.tensors, {}, {"n": 1})), "metadata must map"),
        (lambda: store.commit(loaded.tensors, config={"x": object()}), "not plain JSON"),
        (lambda: store.commit(loaded.tensors, config={"r": 0}), "not a LoRA rank"),
        (lambda: store.commit(folders / "lora-task1", task="a/b"), "task name"),
        (lambda: store.commit(folders / "lora-task1", task=7), "task must be a str"),
        (lambda: store.commit(folders / "lora-task1", expert=True), "belongs to a task"),
        (lambda: store.commit(folders / "lora-task1", branch="x..y"), "not a valid branch"),
        (
            lambda: store.commit(adb.Adapter({"w": torch.zeros(2, dtype=torch.complex64)})),
            "cannot be stored",
        ),
        (lambda: store.checkout("nope"), "unknown revision"),
        (lambda: store.checkout(5), "revision must be a str"),
        (lambda: store.log(limit=0), "whole number"),
        (lambda: store.show("main~9"), "past the start"),
        (lambda: adb.merge("nope", pair), "unknown merge method"),
        (lambda: adb.merge("ties", pair, densty=0.2), "bad parameter"),
        (lambda: adb.merge("ties", pair, density="lots"), "not a number"),
        (lambda: adb.merge("ties", pair, density=float("nan")), "finite"),
        (lambda: adb.merge("ties", folders / "lora-task1"), "as a list"),
        (lambda: adb.merge("ties", [42]), "pass an Adapter"),
        (lambda: adb.merge("condu", pair), "condu keeps triggers"),
        (lambda: adb.merge("ties", pair, space="sideways"), "unknown space"),
        (lambda: adb.merge("ties", pair, rank=4), "only applies to --space product"),
        (lambda: adb.merge("ties", pair, space="product", rank="4"), "whole number"),
        (lambda: store.gc(grace="1h"), "age in seconds"),
        (lambda: adb.merge("ties", [*pair, folders / "odd"]), "not a PEFT adapter folder"),
        (lambda: store.merge("pam"), "no unmerged expert"),
        (lambda: store.merge("ties", sources=[3]), "expected a path"),
        (lambda: store.decouple("main", task="t1"), "no trigger"),
        (lambda: store.branch("main"), "already exists"),
        (lambda: store.tag("bad tag"), "not a valid tag"),
        (lambda: store.switch("nope"), "does not exist"),
        (lambda: store.gc(foo=1), "gc() takes"),
        (lambda: adb.open(folders / "lora-task1"), "not an adb store"),
        (lambda: adb.load(folders / "missing"), "is not a folder"),
        (lambda: adb.init(folders), "already a store"),
    ]


def test_bad_input_is_one_adb_error_and_changes_nothing(
    api_store: adb.Store, folders: Path
) -> None:
    (folders / "odd").mkdir()  # a folder that is not a PEFT adapter
    _with_head(folders / "headed", 1)
    before = snapshot(api_store.path)
    for call, words in _bad_calls(api_store, folders):
        with pytest.raises(AdbError) as info:
            call()
        message = str(info.value)
        assert words in message and "\n" not in message, message
    assert snapshot(api_store.path) == before
    with pytest.raises(NotFoundError):  # the subclasses come through as they are
        api_store.resolve("nope")
    with pytest.raises(AdbError, match="only in"):  # sources that do not fit together
        adb.merge("average", [folders / "lora-task1", folders / "headed"])
