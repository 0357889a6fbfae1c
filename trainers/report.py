"""`adb report`: plots and a markdown table of continual runs, from the store's records.

Branches named `run/<method>/<order>` (what `adb run` writes) are grouped by method and paired
across methods by order; any other branch is its own group. The table is `adb run`'s
(trainers/summary.py: mean ± 95% interval over orders, paired differences from the
baseline), and the bounds are read from the store as `adb run` finds them: zero-shot from the
base model's eval records, independent experts by their task files' fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from adapterdb.errors import AdbError
from adapterdb.storage.store import Store
from adapterdb.trainers import plots
from adapterdb.trainers.evaluate import Matrix, accuracy_matrix, lineage_tasks
from adapterdb.trainers.sequence import METHODS, known_independent
from adapterdb.trainers.summary import (
    METRICS,
    Cells,
    Runs,
    baseline,
    differences_table,
    order_title,
    results_table,
    task_mean,
)


def group_of(branch: str) -> str:
    parts = branch.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "run" else branch


def order_of(branch: str) -> str:
    """The order label pairing a branch with other methods' runs of the same task order."""
    return branch.rsplit("/", 1)[1] if group_of(branch) != branch else branch


def run_branches(store: Store) -> list[str]:
    """Every `run/<method>/<order>`: methods in `adb run`'s default order, orders by number
    (run/x/10 after run/x/9)."""
    found = [b for b in store.branches() if b.startswith("run/") and group_of(b) != b]
    return sorted(found, key=lambda b: (*_rank(group_of(b)), *_rank(order_of(b))))


def collect(store: Store, branches: Sequence[str]) -> dict[str, dict[str, Matrix]]:
    """method -> order label -> accuracy matrix (ConDU's evaluated with its routing)."""
    groups: dict[str, dict[str, Matrix]] = {}
    for b in branches:
        routing = "condu" if group_of(b) == "condu" else "none"
        groups.setdefault(group_of(b), {})[order_of(b)] = accuracy_matrix(store, b, routing)
    return groups


def bounds(
    store: Store, branches: Sequence[str], runs: Runs
) -> tuple[dict[str, float], dict[str, float]]:
    """(zero-shot, independent expert) accuracy per task, for the tasks the store holds them
    for; nothing is trained or evaluated here."""
    zero_shot = {
        task: value
        for mats in runs.values()
        for m in mats.values()
        for task, value in zip(m.tasks, m.zero_shot, strict=True)
        if value is not None
    }
    tasks = {t.name: t for b in branches for t in lineage_tasks(store, b)}
    independent = {
        name: value
        for name, task in tasks.items()
        if (value := known_independent(store, task)) is not None
    }
    return zero_shot, independent


def write_report(store: Store, branches: Sequence[str], out: Path) -> Path:
    """PNG plots + report.md in `out`; returns the report's path."""
    branches = list(branches) or run_branches(store)
    if not branches:
        raise AdbError(
            "no run/<method>/<order> branches here; run `adb run` first or name branches"
        )
    runs = collect(store, branches)
    zero_shot, independent = bounds(store, branches, runs)
    out.mkdir(parents=True, exist_ok=True)
    plots.forgetting_plot(runs, out / "forgetting.png")
    plots.acc_plot(runs, task_mean(zero_shot), task_mean(independent), out / "acc-per-order.png")
    heatmaps = []
    for method, mats in runs.items():
        name = f"matrix-{method.replace('/', '_')}.png"
        plots.matrix_plot(method, mats, out / name)
        heatmaps.append(name)
    path = out / "report.md"
    path.write_text(report_markdown(runs, zero_shot, independent, heatmaps))
    return path


def report_markdown(
    runs: Runs,
    zero_shot: Mapping[str, float],
    independent: Mapping[str, float],
    heatmaps: Sequence[str],
) -> str:
    """The tables `adb run` prints, the orders, and the figures."""
    orders = {o: m.tasks for mats in runs.values() for o, m in mats.items()}
    lines = [
        "# Continual-learning report",
        "",
        "Accuracy in %: mean ± half-width of the 95% Student-t interval over task orders "
        "(just the mean for one order). Bounds averaged over tasks.",
        "",
        markdown(results_table(runs, zero_shot, independent, METRICS)),
        "",
    ]
    diffs = differences_table(runs)
    if diffs:
        lines += [
            f"Paired difference from {baseline(list(runs))}, order by order, in points: "
            "mean [95% interval], and on how many orders it was above zero.",
            "",
            markdown(diffs),
            "",
        ]
    lines += ["Task orders:", ""]
    lines += [f"- {order_title(o)}: {' → '.join(tasks)}" for o, tasks in orders.items()]
    lines += [
        "",
        "![forgetting over time](forgetting.png)",
        "",
        "![ACC per order](acc-per-order.png)",
    ]
    lines += ["", *(f"![{h}]({h})" for h in heatmaps)]
    return "\n".join(lines) + "\n"


def markdown(cells: Cells) -> str:
    header, rows = cells
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _rank(name: str) -> tuple[int, str]:
    """Sort key: a method by its place in METHODS, an order by its number, others by name."""
    if name in METHODS:
        return METHODS.index(name), ""
    return (int(name), "") if name.isdigit() else (len(METHODS), name)
