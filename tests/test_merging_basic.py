"""average, finetune, task_arithmetic and the chunked evaluation under them."""

from __future__ import annotations

import merge_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from adapterdb.errors import AdbError, MismatchError
from adapterdb.lora import delta_weight
from adapterdb.merging.basic import (
    AverageParams,
    NoParams,
    WeightedParams,
    average,
    finetune,
    task_arithmetic,
    weighted_sum,
)
from adapterdb.merging.registry import Context

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
WEIGHTS = st.one_of(  # unequal, or all equal
    st.lists(st.floats(0.1, 4.0), min_size=6, max_size=6),
    st.floats(0.1, 4.0).map(lambda w: [w] * 6),
)


@SETTINGS
@given(ref.sources(), WEIGHTS, ref.CHUNKS)
def test_average_matches_reference(
    xs: list[torch.Tensor], w: list[float], chunk: int | None
) -> None:
    w = w[: len(xs)]
    with ref.chunk_bytes(chunk):
        out = average(xs, AverageParams(weights=tuple(w)))
    ref.assert_matches(out, ref.average(xs, w), xs)


@SETTINGS
@given(ref.sources(2, 2))
def test_equal_average_of_two_is_pams_merge(xs: list[torch.Tensor]) -> None:
    out = average(xs, AverageParams())
    ref.assert_matches(out, (xs[0].double() + xs[1].double()) / 2, xs)


@SETTINGS
@given(ref.sources(2, 6))
def test_running_average_over_a_sequence_is_the_plain_mean(xs: list[torch.Tensor]) -> None:
    """Continual use: merging task t into the running mean with weight 1/t gives mean(1..t)."""
    xs32 = [x.float() for x in xs]  # stay in float32 so rounding does not compound per step
    merged = xs32[0]
    for step, new in enumerate(xs32[1:], start=2):
        merged = average([merged, new], AverageParams(running=True, step=step))
    ref.assert_matches(merged, ref.average(xs32, [1.0] * len(xs)), xs32)


def test_running_step_weights_old_and_new() -> None:
    old, new = torch.full((3,), 9.0), torch.full((3,), 1.0)
    third = average([old, new], AverageParams(running=True, step=3))
    torch.testing.assert_close(third, torch.full((3,), 9 * 2 / 3 + 1 / 3))
    assert torch.equal(average([old, new], AverageParams(running=True, step=1)), new)


@SETTINGS
@given(
    ref.sources(),
    st.lists(st.floats(-3.0, 3.0), min_size=6, max_size=6),
    st.floats(-2, 2),
    ref.CHUNKS,
)
def test_task_arithmetic_matches_reference(
    xs: list[torch.Tensor], w: list[float], lam: float, chunk: int | None
) -> None:
    w = w[: len(xs)]
    with ref.chunk_bytes(chunk):
        out = task_arithmetic(xs, WeightedParams(weights=tuple(w), lam=lam))
    ref.assert_matches(out, ref.weighted_sum(xs, [lam * v for v in w]), xs)


@SETTINGS
@given(ref.sources(1, 6), WEIGHTS)
def test_task_arithmetic_equals_peft(xs: list[torch.Tensor], w: list[float]) -> None:
    xs = [x.float() for x in xs]
    weights = torch.tensor(w[: len(xs)])
    out = task_arithmetic(xs, WeightedParams(weights=tuple(weights.tolist())))
    torch.testing.assert_close(out, merge_utils.task_arithmetic(xs, weights), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(ref.sources())
def test_finetune_is_a_copy_of_the_last_source(xs: list[torch.Tensor]) -> None:
    out = finetune(xs, NoParams())
    assert torch.equal(out, xs[-1]) and out.dtype == xs[-1].dtype
    assert out.numel() == 0 or out.data_ptr() != xs[-1].data_ptr()


@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_weighted_sum_writes_into_a_preallocated_output(dtype: torch.dtype) -> None:
    xs = ref.make_sources((5, 7), 2, dtype, "gauss", 1)
    out = torch.empty_like(xs[0])
    assert weighted_sum(xs, torch.tensor([0.25, 0.75]), out=out) is out
    ref.assert_matches(out, ref.weighted_sum(xs, [0.25, 0.75]), xs)


@pytest.mark.parametrize("conv", [False, True])
def test_merged_lora_factors_give_the_reference_delta_weight(conv: bool) -> None:
    """Factor-space average of LoRA pairs, checked on ΔW = B·A·s."""
    a_shape, b_shape = ((4, 3, 3, 3), (6, 4, 1, 1)) if conv else ((4, 10), (8, 4))
    a_s = ref.make_sources(a_shape, 3, torch.float32, "gauss", 3)
    b_s = ref.make_sources(b_shape, 3, torch.float32, "gauss", 4)
    p = AverageParams(weights=(1.0, 2.0, 3.0))
    merged = delta_weight(average(a_s, p), average(b_s, p), 2.0)
    expected = delta_weight(ref.average(a_s, [1, 2, 3]), ref.average(b_s, [1, 2, 3]), 2.0)
    torch.testing.assert_close(merged, expected.float(), rtol=1e-5, atol=1e-5)


def test_average_errors() -> None:
    xs = ref.make_sources((3,), 3, torch.float32, "gauss", 0)
    with pytest.raises(MismatchError, match="running average of tensor 'w' needs 2 sources"):
        average(xs, AverageParams(running=True), Context("w"))
    with pytest.raises(MismatchError, match="weights has 2 values but tensor 'w' has 3 sources"):
        average(xs, AverageParams(weights=(1.0, 1.0)), Context("w"))
    with pytest.raises(AdbError, match="sum to 0"):
        average(xs, AverageParams(weights=(0.0, 0.0, 0.0)))
    with pytest.raises(AdbError, match="non-negative"):
        AverageParams(weights=(1.0, -1.0))
    with pytest.raises(AdbError, match="running=true sets the weights"):
        AverageParams(running=True, weights=(1.0, 1.0))
    with pytest.raises(MismatchError, match=r"tensor 'w' of source 1 is torch\.bfloat16"):
        average([xs[0], xs[1].bfloat16()], AverageParams(), Context("w"))
