"""Merge verbs: merge, align, decouple (thin: parse, call trainers.merge, print)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from adapterdb.adapter import WEIGHTS_FILE, write_peft_raw
from adapterdb.cli.history import JSON, WRITE_JSON, emit_written
from adapterdb.cli.output import console, emit_json, err_console, fmt, short, status_console
from adapterdb.errors import AdbError
from adapterdb.storage.commits import check_task_name
from adapterdb.storage.refs import HEADS
from adapterdb.storage.store import Store
from adapterdb.trainers.importing import target_branch


def _store_or_none(specs: list[str]) -> Store | None:
    """Folders-only merges work without a store; anything else needs one."""
    try:
        return Store.find()
    except AdbError:
        if all(Path(s).is_dir() for s in specs):
            return None
        raise


def _fresh_output(out: Path, force: bool) -> None:
    if (out / WEIGHTS_FILE).exists() and not force:
        raise AdbError(
            f"{out} already holds an adapter; pass --force to overwrite or pick another -o"
        )


def merge(
    sources: list[str] = typer.Argument(None, help="Store revisions or PEFT folders."),
    method: str = typer.Option(
        ..., "--method", "-M", help="pam, average, ties, dare, magmax, tall, condu, opcm, tsv, ..."
    ),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="Method parameter key=value (repeatable)."
    ),
    space: str = typer.Option(
        "factors", "--space", help="factors (A, B separately) or product (ΔW)."
    ),
    rank: int = typer.Option(
        None, "--rank", help="Product space: rank to refactor to (default: largest input)."
    ),
    out: Path = typer.Option(
        None, "-o", "--output", help="Write a PEFT folder (standalone merge)."
    ),
    into: str = typer.Option(
        None,
        "--into",
        help="Merge into this branch's global adapter and commit (default: HEAD's branch).",
    ),
    force: bool = typer.Option(
        False, "--force", help="PAM: accept experts trained without alignment; -o: overwrite."
    ),
    message: str = typer.Option("", "--message", "-m"),
    as_json: bool = WRITE_JSON,
) -> None:
    """Merge adapters into a branch (HEAD's, or --into's: the continual step; with no SOURCES
    the newest unmerged expert), or into a new PEFT folder (-o)."""
    from adapterdb.trainers import merge as wf

    sources = sources or []
    if out is not None and into is not None:
        raise AdbError(
            "say where the result goes: -o DIR (a PEFT folder) or --into BRANCH (a commit), "
            "not both"
        )
    wf.check_space(space, rank)
    params = wf.parse_params(method, param)
    if out is not None:
        if len(sources) < 1:
            raise AdbError("pass the adapters to merge: adb merge --method M SRC1 SRC2 ... -o DIR")
        _fresh_output(out, force)
        store = _store_or_none(sources)
        srcs = [wf.open_source(s, store) for s in sources]
        result = wf.merge_standalone(method, params, srcs, space, rank, force)
        spinner = status_console(as_json).status(
            f"merging {len(srcs)} adapters ({method}, {space})", spinner="dots"
        )
        with spinner:
            raw = wf.to_raw(result.tensors)
        write_peft_raw(out, result.config, raw, {})
        _report(result.notes, result.errors, as_json)
        if as_json:
            emit_json({"output": str(out), "method": method, "warnings": result.notes})
        else:
            console.print(f"wrote {len(raw)} merged tensors to {out}")
        return
    store = Store.find()
    branch = target_branch(store, into, "--into")
    spinner = status_console(as_json).status(
        f"merging into {branch} ({method}, {space})", spinner="dots"
    )
    with spinner:
        outcome = wf.merge_into(store, branch, method, params, sources, space, rank, force, message)
    _report(outcome.warnings, outcome.errors, as_json)
    if as_json:
        emit_written(
            store, outcome.commit_id, HEADS + branch, outcome.warnings, errors=outcome.errors
        )
        return
    merged = store.read_commit(outcome.commit_id).message
    console.print(
        f"[{branch} {short(outcome.commit_id)}] {merged} (into branch {branch})", markup=False
    )


def _report(warnings: list[str], errors: dict[str, float], as_json: bool = False) -> None:
    for w in warnings:
        err_console.print(f"warning: {w}", soft_wrap=True, markup=False)
    if errors:
        worst = max(errors.items(), key=lambda kv: kv[1])
        mean = sum(errors.values()) / len(errors)
        status_console(as_json).print(
            f"refactoring error (rel. Frobenius): mean {mean:.2e}, max {worst[1]:.2e} ({worst[0]})"
        )


def align(
    expert: str = typer.Argument(..., help="Expert: a revision or PEFT folder."),
    against: str = typer.Option(
        ..., "--against", help="Global adapter: a revision or PEFT folder."
    ),
    p: float = typer.Option(
        50.0, "-p", help="Percent of the largest |W_G| that must agree in sign."
    ),
    scope: str = typer.Option("global", "--scope", help="global (one threshold) or tensor."),
    reinit: str = typer.Option(
        "global", "--reinit", help="Reset misaligned weights to W_G (global) or 0."
    ),
    report: bool = typer.Option(
        False, "--report", help="Only print the per-tensor conflict fractions."
    ),
    out: Path = typer.Option(None, "-o", "--output", help="Write the aligned expert here."),
    force: bool = typer.Option(False, "--force", help="Overwrite an adapter already in OUT."),
    as_json: bool = JSON,
) -> None:
    """PAM alignment after the fact: re-initialise sign conflicts in the top-p% of |W_G|."""
    from adapterdb.adapter import from_torch
    from adapterdb.alignment import align_adapter_, alignment_report, alignment_thresholds
    from adapterdb.trainers import merge as wf

    if not report and out is None:
        raise AdbError("pass -o DIR to write the aligned expert, or --report to only inspect")
    if report and out is not None:  # -o was silently ignored
        raise AdbError("--report only inspects and writes nothing; drop -o or drop --report")
    store = _store_or_none([expert, against])
    e, g = wf.open_source(expert, store), wf.open_source(against, store)
    names = list(g.tensors)
    glob = {n: g.tensors[n] for n in names}
    if report:
        rep = alignment_report(e.tensors, glob, p, scope)  # type: ignore[arg-type]
    else:
        _fresh_output(out, force)
        live = {n: e.tensors[n].clone() for n in e.tensors}
        rep = align_adapter_(live, glob, alignment_thresholds(glob, p, scope), reinit)  # type: ignore[arg-type]
        write_peft_raw(out, e.config, {n: from_torch(t) for n, t in live.items()}, {})
    rows = {
        n: {
            "sign_conflicts": s.conflict_fraction,
            "misaligned_top_p": s.misaligned_fraction,
            "numel": s.numel,
        }
        for n, s in rep.tensors.items()
    }
    total = rep.total
    summary = {
        "sign_conflicts": total.conflict_fraction,
        "misaligned_top_p": total.misaligned_fraction,
        "reset_fraction": rep.reset_fraction if not report else 0.0,
    }
    if as_json:
        emit_json({"p": p, "scope": scope, "tensors": rows, "summary": summary})
    else:
        table = Table(box=None, pad_edge=False)
        for col in ("tensor", "sign conflicts", f"misaligned in top {p:g}%"):
            table.add_column(col, justify="left" if col == "tensor" else "right")
        for n, r in rows.items():
            table.add_row(n, fmt(r["sign_conflicts"]), fmt(r["misaligned_top_p"]))
        table.add_row(
            "[bold]all[/]", fmt(summary["sign_conflicts"]), fmt(summary["misaligned_top_p"])
        )
        console.print(table)
        if not report:
            console.print(
                f"re-initialised {summary['reset_fraction']:.2%} of the weights; wrote {out}"
            )


def decouple(
    rev: str = typer.Argument(..., help="A ConDU commit."),
    task: str = typer.Option(None, "--task", help="The task whose expert to rebuild."),
    all_tasks: bool = typer.Option(
        False, "--all", help="Rebuild every task, one folder each under OUT."
    ),
    out: Path = typer.Option(..., "-o", "--output"),
    force: bool = typer.Option(False, "--force", help="Overwrite adapters already in OUT."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the folders written (task -> folder) as a JSON document."
    ),
) -> None:
    """Rebuild a task's expert from a ConDU commit (unified delta + trigger) as a PEFT folder."""
    from adapterdb.trainers import merge as wf

    store = Store.find()
    if (task is None) == (not all_tasks):
        raise AdbError("pass --task T for one expert or --all for every task")
    tasks = list(store.read_commit(store.resolve(rev)).triggers) if all_tasks else [task]
    if not tasks:
        raise AdbError(
            f"{rev} is not a ConDU commit (it has no triggers); merge with --method condu"
        )
    written = {}
    for t in tasks:
        target = _task_folder(out, t) if all_tasks else out
        _fresh_output(target, force)
        raw, config = wf.decouple_task(store, rev, t)
        write_peft_raw(target, config, raw, {})
        written[t] = str(target)
        status_console(as_json).print(f"rebuilt expert '{t}' -> {target}", markup=False)
    if as_json:
        emit_json({"commit": store.resolve(rev), "folders": written})


def _task_folder(out: Path, task: str) -> Path:
    """OUT/TASK, and never anywhere else: task names come from a commit, and a crafted one
    ('../x', '/abs') must not make `decouple --all` write outside OUT."""
    target = out / check_task_name(task)
    if target.resolve().parent != out.resolve():
        raise AdbError(f"task name {task!r} leads outside {out}; rename the task")
    return target


def register(app: typer.Typer) -> None:
    app.command()(merge)
    app.command()(align)
    app.command()(decouple)
