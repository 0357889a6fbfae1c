"""The adapter store: content-addressed objects, commits, refs (installs as adapterdb.storage)."""

from adapterdb.storage.store import Store

__all__ = ["Store"]
