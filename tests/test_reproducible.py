"""An expert is a function of its task file alone: the same whether `adb run` reused a cached
runtime (after training other tasks in the same process) or built a new one, as after a kill
and resume, or in a `--jobs` worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import TOPICS, save_bert, topic_task, write_topic_data

from adapterdb.adapter import to_torch
from adapterdb.storage.store import Store
from adapterdb.trainers import loop, runtime
from adapterdb.trainers.config import parse_task


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> list:
    root = tmp_path_factory.mktemp("repro")
    save_bert(root / "bert", [w for task in TOPICS.values() for words in task for w in words])
    out = []
    for name in ("t1", "t2"):
        write_topic_data(root / "data", name)
        doc = topic_task(name, str(root / "bert"), str(root / "data" / name), steps=6)
        doc["init"] = "fresh"
        out.append(parse_task(doc, root, name))
    return out


def expert(store: Store, oid: str | None) -> dict[str, torch.Tensor]:
    assert oid is not None
    manifest = store.read_manifest(store.read_commit(oid).manifest)
    return {n: to_torch(r) for n, r in store.iter_tensors(manifest)}


def test_a_cached_runtime_trains_the_same_expert_as_a_new_one(tasks, tmp_path: Path) -> None:
    t1, t2 = tasks
    store = Store.init(tmp_path)
    cache = runtime.RuntimeCache()
    loop.train(t2, store, "warm", cache=cache)  # the cache now holds t2's runtime...
    first = loop.train(t1, store, "warm", cache=cache)  # ...and t1's, freshly built
    again = loop.train(t1, store, "again", cache=cache)  # t1's runtime reused, weights and all
    alone = loop.train(t1, store, "alone")  # no cache at all
    assert cache.get(t1) is cache.get(t1)  # the cache hits for task-built runtimes
    want = expert(store, first.commit_id)
    for other in (again, alone):
        got = expert(store, other.commit_id)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
        assert other.accuracy == first.accuracy


def test_an_expert_started_from_an_adapter_is_the_same_cached_or_not(tasks, tmp_path) -> None:
    _, t2 = tasks
    store = Store.init(tmp_path)
    cache = runtime.RuntimeCache()
    start = expert(store, loop.train(t2, store, "seed", cache=cache).commit_id)
    first = loop.train(t2, store, "a", init=start, cache=cache)  # t2's runtime reused
    alone = loop.train(t2, store, "b", init=start)  # built anew
    want, got = expert(store, first.commit_id), expert(store, alone.commit_id)
    assert all(torch.equal(got[n], want[n]) for n in want)
