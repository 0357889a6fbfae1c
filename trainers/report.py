"""`adb report`: plots and a markdown table of continual runs, from the store's records.

Branches named `run/<method>/<order>` (what `adb run` writes) are grouped by method; any other
branch is its own group. Headless matplotlib (Agg).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from adapterdb.errors import AdbError
from adapterdb.storage.store import Store
from adapterdb.trainers.evaluate import Matrix, accuracy_matrix

METRICS = ("ACC", "BWT", "FWT", "A_t", "A_m", "forgetting")


def group_of(branch: str) -> str:
    parts = branch.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "run" else branch


def run_branches(store: Store) -> list[str]:
    return [b for b in store.branches() if b.startswith("run/") and group_of(b) != b]


def collect(store: Store, branches: Sequence[str]) -> dict[str, list[tuple[str, Matrix]]]:
    groups: dict[str, list[tuple[str, Matrix]]] = {}
    for b in branches:
        routing = "condu" if group_of(b) == "condu" else "none"
        groups.setdefault(group_of(b), []).append((b, accuracy_matrix(store, b, routing)))
    return groups


def forgetting_curve(m: Matrix) -> list[float | None]:
    """Average forgetting on seen tasks after each step t: mean_{i<t} (R[i][i] − R[t][i])."""
    out: list[float | None] = []
    for t in range(len(m.R)):
        drops = [
            m.R[i][i] - m.R[t][i]
            for i in range(t)
            if m.R[i][i] is not None and m.R[t][i] is not None
        ]
        out.append(statistics.fmean(drops) if drops else (0.0 if t == 0 else None))
    return out


def write_report(store: Store, branches: Sequence[str], out: Path) -> Path:
    """PNG plots + report.md in `out`; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    branches = list(branches) or run_branches(store)
    if not branches:
        raise AdbError(
            "no run/<method>/<order> branches here; run `adb run` first or name branches"
        )
    groups = collect(store, branches)
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, mats in groups.items():
        curves = [forgetting_curve(m) for _, m in mats]
        steps = range(1, len(curves[0]) + 1)
        mean = [_mean([c[t] for c in curves]) for t in range(len(curves[0]))]
        ax.plot(
            steps,
            [100 * v if v is not None else float("nan") for v in mean],
            marker="o",
            label=method,
        )
    ax.set_xticks(range(1, max(len(m.R) for mats in groups.values() for _, m in mats) + 1))
    ax.set_xlabel("step (tasks learned)")
    ax.set_ylabel("avg. forgetting on seen tasks (points)")
    ax.set_title("Forgetting over time (lower is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "forgetting.png", dpi=120)
    plt.close(fig)

    heatmaps = []
    for method, mats in groups.items():
        branch, m = mats[0]
        fig, ax = plt.subplots(figsize=(1.1 * len(m.tasks) + 2, 0.8 * len(m.tasks) + 1.5))
        data = [[float("nan") if v is None else 100 * v for v in row] for row in m.R]
        im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis")
        for t, row in enumerate(data):
            for i, v in enumerate(row):
                if v == v:
                    ax.text(
                        i,
                        t,
                        f"{v:.0f}",
                        ha="center",
                        va="center",
                        color="w" if v < 60 else "k",
                        fontsize=8,
                    )
        ax.set_xticks(range(len(m.tasks)), m.tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(m.tasks)), [f"after {t}" for t in m.tasks], fontsize=8)
        ax.set_title(f"{method}: R[t][i] (%), {branch}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        name = f"matrix-{method}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        heatmaps.append(name)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(len(groups), 1)
    for g, (method, mats) in enumerate(groups.items()):
        accs = [m.metrics()["ACC"] for _, m in mats]
        xs = [o + g * width for o in range(len(accs))]
        ax.bar(xs, [100 * (a or 0) for a in accs], width, label=method)
    ax.set_xlabel("task order")
    ax.set_ylabel("ACC (%)")
    ax.set_title("Final accuracy per task order (order sensitivity)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "acc-per-order.png", dpi=120)
    plt.close(fig)

    lines = ["# Continual-learning report", "", table_markdown(groups), ""]
    lines += [
        "![forgetting over time](forgetting.png)",
        "",
        "![ACC per order](acc-per-order.png)",
        "",
    ]
    lines += [f"![{h}]({h})" for h in heatmaps]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def table_markdown(groups: dict[str, list[tuple[str, Matrix]]]) -> str:
    head = "| method | orders | " + " | ".join(METRICS) + " |"
    rows = [head, "|" + " --- |" * (len(METRICS) + 2)]
    for method, mats in groups.items():
        cells = []
        for k in METRICS:
            mean, std = mean_std([m.metrics()[k] for _, m in mats])
            cells.append(pm(mean, std if len(mats) > 1 else None))
        rows.append(f"| {method} | {len(mats)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and population std over task orders; (None, None) when any value is missing."""
    if not values or any(v is None for v in values):
        return None, None
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0


def pm(mean: float | None, std: float | None) -> str:
    """'87.1 ± 2.1' in percent; '-' when missing; no '±' part when std is None."""
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")
