"""PAM alignment against element-by-element float64 references."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.alignment import (
    AlignStats,
    align_,
    align_adapter_,
    alignment_report,
    alignment_thresholds,
    misaligned,
)
from adapterdb.errors import AdbError, MismatchError
from adapterdb.lora import delta_weight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(4, 6), (5, 4), (3, 2, 3, 3), (7, 3, 1, 1), (1,), (0, 3)]


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def ref_threshold(tensors: list[torch.Tensor], p: float) -> float:
    values = sorted((abs(v) for t in tensors for v in t.double().flatten().tolist()), reverse=True)
    k = math.ceil(Fraction(repr(p)) / 100 * len(values))
    return math.inf if k == 0 else values[k - 1]


def ref_align(w: torch.Tensor, wg: torch.Tensor, tau: float, reinit: str) -> tuple[list, list]:
    """Loop reference: (new values, [conflicts, misaligned, top_p])."""
    out, counts = [], [0, 0, 0]
    for x, g in zip(w.double().flatten().tolist(), wg.double().flatten().tolist(), strict=True):
        conflict = g != 0 and sign(x) != sign(g)
        important = g != 0 and abs(g) >= tau
        counts[0] += conflict
        counts[1] += conflict and important
        counts[2] += important
        out.append((g if reinit == "global" else 0.0) if conflict and important else x)
    return out, counts


@st.composite
def adapters(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(expert, global) with shared names/shapes, small integer grids -> ties, zeros, conflicts."""
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    names = [f"m{i}.lora_A.weight" for i in range(draw(st.integers(1, 4)))]
    shapes = [draw(st.sampled_from(SHAPES)) for _ in names]
    scale = 10.0 ** draw(st.integers(-4, 2))

    def make() -> dict[str, torch.Tensor]:
        return {
            n: (torch.randint(-3, 4, s, generator=gen) * scale).to(dtype)
            for n, s in zip(names, shapes, strict=True)
        }

    return make(), make()


@settings(max_examples=50, deadline=None, derandomize=True)
@given(adapters(), st.sampled_from([0, 10, 30, 50, 70.5, 100]), st.data())
def test_align_adapter_matches_loop_reference(pair, p: float, data: st.DataObject) -> None:
    expert, glob = pair
    scope = data.draw(st.sampled_from(["global", "tensor"]))
    reinit = data.draw(st.sampled_from(["global", "zero"]))
    thresholds = alignment_thresholds(glob, p, scope)
    for name, tau in thresholds.items():
        want = ref_threshold(list(glob.values()) if scope == "global" else [glob[name]], p)
        assert tau == want, name
    before = {n: t.clone() for n, t in expert.items()}
    report = align_adapter_(expert, glob, thresholds, reinit)
    for name, w in expert.items():
        values, counts = ref_align(before[name], glob[name], thresholds[name], reinit)
        assert w.dtype == before[name].dtype
        assert w.double().flatten().tolist() == values, name
        assert report.tensors[name] == AlignStats(w.numel(), *counts)
    total = report.total
    assert total.numel == sum(t.numel() for t in expert.values())
    assert report.reset_fraction == (total.misaligned / total.numel if total.numel else 0.0)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(adapters(), st.sampled_from([0, 25, 50, 100]))
def test_report_does_not_mutate_and_matches_check(pair, p: float) -> None:
    expert, glob = pair
    before = {n: t.clone() for n, t in expert.items()}
    report = alignment_report(expert, glob, p, "tensor")
    assert all(torch.equal(expert[n], before[n]) for n in expert)
    assert report == align_adapter_(expert, glob, alignment_thresholds(glob, p, "tensor"))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(adapters())
def test_p100_global_reinit_makes_every_sign_agree(pair) -> None:
    expert, glob = pair
    align_adapter_(expert, glob, alignment_thresholds(glob, 100))
    for name, w in expert.items():
        g = glob[name]
        assert torch.equal(torch.sign(w)[g != 0], torch.sign(g)[g != 0])
    again = align_adapter_(expert, glob, alignment_thresholds(glob, 100))
    assert again.total.misaligned == again.total.sign_conflicts == 0


def test_zero_rule() -> None:
    w = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, 0.0])
    wg = torch.tensor([1.0, -1.0, 0.0, 0.0, 3.0, 0.0])
    # zero expert vs nonzero global: conflict; zero global: never; equal signs: no conflict
    assert misaligned(w, wg, 0.0).tolist() == [True, True, False, False, False, False]
    stats = align_(w, wg, 0.0, "zero")
    assert stats == AlignStats(numel=6, sign_conflicts=2, misaligned=2, top_p=3)
    assert w.tolist() == [0.0, 0.0, 1.0, -1.0, 2.0, 0.0]  # zero reinit keeps them zero


def test_reinit_global_vs_zero() -> None:
    wg = torch.tensor([[0.5, -0.2], [0.1, -0.9]])
    w = torch.tensor([[-0.3, -0.4], [-0.05, 0.6]])
    tau = 0.5  # important: 0.5 and -0.9; conflicts: (0,0), (1,0), (1,1)
    glob, zero = w.clone(), w.clone()
    assert align_(glob, wg, tau, "global") == AlignStats(4, 3, 2, 2)
    assert align_(zero, wg, tau, "zero") == AlignStats(4, 3, 2, 2)
    assert torch.equal(glob, torch.tensor([[0.5, -0.4], [-0.05, -0.9]]))
    assert torch.equal(zero, torch.tensor([[0.0, -0.4], [-0.05, 0.0]]))


def test_scope_tensor_vs_global() -> None:
    glob = {"big": torch.tensor([4.0, 3.0, 2.0, 1.0]), "small": torch.tensor([0.4, 0.3, 0.2, 0.1])}
    assert alignment_thresholds(glob, 50, "global") == {"big": 1.0, "small": 1.0}  # k=4 of 8
    assert alignment_thresholds(glob, 50, "tensor") == {"big": 3.0, "small": pytest.approx(0.3)}
    expert = {n: -t for n, t in glob.items()}
    per_tensor = alignment_report(expert, glob, 50, "tensor")
    overall = alignment_report(expert, glob, 50, "global")
    assert per_tensor.tensors["small"].misaligned == 2
    assert overall.tensors["small"].misaligned == 0  # all of `small` is below the global τ
    assert (overall.tensors["big"].misaligned, per_tensor.tensors["big"].misaligned) == (4, 2)
    assert alignment_thresholds(glob, 0)["big"] == math.inf


def test_tau_is_exact_in_low_precision() -> None:
    wg = torch.tensor([1.0, 1.0078125], dtype=torch.bfloat16)  # adjacent bf16 values
    w = -wg
    # 1.001 rounds to 1.0 in bf16; a naive `wg >= 1.001` would select both
    assert misaligned(w, wg, 1.001).tolist() == [False, True]
    assert misaligned(w, wg, 1.0).tolist() == [True, True]


@pytest.mark.parametrize("dtype", DTYPES)
def test_live_parameters_in_place(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    wg = torch.randn(8, 4, 3, 3, generator=gen).to(dtype)
    param = torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=gen).to(dtype))
    storage = param.data_ptr()
    align_adapter_({"w": param}, {"w": wg}, {"w": 0.0})
    assert param.data_ptr() == storage and param.requires_grad and param.grad_fn is None
    assert torch.equal(torch.sign(param.detach()), torch.sign(wg))
    (param.float().sum()).backward()  # still a trainable leaf
    assert param.grad is not None


def test_fully_conflicting_lora_pair_aligns_to_global_delta() -> None:
    gen = torch.Generator().manual_seed(1)
    a_g, b_g = torch.randn(4, 6, 3, 3, generator=gen), torch.randn(5, 4, 1, 1, generator=gen)
    glob = {"m.lora_A.weight": a_g, "m.lora_B.weight": b_g}
    expert = {n: -2 * t for n, t in glob.items()}
    align_adapter_(expert, glob, alignment_thresholds(glob, 100))
    got = delta_weight(expert["m.lora_A.weight"], expert["m.lora_B.weight"], 2.0)
    assert torch.equal(got, delta_weight(a_g, b_g, 2.0))


def test_mismatches_and_bad_options() -> None:
    glob = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    with pytest.raises(MismatchError, match=r"m\.lora_B\.weight"):
        alignment_report({"m.lora_A.weight": torch.ones(2, 3)}, glob, 50)
    with pytest.raises(MismatchError, match=r"m.lora_A.weight.*\(4, 3\)"):
        alignment_report({**glob, "m.lora_A.weight": torch.ones(4, 3)}, glob, 50)
    with pytest.raises(MismatchError):
        align_(torch.ones(2), torch.ones(3), 0.0)
    with pytest.raises(AdbError, match="percent"):
        alignment_thresholds(glob, 101)
    with pytest.raises(AdbError, match="scope"):
        alignment_thresholds(glob, 50, "layer")  # type: ignore[arg-type]
    with pytest.raises(AdbError, match="reinit"):
        align_adapter_(glob, glob, {}, "random")  # type: ignore[arg-type]
