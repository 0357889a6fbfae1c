"""TSV, Iso-C, Iso-CTS and KnOTS through the CLI (trainers/continual.py's workflow): `adb merge
-o` writes the method's rank-r merge of each layer, `--into` twice on a branch gives the same
adapter as one standalone merge of the three tasks, and a bad parameter is one error line
that leaves the store unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_peft, one_error_line, snapshot
from tiny_models import adb_in_process

import adapterdb as adb
from adapterdb.merging.layers import LAYER_METHODS, Term
from adapterdb.merging.registry import parse_params

PARAMS = {
    "tsv": ["alpha=0.8"],
    "iso_c": ["alpha=1.2"],
    "iso_cts": ["common_space_fraction=0.5"],
    "knots": ["density=0.5", "lambda=0.9"],
}
LIN = "base_model.model.lin.lora_{}.weight"  # conftest's Linear LoRA: in 6, out 5, rank 2


def adb_ok(args: list[str], cwd: Path) -> str:
    rc, out, err = adb_in_process(args, cwd)
    assert rc == 0, err
    return out


def lin_delta(adapter: adb.Adapter) -> torch.Tensor:
    """ΔW of the Linear LoRA: (lora_alpha / r) · B A, float64."""
    scale = adapter.config["lora_alpha"] / adapter.config["r"]
    a, b = (adapter.tensors[LIN.format(x)].double() for x in "AB")
    return scale * b @ a


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_merge_output_and_into(tmp_path: Path, method: str) -> None:
    folders = [make_peft(tmp_path / f"t{i}", seed=i) for i in range(3)]
    params = [arg for p in PARAMS[method] for arg in ("-p", p)]
    adb_ok(["merge", "-M", method, *params, *map(str, folders), "-o", "out"], tmp_path)
    standalone = adb.load(tmp_path / "out")

    # the Linear layer is the method's merge of the three tasks, refactored to rank 2
    inputs = [adb.load(f) for f in folders]
    terms = [Term(x.tensors[LIN.format("A")], x.tensors[LIN.format("B")], 2.0) for x in inputs]
    m = LAYER_METHODS[method]
    want = m.fn(terms, parse_params(method, PARAMS[method])).truncated(2).dense()
    assert torch.allclose(lin_delta(standalone), want, atol=1e-5)

    repo = tmp_path / "repo"
    repo.mkdir()
    adb_ok(["init"], repo)
    adb_ok(["import", str(folders[0]), "--task", "a"], repo)
    for i, task in ((1, "b"), (2, "c")):
        adb_ok(["import", str(folders[i]), "--task", task, "--expert"], repo)
        adb_ok(["merge", "-M", method, *params, "--into", "main"], repo)
    head = adb.open(repo).checkout("main")
    assert head.tensors.keys() == standalone.tensors.keys()
    for name, tensor in standalone.tensors.items():
        assert torch.equal(head.tensors[name], tensor), name


def test_bad_parameter_is_one_line_and_leaves_the_store(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    adb_ok(["init"], repo)
    adb_ok(["import", str(make_peft(tmp_path / "a", seed=0)), "--task", "a"], repo)
    adb_ok(["import", str(make_peft(tmp_path / "b", seed=1)), "--task", "b", "--expert"], repo)
    before = snapshot(repo / ".adb")
    args = ["merge", "-M", "iso_cts", "-p", "common_space_fraction=2"]
    line = one_error_line(*adb_in_process(args, repo)[::2])
    assert "common_space_fraction=2.0 must be in [0, 1]" in line
    assert snapshot(repo / ".adb") == before
