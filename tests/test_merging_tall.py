"""TALL masks, expert rebuild and consensus merging."""

from __future__ import annotations

import merge_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.errors import AdbError, MismatchError
from adapterdb.lora import delta_weight
from adapterdb.merging.registry import Context
from adapterdb.merging.tall import TallParams, tall, tall_experts, tall_masks

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
MASK_LAMBDA = st.sampled_from([0.0, 0.2, 0.4, 1.0, 2.0])


@SETTINGS
@given(ref.sources(), MASK_LAMBDA, ref.CHUNKS)
def test_masks_and_experts_match_reference(
    xs: list[torch.Tensor], mask_lambda: float, chunk: int | None
) -> None:
    with ref.chunk_bytes(chunk):
        mtl, masks = tall_masks(xs, mask_lambda)
    ref_mtl, ref_masks = ref.tall_masks(xs, mask_lambda)
    ref.assert_matches(mtl, ref_mtl, xs)
    assert masks.dtype == torch.bool and torch.equal(masks, ref_masks)
    experts = tall_experts(mtl, masks)
    assert torch.equal(experts, torch.stack([mtl * m for m in masks]) if len(xs) else experts)


@SETTINGS
@given(ref.sources(2, 6), MASK_LAMBDA, st.integers(1, 3), st.sampled_from([1.0, 0.5]), ref.CHUNKS)
def test_consensus_matches_reference(
    xs: list[torch.Tensor], mask_lambda: float, k: int, lam: float, chunk: int | None
) -> None:
    k = min(k, len(xs))
    with ref.chunk_bytes(chunk):
        out = tall(xs, TallParams(mask_lambda=mask_lambda, k=k, lam=lam))
    ref.assert_matches(out, ref.tall(xs, mask_lambda, k, lam), xs)


def test_mask_definition_on_a_worked_example() -> None:
    """τ_MTL = [3, 0.5]. Task 0: |2| >= λ·|1|, |0.5| >= λ·|0|; task 1: |1| >= λ·|2|,
    |0| >= λ·|0.5|."""
    a, b = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0])
    mtl, masks = tall_masks([a, b], 0.4)
    assert mtl.tolist() == [3.0, 0.5]
    assert masks.tolist() == [[True, True], [True, False]]
    _, masks = tall_masks([a, b], 0.6)
    assert masks.tolist() == [[True, True], [False, False]]
    assert tall([a, b], TallParams(mask_lambda=0.4, k=2)).tolist() == [3.0, 0.0]


def test_errors() -> None:
    xs = ref.make_sources((3,), 2, torch.float32, "gauss", 0)
    with pytest.raises(AdbError, match="k=3 needs at least 3 sources, tensor 'w' has 2"):
        tall(xs, TallParams(k=3), Context("w"))
    with pytest.raises(MismatchError, match="masks"):
        tall_experts(xs[0], torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(AdbError, match="mask_lambda"):
        TallParams(mask_lambda=-1.0)


def test_merged_lora_factors_give_the_reference_delta_weight() -> None:
    a_s = ref.make_sources((4, 3, 3, 3), 3, torch.float32, "gauss", 1)
    b_s = ref.make_sources((6, 4, 1, 1), 3, torch.float32, "gauss", 2)
    p = TallParams(mask_lambda=0.3)
    merged = delta_weight(tall(a_s, p), tall(b_s, p), 1.5)
    expected = delta_weight(ref.tall(a_s, 0.3, 2, 1.0), ref.tall(b_s, 0.3, 2, 1.0), 1.5)
    torch.testing.assert_close(merged, expected.float(), rtol=1e-5, atol=1e-5)
