"""Whole-layer methods in the store (trainers/continual.py): state kept per commit, `merge
--into` continuing from any commit that holds it, the refactoring error recorded, bad input
refused in one line, and `adb run` with OPCM on the tiny sequence."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_peft, one_error_line, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import adb_in_process

import adapterdb as adb
from adapterdb.adapter import to_torch
from adapterdb.errors import AdbError
from adapterdb.merging.layers import LAYER_METHODS, STATE_ERROR
from adapterdb.storage.store import Store
from adapterdb.trainers.evaluate import merge_steps


@pytest.fixture
def folders(tmp_path: Path) -> list[Path]:
    """Four tiny PEFT adapters (a Linear and a Conv LoRA of rank 2), seeds 0..3."""
    return [make_peft(tmp_path / f"t{i}", seed=i) for i in range(4)]


def equal(got: adb.Adapter, want: adb.Adapter) -> None:
    assert got.tensors.keys() == want.tensors.keys()
    for name, tensor in want.tensors.items():
        assert torch.equal(got.tensors[name], tensor), name


def three_steps(tmp_path: Path, folders: list[Path], method: str) -> tuple[adb.Store, str, str]:
    """Task a imported on main, then b and c merged into it with `method`: (store, first merge,
    second merge)."""
    store = adb.init(tmp_path / "store")
    store.commit(folders[0], task="a")
    store.commit(folders[1], task="b", expert=True)
    first = store.merge(method, into="main")
    store.commit(folders[2], task="c", expert=True)
    return store, first, store.merge(method, into="main")


@pytest.mark.parametrize("method", sorted(LAYER_METHODS))
def test_merge_into_twice_equals_one_standalone_fold(tmp_path, folders, method) -> None:
    """The stored state carries everything: two continual steps give exactly the standalone
    merge of the three adapters (a continual method folds them in order, a set method merges
    all three); the imported head counts as task 1."""
    store, _, head = three_steps(tmp_path, folders, method)
    equal(store.checkout(head), adb.merge(method, folders[:3]))
    commit = store.storage.read_commit(store.resolve(head))
    state = store.storage.read_manifest(commit.extra["objects"]["state"])
    assert state.metadata == {"method": method, "tasks": "3"}
    assert all("::" in name for name in state.tensors)


def test_state_survives_gc_and_fsck_and_records_the_error(tmp_path, folders) -> None:
    store, _, head = three_steps(tmp_path, folders, "opcm")
    record = store.show(head)
    # three rank-2 tasks refactored to rank 2: some energy is lost, and the commit says how much
    assert 0.01 < record.stats["refactor_error_max"] < 1
    assert record.params == {"alpha": 0.5, "space": "factors"}
    assert store.fsck().errors == []
    store.gc(grace=0)
    assert store.fsck().errors == []
    store.commit(folders[3], task="d", expert=True)
    last = store.merge("opcm", into="main")  # reads the state gc had to keep
    equal(store.checkout(last), adb.merge("opcm", folders))


def test_fsck_reports_a_lost_state_tensor(tmp_path, folders) -> None:
    store, _, head = three_steps(tmp_path, folders, "opcm")
    commit = store.storage.read_commit(store.resolve(head))
    state = store.storage.read_manifest(commit.extra["objects"]["state"])
    name, entry = next(iter(state.tensors.items()))
    store.storage.objects.path(entry.id).unlink()
    errors = store.fsck().errors
    assert any(f"state/{name}" in e and "missing" in e for e in errors), errors


def test_branch_from_an_older_commit_continues_from_its_state(tmp_path, folders) -> None:
    store, first, _ = three_steps(tmp_path, folders, "opcm")
    store.branch("old", first)
    store.commit(folders[3], task="d", expert=True, branch="old")
    equal(
        store.checkout(store.merge("opcm", into="old")),
        adb.merge("opcm", [*folders[:2], folders[3]]),
    )


def test_product_rank_keeps_every_task(tmp_path, folders) -> None:
    """Continual TA of two rank-2 tasks has rank 4: `--space product --rank 4` is exact."""
    store = adb.init(tmp_path / "store")
    store.commit(folders[0], task="a")
    store.commit(folders[1], task="b", expert=True)
    head = store.merge("continual_ta", into="main", space="product", rank=4)
    assert store.show(head).stats["refactor_error_max"] < 1e-6
    got = store.checkout(head).tensors
    assert got["base_model.model.lin.lora_A.weight"].shape == (4, 6)


def test_continual_ties_product_keeps_a_low_rank_state_and_records_its_error(
    tmp_path, folders
) -> None:
    """ties_space=product stores the rank-k refactored merge (k = state_rank 1 here, lossy),
    not the dense ΔW; `--into` continues from it exactly as the standalone fold does, and the
    commit's error counts the state's truncation (`layers.output_error`)."""
    params = {"ties_space": "product", "state_rank": 1}
    store = adb.init(tmp_path / "store")
    store.commit(folders[0], task="a")
    for i in (1, 2):
        store.commit(folders[i], task="bc"[i - 1], expert=True)
        head = store.merge("continual_ties", into="main", **params)
    equal(store.checkout(head), adb.merge("continual_ties", folders[:3], **params))
    commit = store.storage.read_commit(store.resolve(head))
    state = store.storage.read_manifest(commit.extra["objects"]["state"])
    keys = {name.rpartition("::")[2] for name in state.tensors}
    assert keys == {"a", "b", STATE_ERROR}
    assert all(e.shape[0] == 1 for n, e in state.tensors.items() if n.endswith("::a"))
    errors = [
        float(to_torch(store.storage.objects.get_tensor(e.id)))
        for name, e in state.tensors.items()
        if name.endswith(f"::{STATE_ERROR}")
    ]
    assert 0 < max(errors) <= store.show(head).stats["refactor_error_max"] < 1


def test_continual_ties_factor_space_refuses_a_rank_change(repo, folders, tmp_path) -> None:
    """Factor-space continual TIES adds A to A: an expert of another rank is refused in one
    line naming the way out, and the store is left as it was."""
    adb_in_process(["import", str(folders[0]), "--task", "a"], repo)
    wider = make_peft(tmp_path / "r3", seed=1, rank=3)
    adb_in_process(["import", str(wider), "--task", "b", "--expert"], repo)
    before = snapshot(repo / ".adb")
    rc, _, err = adb_in_process(["merge", "--method", "continual_ties"], repo)
    line = one_error_line(rc, err)
    assert "task 2 has LoRA rank 3 but the merge holds rank 2" in line
    assert line.endswith("use ties_space=product")
    assert snapshot(repo / ".adb") == before
    rc, _, err = adb_in_process(
        ["merge", "--method", "continual_ties", "--param", "ties_space=product"], repo
    )
    assert rc == 0, err


def test_bad_input_is_one_line_and_leaves_the_store(repo, folders) -> None:
    adb_in_process(["import", str(folders[0]), "--task", "a"], repo)
    adb_in_process(["import", str(folders[1]), "--task", "b", "--expert"], repo)
    adb_in_process(["merge", "--method", "average"], repo)  # a merge with no opcm state
    adb_in_process(["import", str(folders[2]), "--task", "c", "--expert"], repo)
    before = snapshot(repo / ".adb")
    rc, _, err = adb_in_process(["merge", "--method", "opcm", "--param", "alpha=2"], repo)
    assert "alpha=2.0 must be in [0, 1]" in one_error_line(rc, err)
    rc, _, err = adb_in_process(["merge", "--method", "opcm"], repo)
    assert "keeps no opcm state" in one_error_line(rc, err)
    assert snapshot(repo / ".adb") == before


def test_adb_run_opcm_merges_the_condu_experts(tmp_path) -> None:
    """`adb run` knows OPCM; its experts start from the base model like ConDU's, so it merges
    the very experts the ConDU branch trained (reused by fingerprint, not trained again)."""
    from fakedata import learnable_fashion
    from test_sequence import NET, SEQ

    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "seq.yaml").write_text(SEQ)
    learnable_fashion(tmp_path / "fm")
    adb_in_process(["init", "."], tmp_path)
    rc, out, err = adb_in_process(
        ["run", "seq.yaml", "--methods", "condu,opcm", "--json"], tmp_path
    )
    assert rc == 0, err
    doc = json.loads(out)
    (matrix,) = doc["matrices"]["opcm"]
    assert all(None not in row for row in matrix["R"])
    store = Store.open(tmp_path / ".adb")
    manifests = {
        m: [
            store.read_commit(s).manifest
            for _, c in merge_steps(store, f"run/{m}/0")
            for s in c.sources
        ]
        for m in ("condu", "opcm")
    }
    assert len(manifests["opcm"]) == 2 and manifests["opcm"] == manifests["condu"]
    experts = [oid for n, oid in store.refs.list("refs/experts/").items() if "opcm" in n]
    assert len(experts) == 2
    assert all(store.read_commit(oid).extra.get("reused_from") for oid in experts)


def test_values_are_the_running_mean_over_tasks(tmp_path) -> None:
    """A full weight (a classifier head) is no task vector: it is the mean over the tasks,
    with the head's value weighing as many tasks as the head holds (2·1.5 + 3) / 3 = 2."""
    from conftest import peft_config

    def adapter(seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {
            "base_model.model.lin.lora_A.weight": torch.randn(2, 6, generator=gen),
            "base_model.model.lin.lora_B.weight": torch.randn(5, 2, generator=gen),
            "base_model.model.head.weight": torch.full((3, 5), float(seed)),
        }

    config = peft_config(modules=("lin",))
    store = adb.init(tmp_path / "store")
    store.commit(adapter(1), task="a", config=config)
    for seed, task in ((2, "b"), (3, "c")):
        store.commit(adapter(seed), task=task, config=config, expert=True)
        with pytest.warns(adb.AdbWarning, match="merged as weights"):
            head = store.merge("opcm", into="main")
    assert torch.equal(
        store.checkout(head).tensors["base_model.model.head.weight"],
        adapter(2)["base_model.model.head.weight"],
    )


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(sorted(LAYER_METHODS)),
    value=st.one_of(st.floats(), st.sampled_from([1e39, 3.4e38, 1e30, -1e30, 1e-45, 0.0])),
)
def test_any_float_parameter_gives_a_refusal_or_finite_factors(method: str, value: float) -> None:
    """Every float parameter of a whole-layer method set to an absurd value: one AdbError
    line, or finite LoRA factors (never NaN/inf, never another exception)."""
    cls = LAYER_METHODS[method].params
    floats = {f.name: value for f in dataclasses.fields(cls) if f.type in ("float", float)}
    gen = torch.Generator().manual_seed(0)
    terms = [
        {
            "base_model.model.lin.lora_A.weight": torch.randn(2, 6, generator=gen),
            "base_model.model.lin.lora_B.weight": torch.randn(5, 2, generator=gen),
        }
        for _ in range(3)
    ]
    try:
        merged = adb.merge(method, terms, **floats)
    except AdbError as exc:
        assert "\n" not in str(exc)
        return
    assert all(bool(torch.isfinite(t).all()) for t in merged.tensors.values())
