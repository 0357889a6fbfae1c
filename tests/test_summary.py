"""The tables `adb run` and `adb report` share (trainers/summary.py), on hand-made matrices."""

from __future__ import annotations

import pytest

from adapterdb.stats import t_critical
from adapterdb.trainers.evaluate import Matrix
from adapterdb.trainers.summary import (
    baseline,
    differences,
    differences_table,
    results_table,
    summary_json,
)


def matrix(first: float, last: float) -> Matrix:
    """Two tasks: R[0][0] = first; after step 2 both tasks are at `last`.
    ACC = last, BWT = last − first."""
    return Matrix(["a", "b"], [[first, 0.5], [last, last]], [first, first], [0.5, 0.5], ["x", "y"])


RUNS = {
    "pam": {"0": matrix(0.9, 0.80), "1": matrix(0.9, 0.70), "2": matrix(0.9, 0.75)},
    "average": {"0": matrix(0.9, 0.78), "1": matrix(0.9, 0.66), "2": matrix(0.9, 0.76)},
    "finetune": {"0": matrix(0.9, 0.60), "2": matrix(0.9, 0.50)},
}


def test_baseline_is_average_else_finetune_else_the_first_method() -> None:
    assert baseline(["pam", "finetune", "average"]) == "average"
    assert baseline(["pam", "finetune"]) == "finetune"
    assert baseline(["pam", "ties"]) == "pam"
    assert baseline(["pam"]) is None


def test_differences_pair_methods_order_by_order_on_shared_orders() -> None:
    diffs = differences(RUNS)
    assert set(diffs) == {"pam", "finetune"}
    pam = diffs["pam"]["ACC"]
    assert pam is not None and pam.diffs == pytest.approx((0.02, 0.04, -0.01))
    assert pam.positive == 2
    assert pam.interval.mean == pytest.approx(0.05 / 3)
    # finetune ran orders 0 and 2 only: it pairs with average's 0 and 2
    ft = diffs["finetune"]["BWT"]
    assert ft is not None and ft.diffs == pytest.approx((-0.18, -0.26))


def test_summary_json_keys_and_values() -> None:
    doc = summary_json(RUNS)
    assert doc["baseline"] == "average"
    acc = doc["intervals"]["pam"]["ACC"]
    assert acc["mean"] == pytest.approx(0.75) and acc["n"] == 3
    # sample sd of (0.80, 0.70, 0.75) is 0.05
    assert acc["half_width"] == pytest.approx(t_critical(2) * 0.05 / 3**0.5)
    assert doc["intervals"]["pam"]["FWT"]["mean"] == pytest.approx(0.0)  # R[0][1] − zero-shot
    ft = doc["differences"]["finetune"]["ACC"]
    assert ft["orders"] == ["0", "2"] and ft["per_order"] == pytest.approx([-0.18, -0.26])
    assert ft["positive"] == 0 and ft["mean"] == pytest.approx(-0.22)
    assert ft["low"] < 0 < ft["high"]  # two orders: t_1 = 12.7 leaves zero inside
    assert "average" not in doc["differences"]


def test_results_table_cells() -> None:
    header, rows = results_table(RUNS, {"a": 0.5, "b": 0.7}, {"a": 0.9, "b": 0.95}, ["ACC", "A_t"])
    assert header == ["method", "orders", "ACC", "A_t", "flagged steps"]
    by_name = {r[0]: r for r in rows}
    half = 100 * t_critical(2) * 0.05 / 3**0.5
    assert by_name["pam"] == ["pam", "3", f"75.0 ± {half:.1f}", "90.0 ± 0.0", "0"]
    assert by_name["zero-shot (base)"] == ["zero-shot (base)", "", "60.0", "", ""]
    assert by_name["independent experts"] == ["independent experts", "", "92.5", "92.5", ""]


def test_one_order_shows_the_mean_alone() -> None:
    one = {"pam": {"0": matrix(0.9, 0.8)}, "average": {"0": matrix(0.9, 0.7)}}
    _, rows = results_table(one, {}, {}, ["ACC"])
    assert rows[0] == ["pam", "1", "80.0", "0"]
    assert rows[2] == ["zero-shot (base)", "", "-", ""]
    table = differences_table(one)
    assert table is not None
    header, diff_rows = table
    assert header == ["method", "ACC − average", "ACC > average", "BWT − average", "BWT > average"]
    assert diff_rows == [["pam", "+10.0", "1/1", "+10.0", "1/1"]]


def test_differences_table_shows_interval_and_count() -> None:
    table = differences_table(RUNS)
    assert table is not None
    rows = {r[0]: r for r in table[1]}
    p = differences(RUNS)["pam"]["ACC"]
    assert p is not None and p.interval.low is not None and p.interval.high is not None
    lo, hi = 100 * p.interval.low, 100 * p.interval.high
    assert rows["pam"][1:3] == [f"+1.7 [{lo:+.1f}, {hi:+.1f}]", "2/3"]
    assert differences_table({"pam": RUNS["pam"]}) is None


def test_steps_whose_expert_failed_a_health_check_are_counted_and_listed() -> None:
    sick = matrix(0.9, 0.5)
    sick.flags = [[], ["loss_at_uniform", "at_chance"]]
    runs = {"pam": {"0": matrix(0.9, 0.8), "1": sick}, "average": {"0": matrix(0.9, 0.7)}}
    _, rows = results_table(runs, {}, {}, ["ACC"])
    assert rows[0][-1] == "1" and rows[1][-1] == "0"
    assert summary_json(runs)["flagged"] == {
        "pam": [{"order": "1", "step": 2, "task": "b", "checks": ["loss_at_uniform", "at_chance"]}],
        "average": [],
    }
