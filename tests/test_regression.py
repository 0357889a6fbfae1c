"""The demo's numbers, in small: a short continual run on the real stack (packaged
EfficientNet-Lite0 on Fashion-MNIST, the bundled sequence's settings, two tasks, two methods,
a few steps, fixed seed) must reproduce the accuracy matrices recorded in
tests/data/regression.json. This is what catches a dependency or code change that silently
moves `make demo`'s table (the lock file pins the versions; this proves they still give the
same answers). After an intended change, re-record with `python tests/test_regression.py`
and say why in the commit.

Tolerance: 1.5 points per entry, i.e. 3 of the 200 eval examples. Runs are deterministic on
one machine (one torch thread, seeded); the slack is for other CPUs' float rounding, while the
drift that motivated this check moved accuracies by 10–45 points.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from adapterdb.storage.store import Store
from adapterdb.trainers.config import load_sequence
from adapterdb.trainers.sequence import run_sequence

HERE = Path(__file__).parent / "data"
RECORDED = HERE / "regression.json"
METHODS = ("finetune", "average")
TOLERANCE = 0.015


def matrices(store_dir: Path) -> dict[str, list[list[float | None]]]:
    """method -> R of the regression sequence, run in a fresh store at `store_dir`."""
    store = Store.init(store_dir)
    seq = load_sequence(HERE / "regression.yaml")
    result = run_sequence(store, seq, METHODS, say=lambda _msg: None)
    out = {m: mats[0].R for m, mats in result.matrices.items()}
    out["independent"] = [[result.independent[t.name] for t in seq.tasks]]
    return out


@pytest.mark.slow
def test_short_continual_run_reproduces_the_recorded_matrices(tmp_path: Path) -> None:
    recorded = json.loads(RECORDED.read_text())
    got = matrices(tmp_path)
    assert sorted(got) == sorted(recorded)
    for name, rows in recorded.items():
        for t, row in enumerate(rows):
            for i, want in enumerate(row):
                have = got[name][t][i]
                assert (have is None) == (want is None), (name, t, i)
                if want is not None:
                    assert abs(have - want) <= TOLERANCE, (
                        f"{name} R[{t}][{i}] = {have:.4f}, recorded {want:.4f}: the demo's "
                        "numbers have moved (dependencies or code); see this module's docstring"
                    )


if __name__ == "__main__":  # re-record after an intended change
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        RECORDED.write_text(json.dumps(matrices(Path(tmp)), indent=1) + "\n")
    print(f"recorded {RECORDED}", file=sys.stderr)
