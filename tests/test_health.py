"""Training health checks: each flag fires on the figures of a run that learned nothing and
stays quiet on one that learned; `adb train` prints the line, `on_collapse: stop` refuses."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from conftest import run_adb, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import one_error_line
from tiny_models import TOPICS, save_bert, topic_task, write_topic_data, write_yaml

from adapterdb.storage.store import STORE_DIR, Store
from adapterdb.trainers import health
from adapterdb.trainers.config import parse_task
from adapterdb.trainers.loop import schedule

LN4 = math.log(4)


def checks(h: health.Health) -> set[str]:
    return {f.check for f in h.flags()}


def test_a_learning_run_raises_no_flag() -> None:
    h = health.Health("t", 1e-3, 4)
    for loss in torch.linspace(LN4, 0.2, 40).tolist():
        h.record_step(loss, 1.0)
    h.record_probe(0, 0.5)
    h.record_probe(40, 0.6)
    h.record_accuracy(0.9, torch.arange(400) % 4)
    assert h.flags() == []
    assert h.to_json()["flags"] == []


def test_a_loss_stuck_at_ln_k_is_flagged_with_its_step_and_figure() -> None:
    h = health.Health("t", 3e-3, 4)
    for i in range(40):
        h.record_step(LN4 + 0.01 * (-1) ** i, 0.1)
    (flag,) = h.flags()
    assert (flag.check, flag.step) == ("loss_at_uniform", 40)
    assert abs(flag.value - LN4) < 0.01
    assert "ln(4) = 1.386" in flag.message and "optim.lr (now 0.003)" in flag.message


def test_one_step_below_the_uniform_band_means_it_learned_something() -> None:
    h = health.Health("t", 1e-3, 2)
    for _ in range(20):
        h.record_step(math.log(2), None)
    h.losses[-1] = 0.3
    assert "loss_at_uniform" not in checks(h)


def test_a_loss_climbing_far_above_its_start_is_diverging() -> None:
    h = health.Health("t", 1.0, 4)
    for loss in [1.4, 1.3, 1.5, 1.4, 2.0, 4.0, 9.0, 20.0, 40.0, 60.0, 80.0, 90.0]:
        h.record_step(loss, 100.0)
    (flag,) = h.flags()
    assert flag.check == "diverging" and flag.step == 12 and flag.value == pytest.approx(67.5)


def test_collapsed_features_are_flagged_at_the_first_collapsed_probe() -> None:
    h = health.Health("t", 1e-3, 2)
    for step, cos in [(0, 0.45), (10, 0.7), (20, 0.99), (30, 0.9999)]:
        h.record_probe(step, cos)
    (flag,) = h.flags()
    assert (flag.check, flag.step, flag.value) == ("features_collapsed", 20, 0.99)


def test_features_as_aligned_as_the_base_are_not_a_collapse() -> None:
    h = health.Health("t", 1e-3, 2)
    h.record_probe(0, 0.99)
    h.record_probe(10, 0.985)
    assert h.flags() == []


@pytest.mark.parametrize(
    ("accuracy", "flagged"), [(0.5, True), (0.54, True), (0.56, False), (0.9, False)]
)
def test_accuracy_within_two_standard_errors_of_the_majority_rate_is_at_chance(
    accuracy: float, flagged: bool
) -> None:
    h = health.Health("t", 1e-3, 2)
    h.record_accuracy(accuracy, torch.arange(400) % 2)  # majority 0.5, 2 SE = 0.05
    assert ("at_chance" in checks(h)) is flagged


def test_chance_is_the_majority_class_rate_not_one_over_k() -> None:
    h = health.Health("t", 1e-3, 2)
    h.record_accuracy(0.8, torch.tensor([0] * 80 + [1] * 20))
    assert h.chance == 0.8 and "at_chance" in checks(h)


def _reference_cosine(x: torch.Tensor) -> float:
    rows = [r / r.norm() if r.norm() > 0 else r for r in x.double()]
    pairs = [float(a @ b) for a, b in itertools.permutations(rows, 2)]
    return sum(pairs) / len(pairs)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 9),
    d=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_mean_pairwise_cosine_matches_the_pairwise_loop(
    n: int, d: int, seed: int, dtype: torch.dtype
) -> None:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    assert health.mean_pairwise_cosine(x) == pytest.approx(_reference_cosine(x), abs=1e-9)


def test_identical_features_have_cosine_one() -> None:
    assert health.mean_pairwise_cosine(torch.ones(5, 3) * 7) == pytest.approx(1.0)


def test_probe_steps_are_evenly_spread_and_include_the_last() -> None:
    assert health.probe_steps(60) == {12, 24, 36, 48, 60}
    assert health.probe_steps(2) == {1, 2}


def _lrs(task_doc: dict, steps: int) -> list[float]:
    task = parse_task(task_doc, Path("/"), "t")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = schedule(opt, task, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_linearly_then_decays_as_named(kind: str) -> None:
    doc = topic_task("s", "/m", "/d", steps=20)
    doc["optim"] |= {"schedule": kind, "warmup": 0.2}
    lrs = _lrs(doc, 20)
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # 4 warmup steps reach 1 at step 5
    assert lrs[4] == pytest.approx(1.0)
    tail = lrs[4:]
    if kind == "constant":
        assert tail == pytest.approx([1.0] * 16)
    else:
        assert all(a >= b for a, b in itertools.pairwise(tail)) and tail[-1] < 0.1
        middle = 0.5 if kind == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5))
        assert lrs[12] == pytest.approx(middle)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bert/ and data/t1_*.jsonl: the tiny topic task of test_train."""
    root = tmp_path_factory.mktemp("health")
    save_bert(root / "bert", [w for task in TOPICS.values() for words in task for w in words])
    write_topic_data(root / "data", "t1")
    return root


@pytest.fixture
def absurd(ws: Path) -> dict:
    """A task with lr 10: finite losses, collapsed features (the tiny topic task is so easy
    that it still learns at lr 1)."""
    return topic_task("absurd", str(ws / "bert"), str(ws / "data" / "t1"), steps=24, lr=10.0)


def test_an_absurd_learning_rate_warns_with_the_step_and_figure(
    absurd: dict, tmp_path: Path
) -> None:
    Store.init(tmp_path)
    write_yaml(tmp_path / "absurd.yaml", absurd)
    rc, _, err = run_adb(["train", "absurd.yaml"], tmp_path)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: task absurd:")]
    assert warnings, err
    assert any(" step " in w and "optim.lr (now 10)" in w for w in warnings), warnings
    expert = Store.find(tmp_path).refs.read("refs/experts/main/absurd")
    stats = Store.find(tmp_path).read_commit(expert).stats["health"]
    assert stats["flags"] and stats["uniform_loss"] == pytest.approx(LN4)


def test_on_collapse_stop_exits_nonzero_and_commits_nothing(absurd: dict, tmp_path: Path) -> None:
    Store.init(tmp_path)
    absurd["optim"]["on_collapse"] = "stop"
    write_yaml(tmp_path / "absurd.yaml", absurd)
    before = snapshot(tmp_path / STORE_DIR)
    rc, _, err = run_adb(["train", "absurd.yaml"], tmp_path)
    line = one_error_line(rc, err)
    assert "task absurd:" in line and "optim.on_collapse: stop" in line
    assert snapshot(tmp_path / STORE_DIR) == before


def test_adb_train_refuses_a_list_of_learning_rates(ws: Path, tmp_path: Path) -> None:
    Store.init(tmp_path)
    doc = topic_task("cands", str(ws / "bert"), str(ws / "data" / "t1"), lr=[1e-3, 3e-3])
    write_yaml(tmp_path / "cands.yaml", doc)
    before = snapshot(tmp_path / STORE_DIR)
    line = one_error_line(*run_adb(["train", "cands.yaml"], tmp_path)[::2])
    assert "optim.lr lists candidates" in line and "adb run" in line
    assert snapshot(tmp_path / STORE_DIR) == before
