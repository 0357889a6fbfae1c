"""The `adb` typer application: global options, verb registration, error handling.

Verbs live in one module per group; this module only wires them together and turns every
`AdbError` into one line on stderr with a non-zero exit code (no traceback).
"""

from __future__ import annotations

import os
import sys

import typer

from adapterdb.errors import AdbError
from adapterdb.memory import keep_freed_memory

app = typer.Typer(
    name="adb",
    help="AdapterDB: version control and continual merging for LoRA adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def root(
    store: str = typer.Option(
        None, "--store", envvar="ADB_STORE", help="Store path (default: nearest .adb upwards)."
    ),
) -> None:
    """Global options."""
    if store:
        os.environ["ADB_STORE"] = store


def _register() -> None:
    """Add every verb once: `main` runs many times in one process under the tests, and each
    duplicate registration made the next command's start-up slower."""
    if app.registered_commands:
        return
    from adapterdb.cli import evaluate, history, maintenance, merge, run, train

    for module in (history, maintenance, merge, train, evaluate, run):
        module.register(app)


def _one_line(message: str) -> str:
    """Markup-escaped, newline-free: names and paths in messages may hold '[/]' or '\\n'."""
    from rich.markup import escape

    return escape(message.replace("\r", "\\r").replace("\n", "\\n"))


def quiet_libraries() -> None:
    """No network and no library chatter: `adb` prints its own progress.

    Set before transformers/datasets are imported, which read these at import time.
    """
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)
    # Imported already (adb called in-process, as the tests do): too late for the variables.
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def main() -> None:
    quiet_libraries()
    keep_freed_memory()
    _register()
    try:
        app()
    except AdbError as exc:
        from adapterdb.cli.output import err_console

        err_console.print(f"[bold red]error:[/] {_one_line(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # disk full, permission denied, ...: the OS's words, one line
        from adapterdb.cli.output import err_console

        where = f" ({exc.filename})" if exc.filename else ""
        message = _one_line(f"{exc.strerror or exc}{where}")
        err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
        sys.exit(1)
    except (KeyboardInterrupt, SystemExit) as exc:
        if not _interrupted(exc):
            raise
        sys.stderr.write("interrupted; the store is unchanged (refs move only at the end)\n")
        sys.exit(130)


def _interrupted(exc: BaseException | None) -> bool:
    """Ctrl-C: typer turns the KeyboardInterrupt into a silent SystemExit(130); find it."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


if __name__ == "__main__":
    main()
