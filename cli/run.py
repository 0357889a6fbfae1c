"""Continual-run verbs: run (methods x task orders over a sequence) and report (plots)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from adapterdb.cli.checks import at_least, name_list
from adapterdb.cli.history import JSON
from adapterdb.cli.output import console, emit_json, status_console
from adapterdb.cli.train import THREADS, set_threads
from adapterdb.errors import AdbError
from adapterdb.storage.store import Store

if TYPE_CHECKING:
    from adapterdb.trainers.summary import Cells

COLUMNS = ("ACC", "BWT", "FWT", "A_t", "A_m")


def sequence_path(spec: str) -> Path:
    """A sequence file, or the name of one bundled with adb (`split-fashion-mnist`, ...)."""
    path = Path(spec)
    if path.is_file():
        return path
    bundled = resources.files("adapterdb.trainers") / "sequences" / f"{spec}.yaml"
    if bundled.is_file():
        return Path(str(bundled))
    names = sorted(
        p.name[:-5] for p in (resources.files("adapterdb.trainers") / "sequences").iterdir()
    )
    raise AdbError(f"{spec} is neither a sequence file nor a bundled one ({', '.join(names)})")


def run(
    sequence: str = typer.Argument(
        ..., help="sequence.yaml, or a bundled name: split-fashion-mnist, split-wordnet"
    ),
    methods: str = typer.Option(
        "pam,average,ties,magmax,condu,finetune", "--methods", help="Comma-separated."
    ),
    orders: int = typer.Option(
        1, "--orders", help="Task orders: the given one plus N-1 seeded shuffles."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffles."),
    top_k: int = typer.Option(4, "--top-k", help="ConDU routing: experts per input."),
    jobs: int = typer.Option(
        1, "--jobs", "-j", help="Worker processes, one (method, order) branch each."
    ),
    threads: int = THREADS,
    as_json: bool = JSON,
) -> None:
    """Train -> merge -> evaluate every task, per method and order; print the paper's table."""
    from adapterdb.trainers.config import load_sequence
    from adapterdb.trainers.sequence import run_sequence
    from adapterdb.trainers.summary import differences_table, results_table

    chosen = name_list("--methods", methods, "method")
    at_least("--orders", orders, 1, "the number of task orders")
    at_least("--top-k", top_k, 1, "the experts routed to per input")
    at_least("--jobs", jobs, 1, "the number of worker processes")
    at_least("--threads", threads, 1, "the number of CPU threads")
    store = Store.find()
    seq = load_sequence(sequence_path(sequence))
    set_threads(threads)
    out = status_console(as_json)  # a 35-minute run must not be silent with --json

    def say(msg: str) -> None:
        out.print(msg, markup=False, soft_wrap=True)

    result = run_sequence(store, seq, chosen, orders, seed, top_k, say, jobs=jobs)
    if as_json:
        emit_json(result.to_json())
        return
    runs = result.runs()
    spread = "mean ± 95% CI half-width" if orders > 1 else "one order: no interval"
    title = f"{seq.name or sequence}: {len(seq.tasks)} tasks, {orders} order(s); {spread}, in %"
    console.print(
        rich_table(title, results_table(runs, result.zero_shot, result.independent, COLUMNS))
    )
    diffs = differences_table(runs)
    if diffs:
        title = "Paired difference per order, in points: mean [95% CI]; orders where it was > 0"
        console.print(rich_table(title, diffs))


def rich_table(title: str, cells: Cells) -> Table:
    """A summary table (header, rows of cells) as rich prints it: names left, numbers right."""
    header, rows = cells
    out = Table(title=title)
    out.add_column(header[0])
    for name in header[1:]:
        out.add_column(name, justify="right")
    for row in rows:
        out.add_row(*row)
    return out


def report(
    branches: list[str] = typer.Argument(
        None, help="Branches (default: every run/<method>/<order>)."
    ),
    out: Path = typer.Option(..., "-o", "--output", help="Folder for report.md and the PNG plots."),
) -> None:
    """Plots of forgetting over time, accuracy matrices and ACC per order, plus report.md."""
    from adapterdb.trainers.report import write_report

    path = write_report(Store.find(), branches or [], out)
    console.print(f"wrote {path}", markup=False)


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(report)
