"""`adb run`'s learning-rate protocol: candidates scored by independent experts on a validation
split carved from the training data, one value chosen per sequence for every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_sequence import adb, fresh_store, workdir  # noqa: F401  (the module's fixture)

from adapterdb.errors import AdbError
from adapterdb.storage.store import Store
from adapterdb.trainers.config import load_sequence
from adapterdb.trainers.data import ExampleDataset, TaskData, carve_validation
from adapterdb.trainers.tuning import LrChoice, Score, candidates

CANDIDATES = [1e-5, 0.02]


def _dataset(n: int) -> ExampleDataset:
    return ExampleDataset(lambda i: {"x": i}, n, torch.arange(n) % 3)


def test_carved_validation_is_a_seeded_disjoint_cut_of_the_training_split() -> None:
    data = TaskData(_dataset(50), _dataset(7), ("a", "b", "c"))
    cut = carve_validation(data, 0.2, seed=3)
    train = [cut.train[i]["x"] for i in range(len(cut.train))]
    held = [cut.eval[i]["x"] for i in range(len(cut.eval))]
    assert len(held) == 10 and len(train) == 40
    assert sorted(train + held) == list(range(50))  # nothing from the task's eval split
    assert [cut.eval[i]["label"] for i in range(10)] == [x % 3 for x in held]
    again = carve_validation(data, 0.2, seed=3)
    assert [again.eval[i]["x"] for i in range(10)] == held
    other = carve_validation(data, 0.2, seed=4)
    assert [other.eval[i]["x"] for i in range(10)] != held


def test_a_tiny_split_keeps_one_example_on_each_side() -> None:
    cut = carve_validation(TaskData(_dataset(2), None, ("a",)), 0.01)
    assert (len(cut.train), len(cut.eval)) == (1, 1)


@pytest.fixture(scope="module")
def chosen(workdir: Path) -> tuple[Path, dict]:  # noqa: F811
    d = fresh_store(workdir, "tuned")
    seq = (d / "seq.yaml").read_text().replace("lr: 0.02,", f"lr: {CANDIDATES},")
    (d / "seq.yaml").write_text(seq)
    out = adb("run", "seq.yaml", "--methods", "average", "--json", cwd=d)
    return d, json.loads(out.stdout)


def test_the_best_candidate_on_validation_is_chosen_and_recorded(chosen) -> None:
    _, doc = chosen
    lr = doc["lr"]
    assert lr["candidates"] == CANDIDATES
    scores = {float(k): (v["accuracy"], v["standard_error"]) for k, v in lr["validation"].items()}
    assert sorted(scores) == CANDIDATES
    best, se = max(scores.values())
    assert 0 < se < 0.5
    assert lr["chosen"] == min(x for x, (acc, _) in scores.items() if acc >= best - se)


def test_scores_come_from_experts_trained_and_scored_inside_the_training_data(chosen) -> None:
    d, doc = chosen
    store = Store.find(d)
    experts = store.refs.list("refs/experts/run/select/")
    assert len(experts) == 4  # two tasks x two candidates
    for oid in experts.values():
        c = store.read_commit(oid)
        task_file = c.params["task_file"]
        assert task_file["data"]["validation"] == 0.2 and task_file["init"] == "fresh"
        lr = task_file["optim"]["lr"]
        assert doc["lr"]["validation"][f"{lr:g}"]["tasks"][c.task] == c.eval["accuracy"][c.task]


def test_every_method_trains_with_the_chosen_rate(chosen) -> None:
    d, doc = chosen
    store = Store.find(d)
    for oid in store.refs.list("refs/experts/run/average/").values():
        assert store.read_commit(oid).params["task_file"]["optim"]["lr"] == doc["lr"]["chosen"]


def test_a_rerun_trains_no_candidate_again(chosen) -> None:
    d, doc = chosen
    store = Store.find(d)
    before = store.refs.list("refs/experts/")
    again = json.loads(adb("run", "seq.yaml", "--methods", "average", "--json", cwd=d).stdout)
    assert again["lr"] == doc["lr"]
    assert store.refs.list("refs/experts/") == before


def test_tasks_with_different_candidates_are_refused(workdir: Path) -> None:  # noqa: F811
    seq = load_sequence(workdir / "seq.yaml")
    a, b = seq.tasks
    b = b.model_copy(update={"optim": b.optim.model_copy(update={"lr": [0.1, 0.2]})})
    with pytest.raises(AdbError, match=r"different optim\.lr candidates"):
        candidates([a, b])


def _choice(scores: dict[float, list[tuple[float, int]]]) -> LrChoice:
    choice = LrChoice(sorted(scores), 0.0)
    for lr, per_task in scores.items():
        choice.validation[lr] = {f"t{i}": Score(a, n) for i, (a, n) in enumerate(per_task)}
    return choice


def test_a_statistical_tie_goes_to_the_smaller_rate() -> None:
    # 0.922 vs 0.923 over 1,000 examples: one example apart, SE ~ 0.0084
    choice = _choice({1e-3: [(0.922, 1000)], 3e-3: [(0.923, 1000)]})
    assert choice.decide() == 1e-3


def test_a_clear_win_goes_to_the_better_rate() -> None:
    choice = _choice({1e-3: [(0.80, 500), (0.84, 500)], 3e-3: [(0.90, 500), (0.92, 500)]})
    assert choice.pooled(1e-3)[0] == pytest.approx(0.82)
    assert choice.decide() == 3e-3
