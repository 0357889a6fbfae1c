"""MagMax: per entry the value of largest magnitude, ties to the later task."""

from __future__ import annotations

import merge_reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.lora import delta_weight
from adapterdb.merging.magmax import ScaleParams, magmax

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@SETTINGS
@given(ref.sources(), st.sampled_from([1.0, 0.5, -2.0]), ref.CHUNKS)
def test_matches_reference(xs: list[torch.Tensor], lam: float, chunk: int | None) -> None:
    with ref.chunk_bytes(chunk):
        out = magmax(xs, ScaleParams(lam=lam))
    ref.assert_matches(out, ref.magmax(xs, lam), xs)


def test_magnitude_ties_go_to_the_later_task() -> None:
    a, b, c = (
        torch.tensor([2.0, -3.0, 1.0, 0.0]),
        torch.tensor([-2.0, 3.0, -1.0, -0.0]),
        torch.tensor([1.0, 1.0, 1.0, 0.0]),
    )
    assert magmax([a, b, c], ScaleParams()).tolist() == [-2.0, 3.0, 1.0, 0.0]
    assert magmax([b, a], ScaleParams()).tolist() == [2.0, -3.0, 1.0, 0.0]


def test_merged_lora_factors_give_the_reference_delta_weight() -> None:
    a_s = ref.make_sources((4, 10), 4, torch.bfloat16, "gauss", 1)
    b_s = ref.make_sources((8, 4), 4, torch.bfloat16, "gauss", 2)
    merged = delta_weight(magmax(a_s, ScaleParams(lam=0.5)), magmax(b_s, ScaleParams(lam=0.5)), 2.0)
    expected = delta_weight(ref.magmax(a_s, 0.5), ref.magmax(b_s, 0.5), 2.0)
    torch.testing.assert_close(merged, expected.float(), rtol=1e-5, atol=1e-5)  # selection is exact
