"""Merge outputs are checked before they are written or committed (issue 12, item 4).

Before: `task_arithmetic -p lambda=inf`, `-p weights=nan,1` and `magmax -p lambda=1e39`
committed NaN/inf tensors with exit 0 (though `import` refuses them), `lambda=3e38
weights=10,10` died in a torch traceback, `--space product --rank 1000` on 32×32 layers wrote
rank-1000 factors (31x the dense layer), `--rank 0` silently meant "default", and merging a
branch into itself recorded the same parent twice. Now parameters are refused up front, every
merged tensor is checked (finite, shaped like its sources) before it is yielded, the rank is
capped at a layer's full rank, and parents are recorded once.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_peft, one_error_line, peft_config, snapshot, to_raw
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import adb_in_process

from adapterdb.adapter import WEIGHTS_FILE, read_peft_raw, to_torch, write_peft_raw
from adapterdb.errors import AdbError
from adapterdb.merging import merge_adapters, methods, registry
from adapterdb.merging.layers import LAYER_METHODS  # whole layers: test_continual_workflow
from adapterdb.storage.store import STORE_DIR, Store

BIG = "base_model.model.lin.lora_A.weight"


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folders a, b (tiny LoRA), huge (finite values of 1e30), w32a/w32b (one 32×32 layer,
    rank 2), and repo/ whose main holds an import of a."""
    root = tmp_path_factory.mktemp("safety")
    make_peft(root / "a", 1)
    make_peft(root / "b", 2)
    for name, seed in (("w32a", 3), ("w32b", 4)):
        make_peft(root / name, seed, linear=(("lin", 32, 32),), conv=())
    _, raw, _ = read_peft_raw(root / "a")
    tensors = {n: to_raw(np.full(r.shape, 1e30), "F32") for n, r in raw.items()}
    write_peft_raw(root / "huge", peft_config(), tensors)
    (root / "repo").mkdir()
    for args in (["init"], ["import", "../a", "--task", "ta"], ["import", "../huge", "-b", "h"]):
        rc, _, err = adb_in_process(args, root / "repo")
        assert rc == 0, err
    return root


NON_FINITE = [
    ("task_arithmetic", "lambda=inf", "lambda=inf is not a finite number"),
    ("task_arithmetic", "weights=nan,1", "weights=nan is not a finite number"),
    ("magmax", "lambda=1e39", "lambda=1e+39 is beyond float32's range"),
    ("ties", "lambda=-inf", "not a finite number"),
    ("dare", "density=nan", "not a finite number"),
    ("tall", "mask_lambda=nan", "not a finite number"),
    ("average", "weights=inf,1", "not a finite number"),
    ("task_arithmetic", "lambda=10 weights=1e38,1e38", "beyond float32's range"),  # λ·w
]


@pytest.mark.parametrize("target", ["-o", "--into"])
@pytest.mark.parametrize(("method", "param", "fragment"), NON_FINITE)
def test_non_finite_parameters_are_refused_up_front(
    ws: Path, tmp_path: Path, method: str, param: str, fragment: str, target: str
) -> None:
    flags = [f for p in param.split() for f in ("-p", p)]
    # two sources either way: a and b, or main's head and b
    where = ["-o", str(tmp_path / "out"), "../a"] if target == "-o" else ["--into", "main"]
    before = snapshot(ws / "repo" / STORE_DIR)
    args = ["merge", "--method", method, *flags, *where, "../b"]
    rc, _, err = adb_in_process(args, ws / "repo")
    assert fragment in one_error_line(rc, err)
    assert snapshot(ws / "repo" / STORE_DIR) == before
    assert not (tmp_path / "out").exists()


def test_overflowing_results_are_refused_not_committed(ws: Path, tmp_path: Path) -> None:
    """Parameters that pass on their own but overflow on these sources (1e30 x λ=1e9): the
    first non-finite tensor stops the merge, the branch does not move, fsck stays clean."""
    repo = ws / "repo"
    store = Store.open(repo)
    head = store.refs.read("refs/heads/h")
    rc, _, err = adb_in_process(
        ["merge", "--method", "task_arithmetic", "-p", "lambda=1e9", "--into", "h", "../huge"],
        repo,
    )
    assert "non-finite value" in one_error_line(rc, err)
    assert store.refs.read("refs/heads/h") == head
    rc, _, err = adb_in_process(["fsck"], repo)
    assert rc == 0, err
    rc, _, err = adb_in_process(
        ["merge", "--method", "magmax", "-p", "lambda=1e9", "../huge", "-o", str(tmp_path / "x")],
        repo,
    )
    assert "non-finite value" in one_error_line(rc, err)
    assert not (tmp_path / "x").exists()


def test_torch_overflow_of_the_combined_scale_is_one_line(ws: Path, tmp_path: Path) -> None:
    """λ·w = 3e39 made torch raise 'value cannot be converted to type float' (a traceback)."""
    args = ["merge", "--method", "task_arithmetic", "-p", "lambda=3e38", "-p", "weights=10,10"]
    rc, _, err = adb_in_process([*args, "../a", "../b", "-o", str(tmp_path / "o")], ws / "repo")
    assert "beyond float32's range" in one_error_line(rc, err)


def test_check_result_refuses_non_finite_and_misshapen_tensors() -> None:
    like = registry.Layout(torch.float32, torch.Size([2, 3]))
    assert registry.check_result("x", torch.ones(2, 3), like) is not None
    with pytest.raises(AdbError, match="1 non-finite value"):
        registry.check_result("x", torch.tensor([[1.0, math.nan, 0], [0, 0, 0]]), like)
    with pytest.raises(AdbError, match="came out"):
        registry.check_result("x", torch.ones(3, 2), like)
    big = torch.full((2, 3), 3e38)  # finite, but its float32 sum overflows: checked exactly
    assert registry.check_result("x", big, like) is big


FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e39, -1e39, 3.4e38, 1e-45, 0.0, -0.0]),
)


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from([m for m in methods() if m not in LAYER_METHODS]),
    lam=FLOATS,
    w0=FLOATS,
    density=FLOATS,
    scale=st.sampled_from([1.0, 1e20, 1e37]),
)
def test_any_parameters_give_a_refusal_or_a_finite_merge(
    method: str, lam: float, w0: float, density: float, scale: float
) -> None:
    """Whatever the numbers, the answer is an AdbError or finite tensors of the right shape:
    never NaN/inf, never another exception."""
    fields = {f for f in registry.get(method).params.__dataclass_fields__}
    values = {"lam": lam, "weights": (w0, 1.0), "density": density, "mask_lambda": lam}
    kwargs = {k: v for k, v in values.items() if k in fields}
    gen = torch.Generator().manual_seed(0)
    sources = [{"m.lora_A.weight": torch.randn(4, 6, generator=gen) * scale} for _ in range(2)]
    try:
        p = registry.get(method).params(**kwargs)
        merged = dict(merge_adapters(method, sources, p))
    except AdbError as exc:
        assert "\n" not in str(exc)
        return
    out = merged["m.lora_A.weight"]
    assert out.shape == (4, 6) and bool(torch.isfinite(out).all())


ABSURD = [
    ("ties", "density=-0.5", "must be in (0, 1]"),
    ("ties", "density=1.5", "must be in (0, 1]"),
    ("dare", "density=0", "must be in (0, 1]"),
    ("tall", "k=0", "k=0 must be >= 1"),
    ("tall", "mask_lambda=-1", "must be >= 0"),
    ("average", "step=0", "must be >= 1"),
    ("average", "weights=-1,1", "must be non-negative"),
    ("ties", "lamda=1", "bad parameter 'lamda=1'"),
    ("magmax", "weights=1,1", "bad parameter 'weights=1,1'"),
    ("ties", "elect=mean", "not one of"),
]


@pytest.mark.parametrize(("method", "param", "fragment"), ABSURD)
def test_absurd_method_parameters_are_one_line(
    ws: Path, tmp_path: Path, method: str, param: str, fragment: str
) -> None:
    args = ["merge", "--method", method, "-p", param, "../a", "../b", "-o", str(tmp_path / "o")]
    rc, _, err = adb_in_process(args, ws / "repo")
    assert fragment in one_error_line(rc, err)


def test_wrong_number_of_weights_is_refused_before_any_tensor(ws: Path) -> None:
    before = snapshot(ws / "repo" / STORE_DIR)
    rc, _, err = adb_in_process(
        ["merge", "--method", "ties", "-p", "weights=1,2,3", "--into", "main", "../b"], ws / "repo"
    )
    assert "weights has 3 values for 2 sources" in one_error_line(rc, err)
    assert snapshot(ws / "repo" / STORE_DIR) == before


def test_product_rank_is_capped_at_the_full_rank(ws: Path, tmp_path: Path) -> None:
    """--rank 1000 on a 32×32 layer: factors of rank 32 (not 1000), still exact."""
    rc, _, err = adb_in_process(
        ["merge", "--method", "average", "--space", "product", "--rank", "1000",
         str(ws / "w32a"), str(ws / "w32b"), "-o", str(tmp_path / "p")], tmp_path,
    )  # fmt: skip
    assert rc == 0, err
    assert "rank 1000 exceeds the full rank min(out, in) of 1 layer(s) (e.g. lin: 32)" in err
    _, raw, _ = read_peft_raw(tmp_path / "p")
    assert raw["base_model.model.lin.lora_A.weight"].shape == (32, 32)
    assert raw["base_model.model.lin.lora_B.weight"].shape == (32, 32)
    assert (tmp_path / "p" / WEIGHTS_FILE).stat().st_size < 3 * 32 * 32 * 4


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--space", "product", "--rank", "0"], "--rank 0: a LoRA rank must be >= 1"),
        (["--space", "product", "--rank", "-3"], "--rank -3: a LoRA rank must be >= 1"),
        (["--rank", "4"], "--rank only applies to --space product"),
        (["--space", "sideways"], "unknown space 'sideways'"),
    ],
)
def test_bad_ranks_and_spaces_are_refused(
    ws: Path, tmp_path: Path, flags: list[str], fragment: str
) -> None:
    before = snapshot(ws / "repo" / STORE_DIR)
    for where in (["-o", str(tmp_path / "o")], ["--into", "main"]):
        rc, _, err = adb_in_process(
            ["merge", "--method", "average", *flags, "../a", "../b", *where], ws / "repo"
        )
        assert fragment in one_error_line(rc, err)
    assert snapshot(ws / "repo" / STORE_DIR) == before and not (tmp_path / "o").exists()


def test_merging_a_branch_into_itself_records_each_parent_once(ws: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init"], ["import", str(ws / "a"), "--task", "ta"]):
        rc, _, err = adb_in_process(args, repo)
        assert rc == 0, err
    store = Store.open(repo)
    head = store.resolve("main")
    rc, _, err = adb_in_process(["merge", "--method", "average", "--into", "main", "main"], repo)
    assert rc == 0, err
    assert store.read_commit(store.resolve("main")).parents == (head,)
    expert = store.resolve("main")
    rc, _, err = adb_in_process(
        ["merge", "--method", "ties", "--into", "main", expert, expert], repo
    )
    assert rc == 0, err
    assert store.read_commit(store.resolve("main")).parents == (expert,)
    merged = store.read_manifest(store.read_commit(store.resolve("main")).manifest)
    assert all(bool(torch.isfinite(to_torch(store.objects.get_tensor(e.id))).all())
               for e in merged.tensors.values())  # fmt: skip
