"""Continual-run verbs: run (methods x task orders over a sequence) and report (plots)."""

from __future__ import annotations

import statistics
from importlib import resources
from pathlib import Path

import typer
from rich.table import Table

from adapterdb.cli.history import JSON
from adapterdb.cli.output import console, emit_json
from adapterdb.cli.train import THREADS, set_threads
from adapterdb.errors import AdbError
from adapterdb.storage.store import Store

COLUMNS = ("ACC", "BWT", "FWT", "A_t", "A_m")


def sequence_path(spec: str) -> Path:
    """A sequence file, or the name of one bundled with adb (`split-fashion-mnist`)."""
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
        ..., help="sequence.yaml, or a bundled name: split-fashion-mnist"
    ),
    methods: str = typer.Option(
        "pam,average,ties,magmax,condu,finetune", "--methods", help="Comma-separated."
    ),
    orders: int = typer.Option(
        1, "--orders", help="Task orders: the given one plus N-1 seeded shuffles."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffles."),
    top_k: int = typer.Option(4, "--top-k", help="ConDU routing: experts per input."),
    threads: int = THREADS,
    as_json: bool = JSON,
) -> None:
    """Train -> merge -> evaluate every task, per method and order; print the paper's table."""
    from adapterdb.trainers.config import load_sequence
    from adapterdb.trainers.report import pm
    from adapterdb.trainers.sequence import run_sequence

    store = Store.find()
    seq = load_sequence(sequence_path(sequence))
    set_threads(threads)
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    say = (lambda _msg: None) if as_json else (lambda msg: console.print(msg, markup=False))
    result = run_sequence(store, seq, chosen, orders, seed, top_k, say)
    if as_json:
        emit_json(result.to_json())
        return
    table = Table(
        title=f"{seq.name or sequence}: {len(seq.tasks)} tasks, {orders} order(s); mean ± std in %"
    )
    table.add_column("method")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for method, row in result.table().items():
        table.add_row(method, *(pm(mean, std or None) for mean, std in (row[c] for c in COLUMNS)))
    zs = statistics.fmean(result.zero_shot.values())
    ind = statistics.fmean(result.independent.values()) if result.independent else None
    table.add_row("zero-shot (base)", pm(zs, None), "", "", "", "")
    table.add_row("independent experts", pm(ind, None), "", "", pm(ind, None), "")
    console.print(table)


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
