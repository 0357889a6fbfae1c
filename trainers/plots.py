"""The figures of `adb report`, one PNG each.

Built on `matplotlib.figure.Figure` directly, not pyplot: no global backend or figure state,
so drawing works headless and leaves the caller's matplotlib alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from adapterdb.trainers.evaluate import Matrix
from adapterdb.trainers.summary import Runs, order_title

DPI = 120
NAN = float("nan")


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


def forgetting_plot(runs: Runs, path: Path) -> None:
    """Per method, mean forgetting after each step, shaded between the lowest and highest
    order: an order effect shows up as a wide band."""
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    steps = 0
    for method, mats in runs.items():
        curves = [forgetting_curve(m) for m in mats.values()]
        longest = max(len(c) for c in curves)
        per_step = [
            [c[t] for c in curves if t < len(c) and c[t] is not None] for t in range(longest)
        ]
        steps = max(steps, len(per_step))
        xs = range(1, len(per_step) + 1)
        mean = [100 * statistics.fmean(v) if v else NAN for v in per_step]
        (line,) = ax.plot(xs, mean, marker="o", label=f"{method} ({len(curves)} orders)")
        if len(curves) > 1:
            low = [100 * min(v) if v else NAN for v in per_step]
            high = [100 * max(v) if v else NAN for v in per_step]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xticks(range(1, steps + 1))
    ax.set_xlabel("step (tasks learned)")
    ax.set_ylabel("avg. forgetting on seen tasks (points)")
    ax.set_title("Forgetting over time (lower is better)\nline: mean over orders; band: min–max")
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=DPI)


def acc_plot(runs: Runs, zero_shot: float | None, independent: float | None, path: Path) -> None:
    """ACC of every method on every order (one dot each, side by side), with the two bounds as
    horizontal lines; the x ticks are the orders, named by their tasks in training order."""
    orders = _order_labels(runs)
    fig = Figure(figsize=(max(7.0, 1.3 * len(orders) + 4.0), 4.8), layout="constrained")
    ax = fig.subplots()
    spread = 0.6 / max(len(runs), 1)
    for g, (method, mats) in enumerate(runs.items()):
        offset = (g - (len(runs) - 1) / 2) * spread
        points = [
            (x + offset, 100 * acc)
            for x, o in enumerate(orders)
            if o in mats and (acc := mats[o].metrics()["ACC"]) is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "o", label=method)
    for value, name, style in (
        (zero_shot, "zero-shot (base)", "--"),
        (independent, "independent experts", ":"),
    ):
        if value is not None:
            ax.axhline(100 * value, color="0.3", linestyle=style, label=name)
    ax.set_xticks(range(len(orders)), [_order_name(runs, o) for o in orders], fontsize=7)
    ax.set_xlim(-0.5, len(orders) - 0.5)
    ax.set_xlabel("task order")
    ax.set_ylabel("ACC (%)")
    ax.set_title("Final accuracy per task order (order sensitivity)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=DPI)


def matrix_plot(method: str, mats: Mapping[str, Matrix], path: Path) -> None:
    """R[t][i] of every order of one method, one heatmap each, tasks in training order."""
    cols = min(3, len(mats))
    rows = math.ceil(len(mats) / cols)
    size = max(len(m.tasks) for m in mats.values())
    fig = Figure(
        figsize=(cols * (0.75 * size + 1.8) + 0.8, rows * (0.6 * size + 2.4)), layout="constrained"
    )
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, (label, m) in zip(axes, mats.items(), strict=False):
        data = [[NAN if v is None else 100 * v for v in row] for row in m.R]
        image = ax.imshow(data, vmin=0, vmax=100, cmap="viridis")
        for t, row in enumerate(data):
            for i, v in enumerate(row):
                if not math.isnan(v):
                    color = "w" if v < 60 else "k"
                    ax.text(i, t, f"{v:.0f}", ha="center", va="center", color=color, fontsize=8)
        ax.set_xticks(range(len(m.tasks)), m.tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(m.tasks)), [f"after {t}" for t in m.tasks], fontsize=8)
        ax.set_title(order_title(label), fontsize=9)
    for ax in axes[len(mats) :]:
        ax.set_visible(False)
    fig.suptitle(f"{method}: accuracy R[t][i] (%) on task i after step t", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(mats)]), shrink=0.8)
    fig.savefig(path, dpi=DPI)


def _order_labels(runs: Runs) -> list[str]:
    """Every order label any method ran, first-seen first."""
    return list(dict.fromkeys(o for mats in runs.values() for o in mats))


def _order_name(runs: Runs, label: str) -> str:
    """'order 0' and its tasks, one per line, as the first method that ran it trained them."""
    tasks: Sequence[str] = next(mats[label].tasks for mats in runs.values() if label in mats)
    return "\n".join([order_title(label), *tasks])
