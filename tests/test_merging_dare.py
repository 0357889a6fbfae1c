"""DARE and DARE-TIES: seeded drop masks, rescaling, and the merges on top."""

from __future__ import annotations

import math
import warnings

import merge_reference as ref
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from adapterdb.lora import delta_weight
from adapterdb.merging import merge_adapters
from adapterdb.merging.dare import (
    DareParams,
    DareTiesParams,
    dare,
    dare_ties,
    drop_stream,
    keep_mask,
)
from adapterdb.merging.registry import Context
from adapterdb.merging.ties import Elect

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
DENSITY = st.sampled_from([0.005, 0.1, 0.5, 0.9, 1.0])  # 0.005: 32-bit flags, others 16
WEIGHTS = st.one_of(  # unequal, or all equal (the merge scales a plain sum once)
    st.lists(st.floats(0.25, 3.0), min_size=6, max_size=6),
    st.floats(0.25, 3.0).map(lambda w: [w] * 6),
)


def masks_of(xs: list[torch.Tensor], p: DareParams, name: str) -> list[torch.Tensor]:
    return [keep_mask(p.seed, name, t, x.shape, p.density) for t, x in enumerate(xs)]


@SETTINGS
@given(
    ref.sources(),
    DENSITY,
    WEIGHTS,
    st.integers(0, 3),
    st.sampled_from([None, "sum", "count"]),
    ref.CHUNKS,
)
def test_matches_reference(
    xs: list[torch.Tensor],
    density: float,
    w: list[float],
    seed: int,
    elect: Elect | None,
    chunk: int | None,
) -> None:
    """Whatever the chunking, entry i of source t uses the i-th flag of its mask."""
    w = w[: len(xs)]
    if elect is None:
        p: DareParams = DareParams(density=density, weights=tuple(w), lam=0.8, seed=seed)
        with ref.chunk_bytes(chunk):
            out = dare(xs, p, Context("layer.0.w"))
    else:
        p = DareTiesParams(density=density, weights=tuple(w), lam=0.8, seed=seed, elect=elect)
        with ref.chunk_bytes(chunk):
            out = dare_ties(xs, p, Context("layer.0.w"))
    expected = ref.dare(xs, masks_of(xs, p, "layer.0.w"), density, w, 0.8, elect)
    ref.assert_matches(out, expected, xs)


def test_masks_depend_on_seed_name_and_source_only() -> None:
    shape = torch.Size([64, 64])
    base = keep_mask(0, "a", 0, shape, 0.5)
    assert torch.equal(base, keep_mask(0, "a", 0, shape, 0.5))
    for other in (
        keep_mask(1, "a", 0, shape, 0.5),
        keep_mask(0, "b", 0, shape, 0.5),
        keep_mask(0, "a", 1, shape, 0.5),
    ):
        assert not torch.equal(base, other)


def test_tensor_order_and_subsets_do_not_change_results() -> None:
    srcs = [{n: torch.randn(40, 7) for n in ("q", "k", "v")} for _ in range(3)]
    full = dict(merge_adapters("dare", srcs))
    reordered = dict(merge_adapters("dare", [dict(reversed(list(s.items()))) for s in srcs]))
    only_v = dict(merge_adapters("dare", [{"v": s["v"]} for s in srcs]))
    assert all(torch.equal(full[n], reordered[n]) for n in full)
    assert torch.equal(full["v"], only_v["v"])


@pytest.mark.parametrize("nbytes", [256, 4096, None])
def test_chunking_does_not_change_the_masks(nbytes: int | None) -> None:
    xs = ref.make_sources((3, 333), 3, torch.float32, "gauss", 11)
    p = DareParams(density=0.5, seed=1)
    with ref.chunk_bytes(nbytes):
        out = dare(xs, p, Context("w"))
    ref.assert_matches(out, ref.dare(xs, masks_of(xs, p, "w"), 0.5, [1.0] * 3), xs)


@pytest.mark.parametrize(("density", "bits"), [(0.1, 16), (1 / 128, 16), (0.005, 32)])
def test_mask_is_the_documented_function_of_the_stream(density: float, bits: int) -> None:
    """Pins the masks (changing them changes every DARE merge): entry i is kept iff word i of
    the (seed, name, source) SFC64 stream, read as `bits`-bit little-endian words, is below
    round(density·2^bits)."""
    n = 1001
    raw = drop_stream(5, "w", 2).random_raw(n).tobytes()
    words = np.frombuffer(raw, dtype=f"<u{bits // 8}")[:n].astype(np.int64)
    expected = torch.from_numpy(words < round(density * 2**bits))
    assert torch.equal(keep_mask(5, "w", 2, torch.Size([n]), density), expected)


@pytest.mark.parametrize("density", [0.005, 0.1, 0.5, 0.9])
def test_keep_fraction_and_rescale(density: float) -> None:
    n = 200_000
    mask = keep_mask(7, "w", 0, torch.Size([n]), density)
    assert abs(float(mask.float().mean()) - density) < 5 * math.sqrt(density * (1 - density) / n)
    x = torch.randn(n)
    out = dare([x], DareParams(density=density, seed=7), Context("w"))
    torch.testing.assert_close(out[mask], x[mask] / density)
    assert not out[~mask].any()


class PeftWithOurMasks:
    """PEFT's random_pruning, but drawing our masks in PEFT's call order (source 0, 1, ...)."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        self.masks = iter(masks)

    def __call__(self, tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        pruned = tensor * next(self.masks)
        return pruned / density if rescale else pruned


@SETTINGS
@given(st.integers(1, 6), DENSITY, WEIGHTS, st.booleans(), st.integers(0, 999))
def test_equals_peft_given_the_same_masks(
    count: int, density: float, w: list[float], with_ties: bool, seed: int
) -> None:
    xs = ref.make_sources((6, 11), count, torch.float32, "gauss", seed)
    weights = torch.tensor(w[:count])
    kw = {"density": density, "weights": tuple(weights.tolist()), "seed": seed}
    if with_ties:
        ours = dare_ties(xs, DareTiesParams(**kw), Context("m"))
        peft_fn = merge_utils.dare_ties
    else:
        ours = dare(xs, DareParams(**kw), Context("m"))
        peft_fn = merge_utils.dare_linear
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            merge_utils, "random_pruning", PeftWithOurMasks(masks_of(xs, DareParams(**kw), "m"))
        )
        with warnings.catch_warnings():  # PEFT warns that density 1 prunes nothing
            warnings.simplefilter("ignore")
            peft = peft_fn(xs, weights, density)
    torch.testing.assert_close(ours, peft, rtol=1e-5, atol=1e-5)


def test_merged_lora_factors_give_the_reference_delta_weight() -> None:
    a_s = ref.make_sources((4, 3, 3, 3), 3, torch.float32, "gauss", 8)
    b_s = ref.make_sources((6, 4, 1, 1), 3, torch.float32, "gauss", 9)
    p = DareParams(density=0.5, seed=3)
    merged = delta_weight(
        dare(a_s, p, Context("c.lora_A.weight")), dare(b_s, p, Context("c.lora_B.weight")), 1.0
    )
    expected = delta_weight(
        ref.dare(a_s, masks_of(a_s, p, "c.lora_A.weight"), 0.5, [1.0] * 3),
        ref.dare(b_s, masks_of(b_s, p, "c.lora_B.weight"), 0.5, [1.0] * 3),
        1.0,
    )
    torch.testing.assert_close(merged, expected.float(), rtol=1e-5, atol=1e-5)
