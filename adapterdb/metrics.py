"""Continual-learning metrics from the accuracy matrix R (DESIGN.md, 0-based here).

R[t][i] is the accuracy on task i after step t (for merging methods: after the merge of step
t), T = len(R) tasks, one step per task. Rows may be shorter than T (tasks not evaluated yet)
and entries may be None; a metric that needs a missing entry is None, as is a metric that is
undefined for T = 1 (BWT, FWT, forgetting compare a task with a later step).

- ACC = mean_i R[T-1][i]
- BWT = mean_{i<T-1} (R[T-1][i] − R[i][i])
- FWT = mean_{1<=i<T} (R[i-1][i] − zero_shot[i])
- A_t = mean_i trained[i], the accuracy on task i right after training it, before merging
  (R cannot supply it for merging methods; for sequential fine-tuning pass the diagonal of R)
- A_m = mean_i R[i][i], right after the merge of step i
- forgetting = mean_{i<T-1} (max_{i<=k<T-1} R[k][i] − R[T-1][i]). DESIGN.md writes max over
  all k < T-1; the rows k < i are before task i was learned, so they measure forward transfer,
  not forgetting (Chaudhry et al., 2018 start at k = i), and they are often not evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapterdb.errors import AdbError

Acc = float | None


def cl_metrics(
    R: Sequence[Sequence[Acc]],
    zero_shot: Sequence[Acc] | None = None,
    trained: Sequence[Acc] | None = None,
) -> dict[str, float | None]:
    """ACC, BWT, FWT, A_t, A_m and forgetting of one run (keys as named in DESIGN.md)."""
    T = len(R)
    for name, seq in (("zero_shot", zero_shot), ("trained", trained)):
        if seq is not None and len(seq) != T:
            raise AdbError(f"{name} has {len(seq)} entries for {T} tasks; give one per task")
    for t, row in enumerate(R):
        if len(row) > T:
            raise AdbError(f"accuracy row {t} has {len(row)} entries for {T} tasks")

    def r(t: int, i: int) -> Acc:
        return R[t][i] if i < len(R[t]) else None

    last, earlier = T - 1, range(T - 1)
    return {
        "ACC": _mean([r(last, i) for i in range(T)]),
        "BWT": _mean([_sub(r(last, i), r(i, i)) for i in earlier]),
        "FWT": _mean([_sub(r(i - 1, i), zero_shot[i]) for i in range(1, T)] if zero_shot else []),
        "A_t": _mean(list(trained or [])),
        "A_m": _mean([r(i, i) for i in range(T)]),
        "forgetting": _mean(
            [_sub(_max([r(k, i) for k in range(i, last)]), r(last, i)) for i in earlier]
        ),
    }


def _mean(values: list[Acc]) -> float | None:
    """Mean, or None when there is nothing to average or any entry is missing."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _sub(a: Acc, b: Acc) -> Acc:
    return None if a is None or b is None else a - b


def _max(values: list[Acc]) -> Acc:
    return None if any(v is None for v in values) else max(values)  # type: ignore[type-var]
