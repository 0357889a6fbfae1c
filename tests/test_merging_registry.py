"""The registry: names, CLI parameter parsing, source validation and streaming merges."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch

from adapterdb.errors import AdbError, MismatchError
from adapterdb.merging import get, merge_adapters, methods, parse_params, register, registry
from adapterdb.merging.basic import AverageParams
from adapterdb.merging.condu import EmrParams
from adapterdb.merging.layers import LAYER_METHODS
from adapterdb.merging.registry import Context, Layout, Params
from adapterdb.merging.ties import TiesParams

ALL = [
    "average",
    "dare",
    "dare_ties",
    "emr",
    "finetune",
    "magmax",
    "tall",
    "task_arithmetic",
    "ties",
]


def adapters(count: int, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(count)
    return [
        {"x.lora_A.weight": torch.randn(4, 6, generator=gen).to(dtype),
         "x.lora_B.weight": torch.randn(5, 4, generator=gen).to(dtype),
         "conv.lora_A.weight": torch.randn(4, 2, 3, 3, generator=gen).to(dtype)}
        for _ in range(count)
    ]  # fmt: skip


def test_every_method_is_registered() -> None:
    assert methods() == sorted([*ALL, *LAYER_METHODS])  # per-tensor, then whole-layer ones
    for name in methods():
        assert get(name).name == name and isinstance(get(name).params(), Params)


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(AdbError, match=r"unknown merge method 'nope'.*ties"):
        get("nope")


def test_parse_params_types_and_cli_names() -> None:
    p = parse_params("ties", ["density=0.3", "lambda=0.5", "weights=1,2.5", "elect=count"])
    assert p == TiesParams(density=0.3, lam=0.5, weights=(1.0, 2.5), elect="count")
    assert parse_params("average", ["running=true", "step=3"]) == AverageParams(
        running=True, step=3
    )
    assert parse_params("ties", ["weights=[1, 2]", "weights=none"]).weights is None
    assert parse_params("ties", []) == TiesParams()
    assert parse_params("emr", ["scale=global"]) == EmrParams(scale="global")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["densty=0.3"],
            "bad parameter 'densty=0.3'.*one of: density, elect, lambda, trim, weights",
        ),
        (["density"], "expected key=value"),
        (["density=abc"], "bad value for density: 'abc' is not a number"),
        (["density=1.5"], r"ties: density=1.5 must be in \(0, 1\]"),
        (["density=0"], "must be in"),
        (["elect=mean"], "ties: bad value for elect: 'mean' is not one of sum, count"),
        (["weights=1,x"], "bad value for weights"),
    ],
)
def test_parse_params_errors_are_one_line_and_name_the_key(args: list[str], message: str) -> None:
    with pytest.raises(AdbError, match=message) as info:
        parse_params("ties", args)
    assert "\n" not in str(info.value)


def test_bad_bool_int_and_parameterless_methods() -> None:
    with pytest.raises(AdbError, match="bad value for running: 'maybe' is not a boolean"):
        parse_params("average", ["running=maybe"])
    with pytest.raises(AdbError, match=r"bad value for step: '2\.5' is not an int"):
        parse_params("average", ["step=2.5"])
    with pytest.raises(AdbError, match="one of: none"):
        parse_params("finetune", ["x=1"])


def test_direct_construction_is_validated_and_hashable() -> None:
    assert hash(TiesParams(weights=[1.0, 2.0])) == hash(TiesParams(weights=(1.0, 2.0)))  # type: ignore[arg-type]
    with pytest.raises(AdbError, match="trim='row' is not one of"):
        TiesParams(trim="row")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ALL)
def test_merge_adapters_streams_what_the_per_tensor_function_gives(method: str) -> None:
    srcs, m = adapters(3), get(method)
    # TIES' default global trim makes a tensor depend on the whole adapter (test_merging_ties)
    p = TiesParams(trim="tensor") if method == "ties" else m.params()
    merged = merge_adapters(method, srcs, p)
    assert isinstance(merged, Iterator)
    out = list(merged)
    assert [n for n, _ in out] == list(srcs[0])
    for name, tensor in out:
        expected = m.merge([s[name] for s in srcs], p, Context(name))
        assert torch.equal(tensor, expected), name


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_land_in_given_buffers(method: str, dtype: torch.dtype) -> None:
    srcs = adapters(3, dtype)
    buffers = {n: torch.full_like(t, float("nan")) for n, t in srcs[0].items()}
    fresh = dict(merge_adapters(method, srcs))
    for name, tensor in merge_adapters(method, srcs, out=buffers):
        assert tensor is buffers[name] and torch.equal(tensor, fresh[name]), name


@pytest.mark.parametrize("method", ALL)
def test_reuse_puts_results_of_one_shape_in_one_buffer(method: str) -> None:
    """Each result, read before the next is drawn, equals the fresh one; results of the same
    shape and dtype share one buffer, other shapes get their own."""
    gen = torch.Generator().manual_seed(7)
    shapes = {"a": (4, 6), "b": (4, 6), "c": (5, 4), "d": (4, 6)}
    srcs = [{n: torch.randn(*s, generator=gen) for n, s in shapes.items()} for _ in range(3)]
    p = TiesParams(trim="tensor") if method == "ties" else get(method).params()
    fresh = dict(merge_adapters(method, srcs, p))
    storage = {}
    for name, tensor in merge_adapters(method, srcs, p, reuse=True):
        assert torch.equal(tensor, fresh[name]), name
        storage[name] = tensor.data_ptr()
    assert storage["a"] == storage["b"] == storage["d"] != storage["c"]


def test_a_bad_buffer_is_refused_before_any_output() -> None:
    srcs = adapters(2)
    with pytest.raises(MismatchError, match=r"output buffer for tensor 'x.lora_A.weight' is"):
        merge_adapters("average", srcs, out={"x.lora_A.weight": torch.zeros(6, 4)})
    with pytest.raises(MismatchError, match=r"\(not contiguous\)"):
        merge_adapters("ties", srcs, out={"x.lora_A.weight": torch.zeros(6, 4).t()})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s[2].pop("x.lora_B.weight"), "source 2 lacks tensor 'x.lora_B.weight'"),
        (lambda s: s[1].update(extra=torch.zeros(1)), "source 1 has extra tensor 'extra'"),
        (lambda s: s[2].update({"x.lora_B.weight": torch.zeros(5, 3)}),
         r"tensor 'x.lora_B.weight' of source 2 is torch.float32 \(5, 3\)"),
        (lambda s: s[1].update({"x.lora_A.weight": torch.zeros(4, 6, dtype=torch.float16)}),
         "tensor 'x.lora_A.weight' of source 1 is torch.float16"),
        (lambda s: s[0].update({"x.lora_A.weight": torch.zeros(4, 6, dtype=torch.int32)}),
         "tensor 'x.lora_A.weight' of source 0 has dtype torch.int32"),
    ],
)  # fmt: skip
def test_mismatches_name_the_tensor_and_source_before_any_output(edit, message: str) -> None:
    srcs = adapters(3)
    edit(srcs)
    with pytest.raises(MismatchError, match=message):
        merge_adapters("average", srcs)  # eager: raises on the call, not on iteration


def test_empty_inputs_and_wrong_params_type() -> None:
    with pytest.raises(AdbError, match="at least one source"):
        merge_adapters("average", [])
    with pytest.raises(AdbError, match="expected TiesParams, got AverageParams"):
        merge_adapters("ties", adapters(2), AverageParams())


def test_a_new_method_is_one_registered_function() -> None:
    @dataclass(frozen=True)
    class ScaledParams(Params):
        factor: float = 2.0

    def first_scaled(
        tensors: Sequence[torch.Tensor], p: ScaledParams, ctx: Context = Context()
    ) -> torch.Tensor:
        return tensors[0] * p.factor

    register("first_scaled", params=ScaledParams)(first_scaled)
    try:
        srcs = adapters(2)
        p = parse_params("first_scaled", ["factor=3"])
        out = dict(merge_adapters("first_scaled", srcs, p))
        assert torch.equal(out["x.lora_A.weight"], srcs[0]["x.lora_A.weight"] * 3)
        with pytest.raises(ValueError, match="registered twice"):
            register("first_scaled", params=ScaledParams)(first_scaled)
    finally:
        registry._METHODS.pop("first_scaled")


class CountingSource(dict):
    """A source that tells layouts from metadata and counts the tensors it decodes."""

    def __init__(self, tensors: dict[str, torch.Tensor], layouts: dict[str, Layout]) -> None:
        super().__init__(tensors)
        self.layouts, self.loads = layouts, 0

    def __getitem__(self, name: str) -> torch.Tensor:
        self.loads += 1
        return super().__getitem__(name)

    def layout(self, name: str) -> Layout:
        return self.layouts[name]


def test_lazy_sources_are_checked_from_layouts_and_decoded_once() -> None:
    plain = adapters(3)
    meta = {n: Layout(t.dtype, t.shape) for n, t in plain[0].items()}
    srcs = [CountingSource(s, meta) for s in plain]
    merged = merge_adapters("average", srcs)
    assert [s.loads for s in srcs] == [0, 0, 0]  # validated without decoding anything
    list(merged)
    assert [s.loads for s in srcs] == [len(meta)] * 3
    wrong = {**meta, "x.lora_B.weight": Layout(torch.float32, torch.Size([5, 3]))}
    bad = [*srcs[:2], CountingSource(plain[2], wrong)]
    with pytest.raises(MismatchError, match=r"'x.lora_B.weight' of source 2 is"):
        merge_adapters("average", bad)
    assert bad[2].loads == 0
