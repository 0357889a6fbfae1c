"""Refusals of option values that would otherwise be clamped, ignored or silently reinterpreted.

`--top-k 0` used to mean 1, `--orders 0` ran nothing and exited 0, `--methods ""` printed an
empty table. Typer's own `min=` answers with a multi-line usage box; these checks raise an
`AdbError`, so the answer is the CLI's usual one line (what is wrong, how to fix it), before
any work or any write.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapterdb.errors import AdbError


def at_least(flag: str, value: int | None, low: int, meaning: str) -> None:
    """Refuse `flag value` below `low` (None, the option left out, passes)."""
    if value is not None and value < low:
        raise AdbError(f"{flag} {value}: {meaning} must be >= {low}")


def one_of(flag: str, value: str, choices: Sequence[str]) -> None:
    """Refuse a value that is not one of `choices`."""
    if value not in choices:
        raise AdbError(f"{flag} {value!r} is not one of: {', '.join(choices)}")


def name_list(flag: str, raw: str, what: str) -> list[str]:
    """A comma-separated list of names: at least one, none repeated."""
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        raise AdbError(f"{flag} {raw!r} names no {what}; pass a comma-separated list")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AdbError(f"{flag} names {', '.join(repeated)} twice; pass each {what} once")
    return names
