"""Store-aware merge workflows: resolve sources, run the algebra, write a folder or a commit.

The algebra (`adapterdb.merging`, `adapterdb.lowrank`, `adapterdb.alignment`) works on named
tensors; this module feeds it from store revisions or PEFT folders, lazily and tensor by
tensor, and records what it did (method, parameters, sources, refactoring error, ConDU
triggers) in the commit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from adapterdb.adapter import (
    Adapter,
    check_adapter,
    dtype_code,
    from_torch,
    lora_scale,
    read_peft_raw,
    to_torch,
    torch_dtype,
)
from adapterdb.errors import AdbError, MismatchError
from adapterdb.lora import delta_weight, lora_pairs, module_path, pair_scale
from adapterdb.lowrank import dense_refactor, refactor
from adapterdb.merging import registry
from adapterdb.merging.condu import Unifier, decouple
from adapterdb.merging.fullweights import merge_values
from adapterdb.merging.layers import LAYER_METHODS
from adapterdb.storage.commits import Commit, TensorEntry, Trigger, check_task_name
from adapterdb.storage.store import Store
from adapterdb.tensorfile import RawTensor
from adapterdb.tensorkinds import classify, kind_of, summary
from adapterdb.trainers.branchstate import EXPERTS, newest_unmerged_expert

LINEAR = frozenset({"average", "task_arithmetic", "finetune"})  # merged = Σ_t w_t τ_t
ALIASES = {"pam": "average", "condu": "emr"}  # workflow names -> registry methods


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping that decodes a tensor only when asked (streams big adapters).

    `layout`, where given, tells a tensor's dtype and shape from metadata, so that merges
    validate their sources without decoding every tensor an extra time."""

    def __init__(
        self,
        names: Sequence[str],
        load: Callable[[str], torch.Tensor],
        layout: Callable[[str], registry.Shaped] | None = None,
    ) -> None:
        self._names, self._load, self._layout = list(names), load, layout

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def layout(self, name: str) -> registry.Shaped:
        return self._layout(name) if self._layout is not None else self[name]


def stored_layout(
    layout: Mapping[str, tuple[str, tuple[int, ...]]],
) -> Callable[[str], registry.Layout]:
    """`LazyTensors.layout` from a manifest's or safetensors header's (dtype code, shape)."""
    return lambda name: registry.Layout(torch_dtype(layout[name][0]), torch.Size(layout[name][1]))


@dataclass
class Source:
    """One merge input: a store commit or a PEFT folder."""

    label: str
    tensors: Mapping[str, torch.Tensor]
    config: dict[str, Any]
    layout: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape), known unloaded
    commit_id: str | None = None
    commit: Commit | None = None
    manifest_id: str | None = None
    store: Store | None = field(default=None, repr=False)  # the one `commit_id` is in

    @property
    def task(self) -> str | None:
        return self.commit.task if self.commit else None

    def prefetch(self) -> None:
        """Before a verb decodes every tensor: a lazy clone fetches them all in parallel (one
        by one, each read would wait for its own round trip); a no-op for anything else."""
        if self.store is not None and self.manifest_id:
            self.store.prefetch(self.store.read_manifest(self.manifest_id))


def open_source(spec: str, store: Store | None) -> Source:
    """A PEFT folder path, else a revision of `store`."""
    if Path(spec).is_dir():
        config, raw, _ = read_peft_raw(spec)
        layout = {n: (r.dtype, r.shape) for n, r in raw.items()}
        tensors = LazyTensors(sorted(raw), lambda n: to_torch(raw[n]), stored_layout(layout))
        return Source(spec, tensors, config, layout)
    if store is None:
        raise AdbError(f"'{spec}' is not a folder, and there is no store to resolve it in")
    oid = store.resolve(spec)
    commit = store.read_commit(oid)
    manifest = store.read_manifest(commit.manifest)

    def load(name: str) -> torch.Tensor:
        return to_torch(store.objects.get_tensor(manifest.tensors[name].id))

    layout = {n: (e.dtype, e.shape) for n, e in manifest.tensors.items()}
    tensors = LazyTensors(sorted(manifest.tensors), load, stored_layout(layout))
    return Source(spec, tensors, manifest.config, layout, oid, commit, commit.manifest, store)


def adapter_source(adapter: Adapter, label: str) -> Source:
    """An in-memory `Adapter` (the Python API's) as a merge or diff input, checked first."""
    config = check_adapter(adapter, label)
    layout = {n: (dtype_code(t.dtype), tuple(t.shape)) for n, t in adapter.tensors.items()}
    return Source(label, adapter.tensors, config, layout)


def parse_params(method: str, args: Sequence[str]) -> registry.Params:
    """`key=value` strings -> the typed parameters of a workflow method (pam takes average's,
    condu emr's): one parser for `--param` and the Python API's keyword arguments."""
    return registry.parse_params(ALIASES.get(method, method), args)


def check_space(space: str, rank: int | None) -> None:
    """Refuse a space or rank that would be ignored or mean something else than it says:
    `--rank 0` used to mean "default" and `--rank` with factors was silently dropped."""
    if space not in ("factors", "product"):
        raise AdbError(f"unknown space {space!r}; use factors or product")
    if rank is not None and space != "product":
        raise AdbError(
            "--rank only applies to --space product (rank= to space='product' in Python); "
            "factor space keeps the ranks"
        )
    check_rank(rank)


def check_layout(sources: Sequence[Source], space: str) -> None:
    """Refuse incompatible sources from their metadata alone, before any tensor is decoded or
    any merged object written: same tensor names and dtypes; same shapes in factor space; in
    product space LoRA factors may differ in rank but not in the adapted layer's shape."""
    first = sources[0]
    pairs, _ = lora_pairs(first.layout)
    rank_axis = {p.a: 0 for p in pairs} | {p.b: 1 for p in pairs} if space == "product" else {}
    for s in sources[1:]:
        for name in sorted(set(first.layout) ^ set(s.layout)):
            where = s.label if name in s.layout else first.label
            raise MismatchError(
                f"tensor '{name}' is only in {where}; merge adapters of the same modules"
            )
        if space == "factors":
            check_equal_ranks(first, s)
        for name, (dtype, shape) in first.layout.items():
            other_dtype, other = s.layout[name]
            axis = rank_axis.get(name)
            if other_dtype != dtype or _without(other, axis) != _without(shape, axis):
                raise MismatchError(
                    f"tensor '{name}' is {other_dtype} {list(other)} in {s.label} but {dtype} "
                    f"{list(shape)} in {first.label}; merge adapters of one base model and rank"
                )


def _without(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    return shape if axis is None else shape[:axis] + shape[axis + 1 :]


# -- the merge itself ----------------------------------------------------------------------


@dataclass
class MergeResult:
    tensors: Iterator[tuple[str, torch.Tensor]]
    config: dict[str, Any]
    errors: dict[str, float] = field(default_factory=dict)  # product space: refactoring error
    notes: list[str] = field(default_factory=list)  # what the user should know (printed)
    objects: dict[str, str] = field(default_factory=dict)  # for the commit to keep, once consumed


def value_note(names: Sequence[str]) -> list[str]:
    """The warning that some tensors are values (not task vectors) and were averaged."""
    what = summary(classify(names))
    if not what:
        return []
    return [
        f"{what} (not LoRA factors) merged as weights: the mean with the method's weights "
        "(finetune: the last source), not by the method; see README, Merge methods"
    ]


def merge(
    method: str,
    params: registry.Params,
    sources: Sequence[Source],
    space: str,
    rank: int | None,
    reuse: bool = False,
) -> MergeResult:
    """Merge `sources` with a registered method in factor or product space (lazy output;
    `reuse`: see `registry.merge_adapters`)."""
    if method in LAYER_METHODS:  # whole-layer methods: trainers/continual.py (imports this)
        from adapterdb.trainers.continual import layer_merge

        return layer_merge(method, params, sources, rank)
    check_layout(sources, space)
    if space == "factors":
        tensors = [s.tensors for s in sources]
        return MergeResult(
            registry.merge_adapters(
                method, tensors, params, reuse=reuse, kinds=classify(sources[0].layout)
            ),
            dict(sources[-1].config),
            notes=value_note(list(sources[0].layout)),
        )
    if space == "product":
        return product_merge(method, params, sources, rank)
    raise AdbError(f"unknown space {space!r}; use factors or product")


def merge_standalone(
    method: str,
    params: registry.Params,
    sources: Sequence[Source],
    space: str = "factors",
    rank: int | None = None,
    force: bool = False,
) -> MergeResult:
    """A merge that is not committed (`adb merge -o`, `adapterdb.merge`): any workflow method
    but ConDU, whose triggers only a commit keeps; PAM's sources checked as for `--into`.
    PAM's warnings come first in the result's notes."""
    if method == "condu":
        raise AdbError(
            "condu keeps triggers in the store; use --into BRANCH (Store.merge in Python), "
            "then decouple"
        )
    if not sources:
        raise AdbError("pass the adapters to merge: at least one")
    check_space(space, rank)
    warnings = check_pam(sources, force) if method == "pam" else []
    result = merge(ALIASES.get(method, method), params, sources, space, rank)
    result.notes[:0] = warnings
    return result


def check_equal_ranks(first: Source, other: Source) -> None:
    """Factor-space merging adds A to A and B to B: ranks and scales must agree."""
    for pair in lora_pairs(first.layout)[0]:
        if pair.a not in other.layout:
            continue  # name mismatches are reported by check_layout
        r0, r1 = first.layout[pair.a][1][0], other.layout[pair.a][1][0]
        s0 = lora_scale(first.config, module_path(pair.module), r0)
        s1 = lora_scale(other.config, module_path(pair.module), r1)
        if r0 != r1 or abs(s0 - s1) > 1e-9 * max(abs(s0), 1.0):
            raise MismatchError(
                f"tensor '{pair.a}': rank/scale {r1}/{s1:g} in {other.label} vs {r0}/{s0:g} in "
                f"{first.label}; factor space needs equal ranks and scales, use --space product"
            )


def linear_weights(method: str, params: registry.Params, count: int) -> list[float]:
    """w_t of a linear method, read off by merging one-hot probes (exact for linear methods)."""
    eye = torch.eye(count)
    probes = [eye[t].reshape(count, 1) for t in range(count)]
    out = registry.get(method).merge(
        [p.reshape(-1) for p in probes], params, registry.Context("probe")
    )
    return out.tolist()


def product_merge(
    method: str, params: registry.Params, sources: Sequence[Source], rank: int | None
) -> MergeResult:
    """Merge LoRA layers on ΔW = B·A·s and refactor to rank r (exact QR+SVD for linear methods).

    Tensors that are not LoRA pairs are merged as they are (values by the rule of
    `adapterdb.merging.fullweights`). A layer's rank is capped at its full rank min(out, in):
    beyond it the factors only hold zeros (rank 1000 on a 32×32 layer was 31x its dense size);
    capped layers are listed in `rank_pattern`, so PEFT loads them with their own rank.
    """
    check_rank(rank)
    first = sources[0]
    pairs, rest = lora_pairs(first.layout)
    layer_rank, config, notes = output_ranks(sources, rank)
    errors: dict[str, float] = {}

    def factors(module: str, a: torch.Tensor, b: torch.Tensor, err: float, dtype: torch.dtype):
        errors[module] = err
        pair = next(p for p in pairs if p.module == module)
        return lora_output(pair, a, b, dtype, config, layer_rank[module])

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        if rest:
            yield from registry.merge_adapters(
                method, [_subset(s.tensors, rest) for s in sources], params, kinds=classify(rest)
            )
        if not pairs:
            return
        if method in LINEAR:
            w = linear_weights(method, params, len(sources))
            for pair in pairs:
                terms = [lora_term(s, pair, c) for s, c in zip(sources, w, strict=True) if c != 0.0]
                dtype = torch_dtype(first.layout[pair.a][0])
                rank_here = layer_rank[pair.module]
                yield from factors(pair.module, *refactor(terms, rank_here, pair.module), dtype)
            return
        dense = [
            LazyTensors([p.module for p in pairs], lambda m, s=s: _delta(s, m, pairs))
            for s in sources
        ]
        for module, dw in registry.merge_adapters(method, dense, params):
            dtype = torch_dtype(first.layout[next(p.a for p in pairs if p.module == module)][0])
            yield from factors(module, *dense_refactor(dw, layer_rank[module], module), dtype)

    return MergeResult(stream(), config, errors, notes)


def output_ranks(
    sources: Sequence[Source], rank: int | None
) -> tuple[dict[str, int], dict[str, Any], list[str]]:
    """Per LoRA layer, the rank a refactored merge gets: `rank`, else the largest input's,
    capped at the layer's full rank; the output's PEFT config (capped layers in
    `rank_pattern`) and the notes for the user (values merged as weights, capped layers)."""
    first = sources[0]
    pairs, rest = lora_pairs(first.layout)
    ranks = [s.layout[p.a][1][0] for s in sources for p in pairs if p.a in s.layout]
    wanted = rank or max(ranks, default=1)
    layer_rank = {p.module: min(wanted, full_rank(first.layout, p)) for p in pairs}
    r = max(layer_rank.values(), default=wanted)
    pattern = {module_path(m): lr for m, lr in layer_rank.items() if lr != r}
    config = dict(first.config, r=r, rank_pattern=pattern)
    capped = sorted(m for m, lr in layer_rank.items() if lr < wanted)
    notes = value_note(rest)
    if capped:
        notes.append(
            f"rank {wanted} exceeds the full rank min(out, in) of {len(capped)} layer(s) (e.g. "
            f"{module_path(capped[0])}: {layer_rank[capped[0]]}); capped there (a higher rank "
            "only adds zeros)"
        )
    return layer_rank, config, notes


def lora_output(
    pair: Any, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, config: Any, rank: int
) -> list[tuple[str, torch.Tensor]]:
    """Refactored factors (ΔW ≈ b·a, LoRA-shaped, scale folded in) as the output's A and B:
    B divided by the output config's LoRA scale, both in the sources' dtype, checked."""
    a_out = a.to(dtype)
    b_out = (b / lora_scale(config, module_path(pair.module), rank)).to(dtype)
    registry.check_result(pair.a, a_out, registry.Layout(dtype, a_out.shape))
    registry.check_result(pair.b, b_out, registry.Layout(dtype, b_out.shape))
    if a_out.shape[0] != rank or b_out.shape[1] != rank:
        raise MismatchError(
            f"refactored layer '{pair.module}' has rank {a_out.shape[0]}/{b_out.shape[1]}, not "
            f"{rank}; this is a bug, please report it"
        )
    return [(pair.a, a_out), (pair.b, b_out)]


def check_rank(rank: int | None) -> None:
    """A product-space target rank is a whole number >= 1 (None: the largest input's)."""
    if rank is not None and rank < 1:
        raise AdbError(f"--rank {rank}: a LoRA rank must be >= 1; omit it for the largest input's")


def full_rank(layout: Mapping[str, tuple[str, tuple[int, ...]]], pair: Any) -> int:
    """min(out, in) of the layer a LoRA pair adapts (conv: in·kh·kw): the most a rank can be."""
    a_shape, b_shape = layout[pair.a][1], layout[pair.b][1]
    return max(1, min(int(b_shape[0]), math.prod(int(d) for d in a_shape[1:])))


def _subset(
    tensors: Mapping[str, torch.Tensor], names: Sequence[str]
) -> Mapping[str, torch.Tensor]:
    return LazyTensors(names, tensors.__getitem__, lambda n: registry.layout_of(tensors, n))


def lora_term(source: Source, pair: Any, weight: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, weight · LoRA scale) of one source's layer `pair`: the product-space merges and
    the whole-layer workflow (trainers/continual.py) read layers through this one place, so a
    missing layer is refused the same way everywhere."""
    try:
        a, b = source.tensors[pair.a], source.tensors[pair.b]
    except KeyError:
        raise MismatchError(
            f"{source.label} lacks LoRA layer '{pair.module}'; merge adapters of the same modules"
        ) from None
    return a, b, weight * pair_scale(source.config, pair, a)


def _delta(source: Source, module: str, pairs: Sequence[Any]) -> torch.Tensor:
    pair = next(p for p in pairs if p.module == module)
    a, b, scale = lora_term(source, pair, 1.0)
    return delta_weight(a, b, scale)


# -- outputs -------------------------------------------------------------------------------


def to_raw(tensors: Iterator[tuple[str, torch.Tensor]]) -> dict[str, RawTensor]:
    return {name: from_torch(t) for name, t in tensors}


def put_merged(store: Store, name_tensor: tuple[str, torch.Tensor]) -> tuple[str, TensorEntry]:
    """Store one merged tensor; keep only its manifest entry, so merges stream."""
    name, tensor = name_tensor
    raw = from_torch(tensor)
    return name, TensorEntry(store.objects.put_tensor(raw), raw.dtype, raw.shape)


# -- merging into a branch -----------------------------------------------------------------


def trained_expert(store: Store, fingerprint: str, task: str) -> str | None:
    """Any expert of `task` trained with exactly this task file (any branch), if one exists:
    training is a function of the task file, so `adb run` reuses it instead of repeating it."""
    for name, oid in store.refs.list(EXPERTS).items():
        if (
            name.endswith(f"/{task}")
            and store.read_commit(oid).params.get("fingerprint") == fingerprint
        ):
            return oid
    return None


def check_pam(sources: Sequence[Source], force: bool) -> list[str]:
    """PAM merges experts trained with alignment; refuse one whose commit says otherwise."""
    warnings = []
    for s in sources:
        align = (
            (s.commit.params.get("align") or {}) if s.commit and s.commit.kind == "train" else None
        )
        if align is None:
            warnings.append(
                f"{s.label}: no training record, cannot confirm it was trained with alignment"
            )
        elif not align.get("enabled", False) and not force:
            raise AdbError(
                f"expert '{s.task}' ({s.label[:12]}) was trained without alignment, so this "
                "is not PAM; "
                "use --method average, or --force to merge it anyway"
            )
    return warnings


@dataclass
class MergeOutcome:
    commit_id: str
    errors: dict[str, float]
    warnings: list[str]


def merge_into(
    store: Store,
    branch: str,
    method: str,
    params: registry.Params,
    specs: Sequence[str],
    space: str = "factors",
    rank: int | None = None,
    force: bool = False,
    message: str = "",
    extra: Mapping[str, Any] | None = None,
) -> MergeOutcome:
    """Merge SOURCES (or the newest unmerged expert) into `branch`'s global adapter, commit.

    ConDU and the whole-layer methods (OPCM, TSV, ...: trainers/continual.py, which keeps
    their state in the commit) have workflows of their own. `extra` adds fields to the
    commit's `extra` (e.g. `adb run`'s step key)."""
    started = time.perf_counter()
    ref = f"refs/heads/{branch}"
    head = store.refs.read(ref)
    specs = list(specs) or [newest_unmerged_expert(store, branch)]
    new = [open_source(s, store) for s in specs]
    warnings = check_pam(new, force) if method == "pam" else []
    if method == "condu":
        return _condu_into(
            store, branch, head, params, new, message, warnings, extra or {}, started
        )
    algo = ALIASES.get(method, method)
    if isinstance(params, registry.get("average").params) and params.running:
        params = dataclasses.replace(params, step=_merged_tasks(store, head) + 1)
    current = [replace(open_source(head, store), label=f"{branch}@{head[:10]}")] if head else []
    sources = current + new
    if algo in LAYER_METHODS:  # the method's state lives in the store: trainers/continual.py
        from adapterdb.trainers.continual import layer_into

        result = layer_into(store, current[0] if current else None, algo, params, new, rank)
        warnings.extend(result.notes)
    elif head is None and len(sources) == 1:
        result = MergeResult(iter(sources[0].tensors.items()), dict(sources[0].config))
        warnings.append("the branch was empty: the first source becomes the global adapter as is")
    else:
        result = merge(algo, params, sources, space, rank, reuse=True)
        warnings.extend(result.notes)
    entries = dict(put_merged(store, nt) for nt in result.tensors)  # each stored, then reused
    manifest = store.put_manifest(entries, result.config)
    commit = Commit(
        manifest=manifest,
        kind="merge",
        parents=merge_parents(head, new),
        task=new[-1].task,
        method=method,
        params={**_params_json(params), "space": space, **({"rank": rank} if rank else {})},
        sources=tuple(s.commit_id or f"folder:{s.label}" for s in new),
        base_model=result.config.get("base_model_name_or_path"),
        stats={**_error_stats(result.errors), "seconds": time.perf_counter() - started},
        message=message or f"merge {', '.join(s.task or s.label for s in new)} with {method}",
        extra={**(extra or {}), "objects": {**_source_objects(new), **result.objects}},
    )
    oid = store.commit(commit, branch, expected=head)
    return MergeOutcome(oid, result.errors, warnings)


def merge_parents(head: str | None, new: Sequence[Source]) -> tuple[str, ...]:
    """The branch head, then each merged commit, once each: merging a branch into itself (or
    one expert twice) must not record the same parent twice."""
    return tuple(dict.fromkeys(x for x in (head, *(s.commit_id for s in new)) if x))


def _source_objects(sources: Sequence[Source]) -> dict[str, str]:
    """Manifests of the merged sources, kept reachable so the merge can be re-run."""
    return {f"source{i}": s.manifest_id for i, s in enumerate(sources) if s.manifest_id}


def _merged_tasks(store: Store, head: str | None) -> int:
    """How many tasks the global adapter at `head` already holds (merge commits on its line)."""
    return sum(1 for _, c in store.log(head) if c.kind == "merge") if head else 0


def _params_json(params: registry.Params) -> dict[str, Any]:
    return {registry.cli_name(k): v for k, v in dataclasses.asdict(params).items()}


def _error_stats(errors: Mapping[str, float]) -> dict[str, Any]:
    if not errors:
        return {}
    return {
        "refactor_error_max": max(errors.values()),
        "refactor_error_mean": sum(errors.values()) / len(errors),
    }


# -- ConDU ---------------------------------------------------------------------------------


def stored_experts(store: Store, head: str | None) -> tuple[Source | None, dict[str, Trigger]]:
    """The unified delta and triggers at `head`; a plain commit counts as one task's expert."""
    if head is None:
        return None, {}
    src = open_source(head, store)
    triggers = dict(src.commit.triggers) if src.commit else {}
    if not triggers:
        task = (src.commit.task if src.commit else None) or "base"
        return src, {task: Trigger(1.0, {})}
    return src, triggers


def _condu_into(
    store: Store,
    branch: str,
    head: str | None,
    params: registry.Params,
    new: Sequence[Source],
    message: str,
    warnings: list[str],
    extra: Mapping[str, Any],
    started: float,
) -> MergeOutcome:
    """ConDU continual step: decouple the stored experts, add the new ones, unify, commit."""
    unified, old = stored_experts(store, head)
    check_layout([unified, *new] if unified else list(new), "factors")
    tasks = list(old) + [check_task_name(s.task or Path(s.label).name) for s in new]
    if len(set(tasks)) != len(tasks):
        raise AdbError(f"task names repeat in {tasks}; each ConDU task needs its own name")
    names = list(new[0].tensors)
    warnings = [*warnings, *value_note(names)]
    unifier = Unifier(len(tasks), getattr(params, "scale", "tensor"))
    masks: dict[str, dict[str, str]] = {t: {} for t in tasks}
    entries: dict[str, TensorEntry] = {}
    for name in names:
        deltas = [s.tensors[name] for s in new]
        if unified is not None:
            deltas = [*_decoupled(store, unified, old, name, deltas[0]), *deltas]
        if kind_of(name).is_delta:
            tensor, m = unifier.unify_tensor(name, deltas)
            registry.check_result(name, tensor, deltas[0])
            for t, task in enumerate(tasks):
                masks[task][name] = store.objects.put_mask(m[t].numpy())
        else:  # a value: the tasks' mean and no mask (adapterdb.merging.fullweights)
            tensor = merge_values("emr", deltas, params, kind_of(name), registry.Context(name))
            registry.check_result(name, tensor, deltas[0])
        entries[name] = put_merged(store, (name, tensor))[1]
    scales = unifier.scales()
    manifest = store.put_manifest(entries, new[-1].config)
    commit = Commit(
        manifest=manifest,
        kind="merge",
        parents=merge_parents(head, new),
        task=tasks[-1],
        method="condu",
        params=_params_json(params),
        sources=tuple(s.commit_id or f"folder:{s.label}" for s in new),
        base_model=new[-1].config.get("base_model_name_or_path"),
        triggers={t: Trigger(scales[i], masks[t]) for i, t in enumerate(tasks)},
        stats={"seconds": time.perf_counter() - started},
        message=message or f"condu: unify {len(tasks)} tasks",
        extra={**extra, "tasks": tasks, "objects": _source_objects(new)},
    )
    return MergeOutcome(store.commit(commit, branch, expected=head), {}, warnings)


def _decoupled(
    store: Store, unified: Source, triggers: Mapping[str, Trigger], name: str, like: torch.Tensor
) -> list[torch.Tensor]:
    """Experts 1..t−1 of one tensor rebuilt from the stored unified delta and triggers."""
    if name not in unified.tensors:
        raise MismatchError(
            f"tensor '{name}' is new; ConDU needs every task to adapt the same modules"
        )
    u = unified.tensors[name]
    return [expert_tensor(store, u, trig, name).to(like.dtype) for trig in triggers.values()]


def expert_tensor(store: Store, unified: torch.Tensor, trig: Trigger, name: str) -> torch.Tensor:
    """τ̃_t = λ_t·M_t ⊙ τ_uni for one tensor (a trigger without masks is a plain expert; a
    value, full weight or DoRA magnitude, has no mask: every task gets the stored mean)."""
    if not trig.masks or (name not in trig.masks and not kind_of(name).is_delta):
        return unified
    if name not in trig.masks:
        raise MismatchError(
            f"trigger lacks a mask for tensor '{name}'; the ConDU commit is incomplete"
        )
    mask = torch.from_numpy(store.objects.get_mask(trig.masks[name])).reshape(unified.shape)
    return decouple(unified, mask.unsqueeze(0), [trig.scale])[0]


def decouple_task(store: Store, rev: str, task: str) -> tuple[dict[str, RawTensor], dict[str, Any]]:
    """The expert of `task` rebuilt from a ConDU commit, as raw tensors + PEFT config."""
    src = open_source(rev, store)
    triggers = src.commit.triggers if src.commit else {}
    if task not in triggers:
        known = ", ".join(triggers) or "none (not a ConDU commit)"
        raise AdbError(f"{rev} has no trigger for task '{task}'; its tasks: {known}")
    trig = triggers[task]
    ids = [e.id for e in store.read_manifest(str(src.manifest_id)).tensors.values()]
    store.objects.prefetch([*ids, *trig.masks.values()])  # a lazy clone: this task's, at once
    out = {n: from_torch(expert_tensor(store, src.tensors[n], trig, n)) for n in src.tensors}
    return out, src.config
