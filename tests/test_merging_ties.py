"""TIES: trim (global or per tensor), elect, disjoint merge; against the loop reference and PEFT."""

from __future__ import annotations

from typing import Literal

import merge_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from adapterdb.lora import delta_weight
from adapterdb.merging import merge_adapters
from adapterdb.merging.ties import Elect, TiesParams, ties

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
DENSITY = st.sampled_from([0.05, 0.2, 0.5, 0.73, 1.0])
WEIGHTS = st.one_of(  # unequal, or all equal (the merge scales a plain sum once)
    st.lists(st.floats(0.25, 3.0), min_size=6, max_size=6),
    st.floats(0.25, 3.0).map(lambda w: [w] * 6),
)


@SETTINGS
@given(ref.sources(), DENSITY, WEIGHTS, st.sampled_from(["sum", "count"]), ref.CHUNKS)
def test_per_tensor_trim_matches_reference(
    xs: list[torch.Tensor], density: float, w: list[float], elect: Elect, chunk: int | None
) -> None:
    w = w[: len(xs)]
    p = TiesParams(density=density, weights=tuple(w), lam=0.7, elect=elect, trim="tensor")
    with ref.chunk_bytes(chunk):
        out = ties(xs, p)
    ref.assert_matches(out, ref.ties(xs, density, w, 0.7, elect), xs)


@SETTINGS
@given(
    st.integers(1, 5),
    st.sampled_from(ref.DTYPES),
    st.sampled_from(["gauss", "int"]),
    DENSITY,
    st.integers(0, 999),
)
def test_global_trim_uses_one_threshold_per_whole_source(
    count: int, dtype: torch.dtype, kind: str, density: float, seed: int
) -> None:
    """merge_adapters' first pass: a source's threshold is its k-th largest |x| over ALL its
    tensors, so a tensor's result depends on the others (unlike trim="tensor")."""
    shapes = {"a": (4, 9), "b": (3, 2, 3, 3), "c": (17,)}
    per_name = {
        n: ref.make_sources(s, count, dtype, kind, seed + i)
        for i, (n, s) in enumerate(shapes.items())
    }
    srcs = [{n: xs[t] for n, xs in per_name.items()} for t in range(count)]
    taus = [
        ref.threshold([v for x in ref.flat(list(s.values())) for v in x], density) for s in srcs
    ]
    out = dict(merge_adapters("ties", srcs, TiesParams(density=density)))
    for name, xs in per_name.items():
        ref.assert_matches(out[name], ref.ties(xs, density, [1.0] * count, taus=taus), xs)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(ref.sources(), DENSITY)
def test_global_trim_of_a_lone_tensor_is_the_per_tensor_trim(
    xs: list[torch.Tensor], density: float
) -> None:
    lone = ties(xs, TiesParams(density=density))
    assert torch.equal(lone, ties(xs, TiesParams(density=density, trim="tensor")))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    st.integers(1, 6),
    st.sampled_from([(5, 20), (4, 5, 1, 1), (2, 5, 2, 5), (100,)]),
    st.sampled_from([0.1, 0.2, 0.5]),
    WEIGHTS,
    st.sampled_from([("sum", "total"), ("count", "frequency")]),
    st.integers(0, 999),
)
def test_per_tensor_trim_equals_peft(
    count: int,
    shape: tuple[int, ...],
    density: float,
    w: list[float],
    elect: tuple[Elect, Literal["total", "frequency"]],
    seed: int,
) -> None:
    """Same definitions as PEFT's `ties` (continuous data: no tied magnitudes at the threshold,
    and density·n integral so that PEFT's int(density·n) equals ceil)."""
    xs = ref.make_sources(shape, count, torch.float32, "gauss", seed)
    weights = torch.tensor(w[:count])
    ours = ties(
        xs,
        TiesParams(density=density, weights=tuple(weights.tolist()), elect=elect[0], trim="tensor"),
    )
    peft = merge_utils.ties(xs, weights, density, majority_sign_method=elect[1])
    torch.testing.assert_close(ours, peft, rtol=1e-6, atol=1e-6)


def test_all_magnitude_ties_at_the_threshold_are_kept() -> None:
    """density 0.2 of 10 -> k = 2, but four entries tie at the 2nd largest |x|: all are kept."""
    x = torch.tensor([3.0, -2.0, 2.0, 2.0, -2.0, 1.0, 0.0, 0.0, 1.0, 0.5])
    out = ties([x], TiesParams(density=0.2))
    assert out.tolist() == [3.0, -2.0, 2.0, 2.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_zero_vote_elects_plus_and_zeros_never_agree() -> None:
    a, b = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 0.0, -3.0])
    out = ties([a, b], TiesParams(density=1.0))
    assert out.tolist() == [1.0, 0.0, -3.0]


@pytest.mark.parametrize("conv", [False, True])
def test_merged_lora_factors_give_the_reference_delta_weight(conv: bool) -> None:
    a_shape, b_shape = ((4, 3, 3, 3), (6, 4, 1, 1)) if conv else ((4, 10), (8, 4))
    a_s = ref.make_sources(a_shape, 3, torch.float32, "gauss", 5)
    b_s = ref.make_sources(b_shape, 3, torch.float32, "gauss", 6)
    p = TiesParams(density=0.5, trim="tensor")
    merged = delta_weight(ties(a_s, p), ties(b_s, p), 0.5)
    expected = delta_weight(ref.ties(a_s, 0.5, [1.0] * 3), ref.ties(b_s, 0.5, [1.0] * 3), 0.5)
    torch.testing.assert_close(merged, expected.float(), rtol=1e-5, atol=1e-6)
