"""The merge-method registry: names -> (typed parameters, per-tensor function, global pass).

Adding a method is one decorated function plus its test:

    @register("ties", params=TiesParams, prepare=ties_thresholds)
    def ties(tensors: Sequence[Tensor], p: TiesParams, ctx: Context = NO_CONTEXT) -> Tensor: ...

A method works on the T sources of ONE tensor name. Methods whose definition spans the whole
task vector (TIES' global trim) give a `prepare` pass that reads every source once and returns
what the per-tensor step needs; `merge_adapters` runs it, then streams tensor by tensor.
Parameters are small frozen dataclasses whose defaults are the papers'; the CLI passes them as
`key=value` strings (`parse_params`), with the mergekit/PEFT names (`density`, `weights`,
`lambda`, `seed`). Numbers must be finite and within float32's range (`check_finite`).

Methods are defined on task vectors. Given `kinds` (`adapterdb.tensorkinds`), `merge_adapters`
merges the tensors that are values (modules_to_save weights, DoRA magnitudes) by the rule of
`adapterdb.merging.fullweights` instead, and checks every result before yielding it
(`check_result`: finite, shaped like its sources), so no merge writes NaN/inf.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import torch

from adapterdb.errors import AdbError, MismatchError
from adapterdb.tensorkinds import Kind

if TYPE_CHECKING:  # layers builds on this module's Params: imported for types only
    from adapterdb.merging.layers import LayerMethod

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CLI_ALIASES = {"lambda": "lam"}  # `lambda` is a Python keyword; the field is spelled `lam`


@dataclass(frozen=True)
class Params:
    """Base of every method's parameters: frozen, typed, validated on construction."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = typing.get_args(hints[f.name])
            value = getattr(self, f.name)
            if isinstance(value, list):  # weights=[...] from Python: keep the params hashable
                object.__setattr__(self, f.name, tuple(value))
            if typing.get_origin(hints[f.name]) is typing.Literal and value not in choices:
                raise AdbError(
                    f"{cli_name(f.name)}={value!r} is not one of: {', '.join(map(str, choices))}"
                )
            check_finite(cli_name(f.name), getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Raise AdbError for an out-of-range value (overridden where a range matters)."""


@dataclass(frozen=True)
class Context:
    """What a per-tensor step may need beyond its tensors.

    `name` seeds DARE's drop masks; `thresholds` (T,) is the result of the method's global
    pass (TIES' per-source trim thresholds over the whole task vector), None when not run;
    `out`, when given, is a contiguous buffer of the sources' shape and dtype that receives
    the result (reusing buffers spares fresh pages, which cost more than the merge itself).
    """

    name: str = ""
    thresholds: torch.Tensor | None = None
    out: torch.Tensor | None = None


NO_CONTEXT = Context()
P = TypeVar("P", bound=Params)
MergeFn = Callable[[Sequence[torch.Tensor], P, Context], torch.Tensor]
PrepareFn = Callable[[Sequence[Mapping[str, torch.Tensor]], P], "torch.Tensor | None"]


@dataclass(frozen=True)
class Method(Generic[P]):
    """A registered merge method."""

    name: str
    params: type[P]
    merge: MergeFn[P]
    prepare: PrepareFn[P] | None = None


_METHODS: dict[str, Method[Any]] = {}


def register(
    name: str, params: type[P], prepare: PrepareFn[P] | None = None
) -> Callable[[MergeFn[P]], MergeFn[P]]:
    """Decorator adding a per-tensor merge function to the registry under `name`."""

    def add(fn: MergeFn[P]) -> MergeFn[P]:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        _METHODS[name] = Method(name, params, fn, prepare)
        return fn

    return add


def _layer_methods() -> Mapping[str, LayerMethod]:
    """The whole-layer methods (`adapterdb.merging.layers`: OPCM, TSV, ...); imported late
    because `layers` builds on this module's `Params`."""
    from adapterdb.merging.layers import LAYER_METHODS

    return LAYER_METHODS


def methods() -> list[str]:
    """Registered method names, per-tensor and whole-layer, sorted."""
    return sorted({*_METHODS, *_layer_methods()})


def get(name: str) -> Method[Any] | LayerMethod:
    """The method called `name`: a per-tensor `Method` or a whole-layer `LayerMethod` (both
    have `.name` and `.params`); AdbError listing the known ones otherwise."""
    found = _METHODS.get(name) or _layer_methods().get(name)
    if found is None:
        raise AdbError(f"unknown merge method {name!r}; choose one of: {', '.join(methods())}")
    return found


def parse_params(method: str, args: Sequence[str]) -> Params:
    """`["density=0.2", "lambda=1"]` -> the method's typed, validated parameter dataclass."""
    cls = get(method).params
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    allowed = ", ".join(cli_name(f) for f in sorted(fields)) or "none"
    values: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        field = CLI_ALIASES.get(key.strip(), key.strip())
        if not sep or field not in fields:
            raise AdbError(
                f"{method}: bad parameter {arg!r}; expected key=value with key one of: {allowed}"
            )
        try:
            values[field] = _convert(raw.strip(), hints[field])
        except ValueError as exc:
            raise AdbError(f"{method}: bad value for {key.strip()}: {exc}") from None
    try:
        return cls(**values)
    except AdbError as exc:
        raise AdbError(f"{method}: {exc}") from None


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_finite(key: str, value: Any) -> None:
    """Refuse a number (or a number in a tuple) that is nan, ±inf or beyond float32's range.

    Merges compute in float32: `lambda=inf` or `weights=nan,1` would commit NaN tensors, and
    `lambda=1e39` becomes inf on the way, so such values are refused before anything runs."""
    for v in value if isinstance(value, tuple) else (value,):
        if not isinstance(v, float):  # ints (seed, k, step) are exact and never overflow
            continue
        if not math.isfinite(v):
            raise AdbError(f"{key}={v} is not a finite number; pass a real value such as 1")
        if abs(v) > FLOAT32_MAX:
            raise AdbError(
                f"{key}={v:g} is beyond float32's range (±{FLOAT32_MAX:.3g}), where merges "
                "compute; pass a smaller value"
            )


def cli_name(field: str) -> str:
    """A parameter's name as users write it (`lam` -> `lambda`), for messages and records."""
    return next((cli for cli, f in CLI_ALIASES.items() if f == field), field)


def _convert(raw: str, hint: Any) -> Any:
    """Parse one CLI string into the field's annotated type (float, int, bool, Literal, ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if raw not in args:
            raise ValueError(f"{raw!r} is not one of {', '.join(map(str, args))}")
        return raw
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        if raw.lower() == "none" and type(None) in args:
            return None
        return _convert(raw, next(a for a in args if a is not type(None)))
    if origin is tuple:
        return tuple(_convert(v, args[0]) for v in raw.strip("[]()").split(",") if v.strip())
    if hint is bool:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{raw!r} is not a boolean (true/false)")
        return raw.lower() in ("true", "1", "yes")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a{'n int' if hint is int else ' number'}") from None
    return hint(raw)


class Layout(NamedTuple):
    """What the checks read of a tensor: enough to validate a source without decoding it."""

    dtype: torch.dtype
    shape: torch.Size


Shaped = torch.Tensor | Layout


def layout_of(source: Mapping[str, torch.Tensor], name: str) -> Shaped:
    """The tensor, or only its layout where the mapping can tell it without decoding
    (a `layout(name)` method, as the store's lazy sources have)."""
    layout = getattr(source, "layout", None)
    return layout(name) if callable(layout) else source[name]


def check_tensors(tensors: Sequence[Shaped], name: str = "") -> None:
    """Same shape and floating dtype (fp32/bf16/fp16) for the T sources of one tensor."""
    where = f"tensor {name!r}" if name else "tensor"
    if not tensors:
        raise AdbError(f"{where}: nothing to merge; pass at least one source")
    first = tensors[0]
    for t, x in enumerate(tensors):
        if x.dtype not in FLOAT_DTYPES:
            raise MismatchError(
                f"{where} of source {t} has dtype {x.dtype}; convert it to float32/bf16/fp16"
            )
        if x.dtype != first.dtype or x.shape != first.shape:
            raise MismatchError(
                f"{where} of source {t} is {x.dtype} {tuple(x.shape)} but source 0 is "
                f"{first.dtype} {tuple(first.shape)}; convert the sources to one shape and dtype"
            )


def check_sources(sources: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """All sources have the same tensor names, shapes and dtypes (first offender named)."""
    if not sources:
        raise AdbError("nothing to merge; pass at least one source adapter")
    names = list(sources[0])
    for t, source in enumerate(sources[1:], start=1):
        missing = next((n for n in names if n not in source), None)
        extra = next((n for n in source if n not in sources[0]), None)
        if missing is not None or extra is not None:
            which, bad = ("lacks", missing) if missing is not None else ("has extra", extra)
            raise MismatchError(
                f"source {t} {which} tensor {bad!r} (vs source 0); merge adapters of the same "
                "modules and rank"
            )
    for name in names:
        check_tensors([layout_of(s, name) for s in sources], name)


def check_out(out: torch.Tensor, like: Shaped, name: str) -> None:
    """A result buffer must be contiguous with the sources' shape and dtype."""
    if out.shape != like.shape or out.dtype != like.dtype or not out.is_contiguous():
        raise MismatchError(
            f"output buffer for tensor {name!r} is {out.dtype} {tuple(out.shape)}"
            f"{'' if out.is_contiguous() else ' (not contiguous)'} but the sources are "
            f"{like.dtype} {tuple(like.shape)}; pass a contiguous buffer like the sources"
        )


def check_result(name: str, result: torch.Tensor, like: Shaped) -> torch.Tensor:
    """Refuse a merged tensor that is not finite or not shaped like its sources.

    The last line of defence before a result is written or committed (an import refuses
    non-finite tensors; a merge must not make them). One float32 sum tells finite results
    apart in one read; only a sum that overflowed is checked element by element."""
    if result.shape != like.shape or result.dtype != like.dtype:
        raise MismatchError(
            f"merged tensor {name!r} came out {result.dtype} {tuple(result.shape)}, not "
            f"{like.dtype} {tuple(like.shape)} like its sources; this is a bug in the method, "
            "please report it"
        )
    total = result.sum(dtype=torch.float32)
    if not bool(torch.isfinite(total)) and not bool(torch.isfinite(result).all()):
        bad = int((~torch.isfinite(result)).sum())
        raise AdbError(
            f"merged tensor {name!r} has {bad} non-finite value(s) (nan/inf): the parameters "
            "overflow on these sources; lower lambda/weights (nothing was committed)"
        )
    return result


def check_scale(method: str, p: Params) -> None:
    """Refuse parameters whose combined scale leaves float32 before any tensor is read.

    Each is finite on its own (`check_finite`), but a method multiplies them: λ·w_t (and
    /density for DARE's rescaling; dividing always is conservative for TIES). Beyond float32's
    range torch raises mid-merge or every entry becomes inf."""
    lam = abs(float(getattr(p, "lam", 1.0)))
    weights = getattr(p, "weights", None) or (1.0,)
    density = float(getattr(p, "density", 1.0))
    scale = lam * max(abs(float(w)) for w in weights) / (density if density > 0 else 1.0)
    if not scale <= FLOAT32_MAX:
        raise AdbError(
            f"{method}: lambda x weights / density = {scale:.3g} is beyond float32's range "
            f"(±{FLOAT32_MAX:.3g}); lower lambda or the weights"
        )


class _Only(Mapping[str, torch.Tensor]):
    """The named subset of a source mapping (keeps its lazy `layout`): what a method's global
    pass reads when some tensors are values, not task vectors."""

    def __init__(self, source: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        self._source, self._names = source, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._source[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def layout(self, name: str) -> Shaped:
        return layout_of(self._source, name)


def merge_adapters(
    method: str,
    sources: Sequence[Mapping[str, torch.Tensor]],
    params: Params | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
    reuse: bool = False,
    kinds: Mapping[str, Kind] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Merge whole adapters: validate, run the method's global pass, then yield tensor by tensor.

    Validation and the global pass run on the call (errors surface before any output); the
    merge itself is lazy. Only the T sources of one tensor are ever stacked, so peak extra
    memory is O(T x largest tensor) beyond the inputs and what the caller keeps. `out` maps
    (some) names to buffers that receive those results in place (see `Context.out`).
    `reuse=True` is for consumers done with each result before drawing the next (storing it,
    writing it out): every result of one shape and dtype lands in the same buffer, so a merge
    touches fresh memory once per shape instead of once per tensor.

    `kinds` (`adapterdb.tensorkinds.classify` of PEFT names) marks the tensors that are values,
    not task vectors: those are merged by `fullweights.merge_values` and kept out of the global
    pass. Without it every tensor is a task vector (names need not be PEFT's). Every result is
    checked (`check_result`) before it is yielded.
    """
    from adapterdb.merging.fullweights import merge_values

    m = get(method)
    if not isinstance(m, Method):
        raise AdbError(
            f"{method} merges whole LoRA layers, not tensor by tensor; run it through "
            "`adb merge` or adapterdb.merge"
        )
    p = m.params() if params is None else params
    if not isinstance(p, m.params):
        raise AdbError(f"{method}: expected {m.params.__name__}, got {type(p).__name__}")
    check_sources(sources)
    weights = getattr(p, "weights", None)
    if weights is not None and len(weights) != len(sources):
        raise MismatchError(
            f"{method}: weights has {len(weights)} values for {len(sources)} sources; pass one "
            "weight per source"
        )
    check_scale(method, p)
    buffers = dict(out or {})
    for name, buf in buffers.items():
        check_out(buf, layout_of(sources[0], name), name)
    kind = {name: (kinds or {}).get(name, Kind.FACTOR) for name in sources[0]}
    deltas = [name for name, k in kind.items() if k.is_delta]
    if m.prepare is None:
        thresholds = None
    elif len(deltas) == len(kind):
        thresholds = m.prepare(sources, p)
    else:
        thresholds = m.prepare([_Only(s, deltas) for s in sources], p) if deltas else None
    pool: dict[tuple[torch.Size, torch.dtype], torch.Tensor] = {}

    def merged(name: str) -> torch.Tensor:
        tensors = [s[name] for s in sources]
        buf = buffers.get(name)
        if buf is None and reuse:
            key = (tensors[0].shape, tensors[0].dtype)
            if key not in pool:
                pool[key] = torch.empty_like(tensors[0], memory_format=torch.contiguous_format)
            buf = pool[key]
        ctx = Context(name, thresholds, buf)
        try:
            if kind[name].is_delta:
                result = m.merge(tensors, p, ctx)
            else:
                result = merge_values(method, tensors, p, kind[name], ctx)
        except RuntimeError as exc:  # torch refusing a scalar beyond float32 (a safety net)
            if "overflow" not in str(exc):
                raise
            raise AdbError(
                f"{method}: tensor {name!r} overflows float32 with these parameters; lower "
                "lambda/weights (nothing was committed)"
            ) from None
        return check_result(name, result, tensors[0])

    return ((name, merged(name)) for name in sources[0])
