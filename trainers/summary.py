"""The numbers `adb run` and `adb report` both show, built in one place so the two agree.

Per method and metric: the mean over task orders with its 95% interval. Per method and
compared metric (ACC, BWT): the paired difference from the baseline order by order. The
baseline is `average`, the merge both papers improve on, when it ran, else `finetune`, their
other reference, else the first method: a choice that does not depend on the order methods
are listed in, so `adb report` (which sees only branches) picks what `adb run` picked. Cells
are strings in percent; `adb run` renders them with rich, `adb report` as markdown.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from adapterdb.stats import Interval, Paired, interval, paired
from adapterdb.trainers.evaluate import Matrix

METRICS = ("ACC", "BWT", "FWT", "A_t", "A_m", "forgetting")
COMPARED = ("ACC", "BWT")
BASELINES = ("average", "finetune")  # in order of preference
# method -> order label -> that order's matrix; methods pair up on the labels they share
Runs = Mapping[str, Mapping[str, Matrix]]
Cells = tuple[list[str], list[list[str]]]  # header, rows


def baseline(methods: Sequence[str]) -> str | None:
    """The first of BASELINES that ran, else the first method; None with fewer than two."""
    if len(methods) < 2:
        return None
    return next((b for b in BASELINES if b in methods), methods[0])


def intervals(runs: Runs) -> dict[str, dict[str, Interval | None]]:
    """method -> metric -> mean and 95% interval over its orders."""
    return {
        method: {k: interval([m.metrics()[k] for m in mats.values()]) for k in METRICS}
        for method, mats in runs.items()
    }


def shared_orders(runs: Runs, method: str, base: str) -> list[str]:
    """The orders both methods ran, in `method`'s order: the pairs of a paired difference."""
    return [o for o in runs[method] if o in runs[base]]


def differences(runs: Runs) -> dict[str, dict[str, Paired | None]]:
    """method -> compared metric -> method − baseline on their shared orders, for every
    method but the baseline (None when a value is missing or no order is shared)."""
    base = baseline(list(runs))
    if base is None:
        return {}
    out: dict[str, dict[str, Paired | None]] = {}
    for method, mats in runs.items():
        if method == base:
            continue
        orders = shared_orders(runs, method, base)
        out[method] = {
            k: paired(
                [mats[o].metrics()[k] for o in orders],
                [runs[base][o].metrics()[k] for o in orders],
            )
            for k in COMPARED
        }
    return out


def flagged(mats: Mapping[str, Matrix]) -> list[dict[str, Any]]:
    """Every step whose expert failed a training health check (trainers/health.py), by order:
    a collapsed run is a bug to look at, not a data point to average silently."""
    return [
        {"order": order, "step": t + 1, "task": m.tasks[t], "checks": checks}
        for order, m in mats.items()
        for t, checks in enumerate(m.flags)
        if checks
    ]


def summary_json(runs: Runs) -> dict[str, Any]:
    """The intervals and paired differences as `adb run --json` reports them."""
    base = baseline(list(runs))
    diffs: dict[str, dict[str, Any]] = {}
    if base is not None:
        diffs = {
            method: {
                k: {"orders": shared_orders(runs, method, base), **p.to_json()} if p else None
                for k, p in row.items()
            }
            for method, row in differences(runs).items()
        }
    return {
        "flagged": {method: flagged(mats) for method, mats in runs.items()},
        "intervals": {
            method: {k: iv.to_json() if iv else None for k, iv in row.items()}
            for method, row in intervals(runs).items()
        },
        "baseline": base,
        "differences": diffs,
    }


# -- tables --------------------------------------------------------------------------------


def results_table(
    runs: Runs,
    zero_shot: Mapping[str, float],
    independent: Mapping[str, float],
    columns: Sequence[str],
) -> Cells:
    """One row per method (mean ± 95% half-width), then the two bounds, averaged over tasks:
    the base model (ACC) and independent experts (ACC, and A_t since each is its own task's
    accuracy right after training)."""
    header = ["method", "orders", *columns, "flagged steps"]
    rows = [
        [method, str(len(mats)), *(ci(row[k]) for k in columns), str(len(flagged(mats)))]
        for (method, mats), row in zip(runs.items(), intervals(runs).values(), strict=True)
    ]
    bounds = {
        "zero-shot (base)": {"ACC": task_mean(zero_shot)},
        "independent experts": {"ACC": task_mean(independent), "A_t": task_mean(independent)},
    }
    for name, values in bounds.items():
        cells = [pct(values[k]) if k in values else "" for k in columns]
        rows.append([name, "", *cells, ""])
    return header, rows


def differences_table(runs: Runs) -> Cells | None:
    """One row per method: its mean difference from the baseline with the 95% interval, and
    on how many orders it was above the baseline; None with a single method."""
    diffs = differences(runs)
    if not diffs:
        return None
    base = baseline(list(runs))
    header = ["method"]
    for k in COMPARED:
        header += [f"{k} − {base}", f"{k} > {base}"]
    rows = []
    for method, row in diffs.items():
        cells = [method]
        for k in COMPARED:
            p = row[k]
            cells += [signed(p), f"{p.positive}/{len(p.diffs)}" if p else "-"]
        rows.append(cells)
    return header, rows


# -- cells (percent) -----------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def ci(iv: Interval | None) -> str:
    """'87.1 ± 2.1' (mean ± 95% half-width, in percent); just the mean for one order."""
    return "-" if iv is None else pm(iv.mean, iv.half_width)


def signed(p: Paired | None) -> str:
    """'+1.2 [−0.3, +2.7]' (mean difference and its 95% interval, in points)."""
    if p is None:
        return "-"
    iv = p.interval
    if iv.low is None or iv.high is None:
        return f"{100 * iv.mean:+.1f}"
    return f"{100 * iv.mean:+.1f} [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}]"


def pm(mean: float | None, std: float | None) -> str:
    """'87.1 ± 2.1' in percent; '-' when missing; no '±' part when std is None."""
    if mean is None:
        return "-"
    return pct(mean) + ("" if std is None else f" ± {100 * std:.1f}")


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and population std over task orders; (None, None) when any value is missing."""
    if not values or any(v is None for v in values):
        return None, None
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0


def task_mean(values: Mapping[str, float]) -> float | None:
    """A bound's mean over the tasks it is known for."""
    return statistics.fmean(values.values()) if values else None


def order_title(label: str) -> str:
    """'order 0' for `adb run`'s numbered orders; any other branch keeps its name."""
    return f"order {label}" if label.isdigit() else label
