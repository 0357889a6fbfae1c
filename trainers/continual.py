"""Whole-layer merge methods (`adapterdb.merging.layers`: OPCM, continual TA/TIES, TSV, Iso-C,
KnOTS, DOP) as store workflows: LoRA pairs in as `Term`s, rank-r LoRA factors out, and the
methods' per-layer state kept in the store so a branch continues from any commit.

A continual method's state is what it returned for the previous task; a set method's is the
task terms of every task merged so far (stacked factors), so each step re-merges all of them
with the new one. Either is stored as a manifest of tensors named `<module>::<key>` (scalars
as 0-d float64 tensors; metadata: the method and how many tasks it holds), referenced from
the merge commit's `extra.objects.state`, which fsck and gc follow. The output is
`LowRank.factors(r)`, r the experts' rank by default (so the global keeps the shape every tool
expects) or `--space product --rank R`; the refactoring error goes in the commit's stats.
Tensors that are not LoRA pairs are merged as weights (`adapterdb.merging.fullweights`): the
running mean over the tasks.

`merge --into` on a head without state: a commit that holds one task's adapter (an import,
a trained expert) is task 1 and the new sources follow; a merge by another method, or a state
of another method, is refused (its tasks cannot be recovered from it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from adapterdb.adapter import to_torch, torch_dtype
from adapterdb.errors import AdbError
from adapterdb.lora import LoraPair, lora_pairs
from adapterdb.merging.basic import AverageParams
from adapterdb.merging.fullweights import merge_values
from adapterdb.merging.layers import (
    LAYER_METHODS,
    LayerMethod,
    LowRank,
    State,
    Term,
    output_error,
)
from adapterdb.merging.registry import Context, Params, check_result
from adapterdb.storage.commits import TensorEntry
from adapterdb.storage.store import Store
from adapterdb.tensorkinds import kind_of
from adapterdb.trainers.merge import (
    MergeResult,
    Source,
    check_layout,
    lora_output,
    lora_term,
    output_ranks,
    put_merged,
)

SEP = "::"  # state tensor names: <module>::<key>
Keep = Callable[[str, State], None]


def term_of(source: Source, pair: LoraPair) -> Term:
    """One source's update of one LoRA layer (a conv LoRA flattened to 2-D)."""
    a, b, scale = lora_term(source, pair, 1.0)
    return Term(a.flatten(1), b.flatten(1), scale)


def stack(terms: Sequence[Term]) -> State:
    """A set method's state: the task terms' factors side by side (float32 holds fp32, bf16
    and fp16 inputs exactly), their scales and ranks."""
    return {
        "a": torch.cat([t.a.float() for t in terms]),
        "b": torch.cat([t.b.float() for t in terms], 1),
        "scale": torch.tensor([t.scale for t in terms], dtype=torch.float64),
        "rank": torch.tensor([t.a.shape[0] for t in terms], dtype=torch.float64),
    }


def unstack(state: Mapping[str, torch.Tensor] | None) -> list[Term]:
    if state is None:
        return []
    ranks = [int(r) for r in state["rank"].tolist()]
    a_parts, b_parts = state["a"].split(ranks), state["b"].split(ranks, 1)
    scales = state["scale"].tolist()
    return [Term(a, b, s) for a, b, s in zip(a_parts, b_parts, scales, strict=True)]


def fold(
    m: LayerMethod, params: Params, state: State | None, tasks: int, terms: Sequence[Term]
) -> tuple[LowRank, State]:
    """Add `terms` in order to a layer whose state holds `tasks` tasks: a continual method
    steps once per term (t = tasks + 1, …); a set method merges all tasks once."""
    if m.kind == "set":
        every = [*unstack(state), *terms]
        return m.fn(every, params), stack(every)
    merged = None
    for i, term in enumerate(terms):
        merged, state = m.fn(state, term, tasks + i + 1, params)
    assert merged is not None and state is not None
    return merged, state


def layer_stream(
    method: str,
    params: Params,
    tasks_in: Sequence[Source],
    values_in: Sequence[tuple[Source, float]],
    prior: Callable[[str], State | None],
    tasks: int,
    rank: int | None,
    keep: Keep,
) -> MergeResult:
    """Add the tasks `tasks_in` (in order) to layers holding `tasks` tasks, whose state is
    `prior(module)`, handing each layer's new state to `keep`. Values (tensors that are not
    LoRA factors) are the weighted mean of `values_in`."""
    m = LAYER_METHODS[method]
    first = tasks_in[0]
    pairs, rest = lora_pairs(first.layout)
    layer_rank, config, notes = output_ranks(tasks_in, rank)
    errors: dict[str, float] = {}
    mean = AverageParams(weights=tuple(w for _, w in values_in))

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name in rest:
            tensors = [s.tensors[name] for s, _ in values_in]
            out = merge_values("average", tensors, mean, kind_of(name), Context(name))
            yield name, check_result(name, out, tensors[0])
        for pair in pairs:
            terms = [term_of(s, pair) for s in tasks_in]
            merged, state = fold(m, params, prior(pair.module), tasks, terms)
            keep(pair.module, state)
            a, b, error = merged.factors(layer_rank[pair.module])
            errors[pair.module] = output_error(error, state)
            a_shape, b_shape = first.layout[pair.a][1], first.layout[pair.b][1]
            a = a.reshape(a.shape[0], *a_shape[1:])
            b = b.reshape(b.shape[0], b.shape[1], *b_shape[2:])
            dtype = torch_dtype(first.layout[pair.a][0])
            yield from lora_output(pair, a, b, dtype, config, layer_rank[pair.module])

    return MergeResult(stream(), config, errors, notes)


def layer_merge(
    method: str, params: Params, sources: Sequence[Source], rank: int | None
) -> MergeResult:
    """A standalone merge: a set method merges all sources, a continual one folds them in
    order (task 1 first); nothing is stored."""
    check_layout(sources, "product")
    values = [(s, 1.0) for s in sources]
    return layer_stream(method, params, sources, values, lambda _: None, 0, rank, lambda *_: None)


def layer_into(
    store: Store,
    head: Source | None,
    method: str,
    params: Params,
    new: Sequence[Source],
    rank: int | None,
) -> MergeResult:
    """The continual step on a branch whose head is `head`: continue from the state it holds
    (or start from its adapter as task 1, see the module doc); once the output is consumed,
    the new state's manifest is in `result.objects["state"]`."""
    check_layout([*([head] if head is not None else []), *new], "product")
    states, tasks = stored_state(store, head, method)
    if states is None:  # an empty branch, or a head holding one task: every source is a task
        tasks_in = [*([head] if head is not None else []), *new]
        values_in = [(s, 1.0) for s in tasks_in]
    else:  # the head is the running merge of `tasks` tasks: its values weigh that much
        assert head is not None
        tasks_in, values_in = list(new), [(head, float(tasks)), *((s, 1.0) for s in new)]
    entries: dict[str, TensorEntry] = {}

    def keep(module: str, state: State) -> None:
        for key, tensor in state.items():
            name = f"{module}{SEP}{key}"
            entries[name] = put_merged(store, (name, tensor.contiguous()))[1]

    def prior(module: str) -> State | None:
        if states is None:
            return None
        return {key: to_torch(store.objects.get_tensor(e.id)) for key, e in states[module].items()}

    result = layer_stream(method, params, tasks_in, values_in, prior, tasks, rank, keep)
    meta = {"method": method, "tasks": str(tasks + len(tasks_in))}
    merged = result.tensors

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        yield from merged
        result.objects["state"] = store.put_manifest(entries, metadata=meta)

    result.tensors = stream()
    return result


def stored_state(
    store: Store, head: Source | None, method: str
) -> tuple[dict[str, dict[str, TensorEntry]] | None, int]:
    """The state `head` holds for `method`, by layer (None where it holds one task's adapter)
    and how many tasks it holds; AdbError where the head cannot continue with `method`."""
    if head is None or head.commit is None:
        return None, 0
    commit = head.commit
    sid = commit.extra.get("objects", {}).get("state")
    if sid is None:
        if commit.kind != "merge":
            return None, 0
        raise AdbError(
            f"{head.label} is a {commit.method} merge, which keeps no {method} state; start "
            f"{method} on a branch from a commit holding one task (adb branch NAME REV) or "
            f"one merged with {method}"
        )
    manifest = store.read_manifest(sid)
    if manifest.metadata.get("method") != method:
        held = manifest.metadata.get("method")
        raise AdbError(
            f"{head.label} holds {held} state, not {method}'s; continue it with --method "
            f"{held}, or start {method} on a new branch"
        )
    states: dict[str, dict[str, TensorEntry]] = {}
    for name, entry in manifest.tensors.items():
        module, _, key = name.rpartition(SEP)
        states.setdefault(module, {})[key] = entry
    return states, int(manifest.metadata.get("tasks", "0"))
