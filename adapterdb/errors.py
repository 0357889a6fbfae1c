"""User-facing errors.

Every failure a user can cause is an `AdbError` whose message is one line saying what is wrong
and how to fix it; the CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations


class AdbError(Exception):
    """A one-line, user-facing error (bad input, missing object, conflict)."""

    exit_code = 2


class NotFoundError(AdbError):
    """A revision, object, task or file that does not exist."""


class CorruptObjectError(AdbError):
    """An object whose bytes do not hash to its name."""

    exit_code = 3


class SchemaViolationError(CorruptObjectError):
    """A stored document whose bytes hash fine but break its schema: no backup can fix it,
    so `fsck --repair` may forget reflog values naming it."""


class CorruptStateError(AdbError):
    """A damaged file of the store's mutable state: a ref, HEAD, FORMAT or a reflog line.

    Its own class so that `fsck` can collect these and go on, where reads of objects stop.
    """

    exit_code = 3


class ConflictError(AdbError):
    """A ref moved under us: another writer committed first."""

    exit_code = 4


class MismatchError(AdbError):
    """Sources that cannot be combined (shape, rank, dtype or name differ)."""
