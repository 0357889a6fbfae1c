"""EMR/ConDU: streaming unify, decouple and the continual step, against the EMR loop reference."""

from __future__ import annotations

import merge_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterdb.errors import AdbError, MismatchError
from adapterdb.lora import delta_weight
from adapterdb.merging import merge_adapters
from adapterdb.merging.condu import EmrParams, Unifier, continual_unify, decouple, emr

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
SCALE = st.sampled_from(["tensor", "global"])


@st.composite
def task_vectors(draw: st.DrawFn, max_tasks: int = 5) -> list[dict[str, torch.Tensor]]:
    """T task vectors of 1–3 tensors of mixed shapes, one dtype and data kind."""
    tasks = draw(st.integers(1, max_tasks))
    dtype = draw(st.sampled_from(ref.DTYPES))
    kind = draw(st.sampled_from(["gauss", "int", "zeros"]))
    shapes = draw(st.lists(ref.SHAPES, min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**16))
    per_name = {
        f"t{i}": ref.make_sources(s, tasks, dtype, kind, seed + i) for i, s in enumerate(shapes)
    }
    return [{n: xs[t] for n, xs in per_name.items()} for t in range(tasks)]


def unify_all(sources: list[dict[str, torch.Tensor]], scale: str = "tensor"):
    unifier = Unifier(len(sources), scale)  # type: ignore[arg-type]
    unified, masks = {}, {}
    for name in sources[0]:
        unified[name], masks[name] = unifier.unify_tensor(name, [s[name] for s in sources])
    return unified, masks, unifier.scales()


@SETTINGS
@given(task_vectors(), SCALE, ref.CHUNKS)
def test_unify_and_decouple_match_the_emr_loop_reference(
    sources: list[dict[str, torch.Tensor]], scale: str, chunk: int | None
) -> None:
    """Masks exactly equal, scales to float64 rounding, unified and rebuilt experts to dtype."""
    with ref.chunk_bytes(chunk):
        unified, masks, scales = unify_all(sources, scale)
    ref_unified, ref_masks, ref_scales = ref.emr(sources, scale)
    torch.testing.assert_close(torch.tensor(scales), torch.tensor(ref_scales), rtol=1e-5, atol=0)
    for name, u in unified.items():
        xs = [s[name] for s in sources]
        assert masks[name].dtype == torch.bool and torch.equal(masks[name], ref_masks[name]), name
        ref.assert_matches(u, ref_unified[name], xs)
        experts = decouple(u, masks[name], scales)
        expected = ref.decouple(ref_unified[name], ref_masks[name], ref_scales)
        for t, expert in enumerate(experts):
            ref.assert_matches(expert, expected[t], [x * max(ref_scales) for x in xs])


def test_zero_sum_elects_minus_and_an_empty_mask_scales_by_one() -> None:
    unified, masks, scales = unify_all(
        [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([-1.0, 0.0])}]
    )
    assert unified["w"].tolist() == [-1.0, 0.0]
    assert masks["w"].tolist() == [[False, False], [True, False]]
    assert scales == [1.0, 1.0]


def test_scales_are_per_tensor_means_or_global_sums() -> None:
    """Task 0 agrees everywhere; task 1 keeps half its mass in a small tensor."""
    t0 = {"big": torch.full((8,), 2.0), "small": torch.tensor([4.0, 4.0])}
    t1 = {"big": torch.full((8,), 1.0), "small": torch.tensor([-1.0, -1.0])}
    # unified: big = 2 (both agree), small = 4 (task 1 disagrees); |τ_1| = 1 per entry
    assert unify_all([t0, t1], "tensor")[2] == pytest.approx([(2 + 4) / (2 + 4), (1 + 1) / (2 + 0)])
    assert unify_all([t0, t1], "global")[2] == pytest.approx(
        [(16 + 8) / (16 + 8), (8 + 2) / (16 + 0)]
    )


def test_a_single_task_is_rebuilt_exactly() -> None:
    x = torch.randn(50, 7)
    unified, masks, scales = unify_all([{"w": x}])
    torch.testing.assert_close(decouple(unified["w"], masks["w"], scales)[0], x, rtol=1e-6, atol=0)


def test_rebuilt_experts_stay_close_to_the_originals() -> None:
    """Gaussian deltas, T = 3: cos(τ̃_t, τ_t) is 0.8138 ± 0.0002 (measured on 5 draws of 1M
    entries; λ_t does not enter a cosine). At n = 16384 one draw has σ ≈ 0.003, so 0.79 is
    about 8σ below; a wrong mask/max (e.g. max over all tasks, or averaging) falls below it."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(128, 128, generator=gen) for _ in range(3)]
    unified, masks, scales = unify_all([{"w": x} for x in xs])
    experts = decouple(unified["w"], masks["w"], scales)
    for expert, x in zip(experts, xs, strict=True):
        cos = torch.nn.functional.cosine_similarity(expert.flatten(), x.flatten(), dim=0)
        assert 0.79 < float(cos) < 0.84
        assert float(expert.abs().sum() / x.abs().sum()) == pytest.approx(
            1.0, rel=1e-5
        )  # λ_t's job


@SETTINGS
@given(task_vectors(max_tasks=4), ref.CHUNKS)
def test_continual_steps_unify_the_decoupled_experts_with_the_new_task(
    sources: list[dict[str, torch.Tensor]], chunk: int | None
) -> None:
    with ref.chunk_bytes(chunk):
        unified, masks, scales = unify_all(sources[:1])
        for t in range(1, len(sources)):
            experts = {n: decouple(unified[n], masks[n], scales) for n in unified}
            step_sources = [{n: e[i] for n, e in experts.items()} for i in range(t)] + [sources[t]]
            ref_unified, ref_masks, ref_scales = ref.emr(step_sources)
            unifier = Unifier(t + 1)
            for name in list(unified):
                unified[name], masks[name] = continual_unify(
                    unifier, name, unified[name], masks[name], scales, sources[t][name]
                )
                assert torch.equal(masks[name], ref_masks[name])
                ref.assert_matches(
                    unified[name], ref_unified[name], [s[name] for s in step_sources]
                )
            scales = unifier.scales()
            torch.testing.assert_close(
                torch.tensor(scales), torch.tensor(ref_scales), rtol=1e-5, atol=0
            )
    assert all(m.shape[0] == len(sources) for m in masks.values())


@SETTINGS
@given(task_vectors(), ref.CHUNKS)
def test_emr_method_yields_the_unified_vector(
    sources: list[dict[str, torch.Tensor]], chunk: int | None
) -> None:
    """`emr` skips the triggers' work but returns the Unifier's unified vector bit for bit."""
    with ref.chunk_bytes(chunk):
        unified, _, _ = unify_all(sources)
        merged = dict(merge_adapters("emr", sources))
        first = emr([s["t0"] for s in sources], EmrParams())
    ref_unified, _, _ = ref.emr(sources)
    for name, tensor in merged.items():
        assert torch.equal(tensor, unified[name]), name
        ref.assert_matches(tensor, ref_unified[name], [s[name] for s in sources])
    assert torch.equal(first, unified["t0"])


def test_lora_experts_rebuild_the_reference_delta_weight() -> None:
    """ConDU-LoRA unifies A and B separately; expert t's ΔW = B̃_t·Ã_t·s."""
    gen = torch.Generator().manual_seed(1)
    sources = [
        {
            "m.lora_A.weight": torch.randn(4, 12, generator=gen),
            "m.lora_B.weight": torch.randn(10, 4, generator=gen),
        }
        for _ in range(3)
    ]
    unified, masks, scales = unify_all(sources)
    ref_unified, ref_masks, ref_scales = ref.emr(sources)
    experts = {n: decouple(unified[n], masks[n], scales) for n in unified}
    ref_experts = {n: ref.decouple(ref_unified[n], ref_masks[n], ref_scales) for n in unified}
    for t in range(3):
        got = delta_weight(experts["m.lora_A.weight"][t], experts["m.lora_B.weight"][t], 2.0)
        want = delta_weight(
            ref_experts["m.lora_A.weight"][t], ref_experts["m.lora_B.weight"][t], 2.0
        )
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_errors_name_the_tensor() -> None:
    unifier = Unifier(2)
    with pytest.raises(
        MismatchError, match="tensor 'w' has 3 task vectors but the unifier was made for 2"
    ):
        unifier.unify_tensor("w", [torch.zeros(2)] * 3)
    unifier.unify_tensor("w", [torch.zeros(2)] * 2)
    with pytest.raises(AdbError, match="tensor 'w' was unified twice"):
        unifier.unify_tensor("w", [torch.zeros(2)] * 2)
    with pytest.raises(MismatchError, match=r"tensor 'v' of source 1 is torch\.float16"):
        unifier.unify_tensor("v", [torch.zeros(2), torch.zeros(2, dtype=torch.float16)])
    with pytest.raises(MismatchError, match="triggers do not fit"):
        decouple(torch.zeros(3), torch.zeros(2, 4, dtype=torch.bool), [1.0, 1.0])
    with pytest.raises(MismatchError, match="triggers do not fit"):
        decouple(torch.zeros(3), torch.zeros(2, 3, dtype=torch.bool), [1.0])
    with pytest.raises(AdbError, match="tasks >= 1"):
        Unifier(0)
