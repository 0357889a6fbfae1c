"""CL metrics on hand-computed matrices and against a loop reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.errors import AdbError
from adapterdb.metrics import cl_metrics

# R[t][i]: accuracy on task i after step t
R3 = [
    [0.80, 0.30, 0.20],
    [0.60, 0.90, 0.25],
    [0.50, 0.70, 0.85],
]


def test_hand_computed_three_tasks() -> None:
    m = cl_metrics(R3, zero_shot=[0.1, 0.2, 0.15], trained=[0.82, 0.95, 0.88])
    assert m["ACC"] == pytest.approx((0.50 + 0.70 + 0.85) / 3)
    assert m["BWT"] == pytest.approx(((0.50 - 0.80) + (0.70 - 0.90)) / 2)
    assert m["FWT"] == pytest.approx(((0.30 - 0.2) + (0.25 - 0.15)) / 2)
    assert m["A_t"] == pytest.approx((0.82 + 0.95 + 0.88) / 3)
    assert m["A_m"] == pytest.approx((0.80 + 0.90 + 0.85) / 3)
    # task 0: best of steps 0..1 is 0.80; task 1: best of step 1 is 0.90
    assert m["forgetting"] == pytest.approx(((0.80 - 0.50) + (0.90 - 0.70)) / 2)


def test_forgetting_ignores_steps_before_the_task_was_learned() -> None:
    r = [[0.5, 0.95], [0.6, 0.7]]  # task 1 scored 0.95 before being trained (step 0)
    m = cl_metrics(r)
    assert m["forgetting"] == pytest.approx(0.5 - 0.6)  # only task 0 counts; max_{0<=k<1}
    assert m["BWT"] == pytest.approx(0.6 - 0.5)


def test_single_task() -> None:
    m = cl_metrics([[0.7]], zero_shot=[0.2], trained=[0.75])
    assert m == {"ACC": 0.7, "BWT": None, "FWT": None, "A_t": 0.75, "A_m": 0.7, "forgetting": None}


def test_missing_entries_make_only_their_metrics_none() -> None:
    lower = [[0.8], [0.6, 0.9], [0.5, 0.7, 0.85]]  # unseen tasks never evaluated
    m = cl_metrics(lower, zero_shot=[0.1, 0.2, 0.15])
    assert m["FWT"] is None and m["A_t"] is None
    assert m["ACC"] == pytest.approx(cl_metrics(R3)["ACC"])
    assert m["BWT"] == pytest.approx(cl_metrics(R3)["BWT"])
    assert m["forgetting"] == pytest.approx(cl_metrics(R3)["forgetting"])
    holes = [[0.8, None, 0.2], [0.6, 0.9, 0.25], [0.5, 0.7, None]]
    m = cl_metrics(holes, zero_shot=[0.1, 0.2, 0.15], trained=[0.82, None, 0.88])
    assert m["ACC"] is None and m["A_m"] is None and m["A_t"] is None
    assert m["FWT"] is None  # R[0][1] is missing
    assert m["BWT"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert cl_metrics([]) == dict.fromkeys(["ACC", "BWT", "FWT", "A_t", "A_m", "forgetting"])


def test_bad_shapes() -> None:
    with pytest.raises(AdbError, match="zero_shot"):
        cl_metrics(R3, zero_shot=[0.1])
    with pytest.raises(AdbError, match="trained"):
        cl_metrics(R3, trained=[0.1, 0.2])
    with pytest.raises(AdbError, match="row 0"):
        cl_metrics([[0.1, 0.2]])


def reference(r: list[list[float]], zs: list[float], tr: list[float]) -> dict[str, float | None]:
    """Straight loops over the definitions, square matrices, no missing entries."""
    n = len(r)
    out: dict[str, float] = {
        "ACC": 0.0,
        "A_m": 0.0,
        "A_t": 0.0,
        "BWT": 0.0,
        "FWT": 0.0,
        "forgetting": 0.0,
    }
    for i in range(n):
        out["ACC"] += r[n - 1][i] / n
        out["A_m"] += r[i][i] / n
        out["A_t"] += tr[i] / n
    for i in range(n - 1):
        out["BWT"] += (r[n - 1][i] - r[i][i]) / (n - 1)
        best = r[i][i]
        for k in range(i, n - 1):
            best = max(best, r[k][i])
        out["forgetting"] += (best - r[n - 1][i]) / (n - 1)
    for i in range(1, n):
        out["FWT"] += (r[i - 1][i] - zs[i]) / (n - 1)
    result: dict[str, float | None] = dict(out)
    if n == 1:
        result.update(BWT=None, FWT=None, forgetting=None)
    return result


acc = st.floats(0, 1, allow_nan=False)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.integers(1, 7).flatmap(
        lambda n: st.tuples(
            st.lists(st.lists(acc, min_size=n, max_size=n), min_size=n, max_size=n),
            st.lists(acc, min_size=n, max_size=n),
            st.lists(acc, min_size=n, max_size=n),
        )
    )
)
def test_matches_loop_reference(data: tuple[list[list[float]], list[float], list[float]]) -> None:
    r, zs, tr = data
    got, want = cl_metrics(r, zs, tr), reference(r, zs, tr)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == (None if value is None else pytest.approx(value, abs=1e-12)), key
