"""Printing: rich tables for people, `--json` documents for scripts, one-line errors."""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime, timezone
from typing import Any

from rich.console import Console

# A pipe or a file is not 80 columns wide: rich would cut names and messages there (`adb log |
# cat`), so output that is not a terminal gets a width no row reaches; tables still take only
# the width their cells need.
_UNCUT = 1_000_000


def _width(stream: Any) -> int | None:
    return None if stream.isatty() else _UNCUT


console = Console(highlight=False, width=_width(sys.stdout))
err_console = Console(stderr=True, highlight=False, width=_width(sys.stderr))


def status_console(as_json: bool) -> Console:
    """Where progress goes: stderr when stdout carries a JSON document, which it must not
    break, and which must not leave a long command silent either."""
    return err_console if as_json else console


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(doc), indent=2, sort_keys=True) + "\n")


def short(oid: str | None) -> str:
    return (oid or "")[:10]


def when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
