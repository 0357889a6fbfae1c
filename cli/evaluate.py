"""Evaluation verbs: eval (accuracy of a revision; the branch's accuracy matrix and metrics)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from adapterdb.cli.checks import at_least, one_of
from adapterdb.cli.history import JSON
from adapterdb.cli.output import console, emit_json, fmt, short
from adapterdb.cli.train import THREADS, set_threads
from adapterdb.errors import AdbError
from adapterdb.storage.store import Store

METRICS = ("ACC", "BWT", "FWT", "A_t", "A_m", "forgetting")


def eval_(
    rev: str = typer.Argument("HEAD", help="Revision (or, with --metrics, branch)."),
    tasks: list[Path] = typer.Option(
        [], "--tasks", "-t", help="Task files (default: the revision's lineage)."
    ),
    routing: str = typer.Option(
        "none", "--routing", help="none, or condu (task id unknown: top-K experts)."
    ),
    top_k: int = typer.Option(
        None, "--top-k", help="ConDU routing: experts per input (default 4)."
    ),
    metrics: bool = typer.Option(
        False, "--metrics", help="Print the branch's accuracy matrix and CL metrics."
    ),
    zero_shot: bool = typer.Option(
        False, "--zero-shot", help="Also measure the base model (for FWT)."
    ),
    threads: int = THREADS,
    as_json: bool = JSON,
    more_tasks: list[Path] = typer.Argument(
        None, help="More task files: `--tasks a.yaml b.yaml` reads b.yaml from here."
    ),
) -> None:
    """Accuracy of a revision on each task, recorded in the store; or the branch's metrics."""
    from adapterdb.trainers import evaluate as ev
    from adapterdb.trainers.config import load_task

    one_of("--routing", routing, ("none", "condu"))
    at_least("--top-k", top_k, 1, "the experts routed to per input")
    at_least("--threads", threads, 1, "the number of CPU threads")
    if top_k is not None and routing != "condu":
        raise AdbError("--top-k only applies to --routing condu; drop it or add --routing condu")
    if metrics and (tasks or more_tasks or zero_shot):
        raise AdbError(
            "--metrics prints the accuracy matrix already recorded; it takes no --tasks or "
            "--zero-shot (run `adb eval REV --tasks ...` first)"
        )
    store = Store.find()
    set_threads(threads)
    if metrics:
        return _print_matrix(
            ev.accuracy_matrix(store, rev, None if routing == "none" else routing), as_json
        )
    files = [*tasks, *(more_tasks or [])]
    configs = [load_task(t) for t in files] or ev.lineage_tasks(store, rev)
    evaluator = ev.Evaluator()
    with console.status(f"evaluating {rev} on {len(configs)} task(s)", spinner="dots"):
        result = ev.evaluate(store, rev, configs, routing, top_k or 4, evaluator)
        base = ev.zero_shot(store, configs, evaluator) if zero_shot else {}
    if as_json:
        emit_json(
            {
                "commit": result.commit_id,
                "record": result.record_id,
                "routing": routing,
                "accuracy": result.accuracy,
                "zero_shot": base,
                **result.details,
            }
        )
        return
    table = Table(box=None, pad_edge=False, title=f"{short(result.commit_id)} (routing {routing})")
    table.add_column("task")
    table.add_column("accuracy", justify="right")
    if base:
        table.add_column("zero-shot", justify="right")
    for task, acc in result.accuracy.items():
        table.add_row(task, fmt(acc), *([fmt(base.get(task))] if base else []))
    console.print(table)
    console.print(f"recorded as {short(result.record_id)} on refs/evals/{short(result.commit_id)}")


def _print_matrix(matrix: object, as_json: bool) -> None:
    from adapterdb.trainers.evaluate import Matrix

    assert isinstance(matrix, Matrix)
    if as_json:
        emit_json(matrix.to_json())
        return
    table = Table(box=None, pad_edge=False, title="R\\[t]\\[i]: accuracy on task i after step t")
    table.add_column("after step")
    for task in matrix.tasks:
        table.add_column(task, justify="right")
    for t, row in enumerate(matrix.R):
        table.add_row(f"{t + 1}: {matrix.tasks[t]}", *(fmt(v, 3) for v in row))
    table.add_row("A_t (expert)", *(fmt(v, 3) for v in matrix.trained))
    table.add_row("zero-shot", *(fmt(v, 3) for v in matrix.zero_shot))
    console.print(table)
    m = matrix.metrics()
    console.print("  ".join(f"{k} {fmt(m[k], 4)}" for k in METRICS))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
