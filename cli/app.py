"""The `adb` typer application: global options, verb registration, error handling.

Verbs live in one module per group; this module only wires them together and turns every
`AdbError` into one line on stderr with a non-zero exit code (no traceback).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from adapterdb.errors import AdbError
from adapterdb.memory import keep_freed_memory

app = typer.Typer(
    name="adb",
    help="AdapterDB: version control and continual merging for LoRA adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

STORE_HELP = "Store path (default: nearest .adb upwards)."


def _print_version(show: bool) -> None:
    if show:
        from adapterdb import __version__

        typer.echo(f"adb {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    store: str = typer.Option(None, "--store", envvar="ADB_STORE", help=STORE_HELP),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Global options."""
    if store:
        os.environ["ADB_STORE"] = store


def accepts_store(verb: Callable[..., Any]) -> Callable[..., Any]:
    """`verb` with `--store PATH` among its own options too: git users type options after the
    verb (`adb log --store X`), and typer reads a group's options only before it."""

    @functools.wraps(verb)
    def wrapped(*args: Any, adb_store_path: str | None = None, **kwargs: Any) -> Any:
        if adb_store_path:
            os.environ["ADB_STORE"] = adb_store_path
        return verb(*args, **kwargs)

    signature = inspect.signature(verb, eval_str=True)  # typer needs types, not strings
    option = inspect.Parameter(
        "adb_store_path",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, "--store", help=STORE_HELP),
        annotation=str,
    )
    wrapped.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), option]
    )
    wrapped.__annotations__ = {**verb.__annotations__, "adb_store_path": str}
    return wrapped


def _register() -> None:
    """Add every verb once: `main` runs many times in one process under the tests, and each
    duplicate registration made the next command's start-up slower."""
    if app.registered_commands:
        return
    from adapterdb.cli import evaluate, history, maintenance, merge, reset, run, status, train

    for module in (history, status, reset, maintenance, merge, train, evaluate, run):
        module.register(app)
    from adapterdb.cli import export, remote

    remote.register(app)
    export.register(app)
    for verb in _verbs(app):
        verb.callback = accepts_store(verb.callback)


def _verbs(group: typer.Typer) -> list[Any]:
    """Every verb of `group`: its commands, and its sub-groups' (`adb remote` itself, which
    lists, and `adb remote add`)."""
    found: list[Any] = list(group.registered_commands)
    for sub in group.registered_groups:
        own = sub.typer_instance.registered_callback
        found += ([own] if own and own.callback else []) + _verbs(sub.typer_instance)
    return found


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
    chosen_store = os.environ.get("ADB_STORE")
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
    finally:  # `--store` names this command's store only (the tests run many in one process)
        _restore_env("ADB_STORE", chosen_store)


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _interrupted(exc: BaseException | None) -> bool:
    """Ctrl-C: typer turns the KeyboardInterrupt into a silent SystemExit(130); find it."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


if __name__ == "__main__":
    main()
