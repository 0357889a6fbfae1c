"""`adb export`: a revision as a PEFT folder, or folded into a base model (`--merged-into`)."""

from __future__ import annotations

from pathlib import Path

import typer

from adapterdb.cli.history import JSON
from adapterdb.cli.output import console, emit_json, short
from adapterdb.storage.store import Store


def export(
    rev: str = typer.Argument(..., help="Revision to export."),
    out: Path = typer.Option(..., "-o", "--output", help="Folder to write."),
    merged_into: Path = typer.Option(
        None,
        "--merged-into",
        help="A transformers model folder: write the full model with the adapter folded in.",
    ),
    force: bool = typer.Option(False, "--force", help="Write into a folder that is not empty."),
    as_json: bool = JSON,
) -> None:
    """Write a revision as a PEFT folder, or as a full model folder (`--merged-into BASE_DIR`)
    that `AutoModel...from_pretrained` loads without PEFT."""
    from adapterdb.trainers.export import export

    store = Store.find()
    with console.status("exporting", spinner="dots"):
        done = export(store, rev, out, merged_into, force)
    if as_json:
        emit_json(done.to_json())
        return
    what = f"the model of {merged_into} with" if merged_into else "the PEFT adapter of"
    console.print(f"wrote {what} {short(done.commit_id)} to {out}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
