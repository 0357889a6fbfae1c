"""Commit and manifest documents (JSON objects in the store).

Schema version 1. Later features only *add* optional fields: readers ignore what they do not
know (kept in `extra`), and every field has a default, so old commits stay readable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA = 1


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a manifest: its object id, dtype (safetensors code) and shape."""

    id: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Manifest:
    """Tensor name -> object, plus the PEFT config and safetensors metadata of the adapter."""

    tensors: dict[str, TensorEntry]
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "manifest",
            "schema": SCHEMA,
            "config": self.config,
            "metadata": self.metadata,
            "tensors": {
                k: {"id": e.id, "dtype": e.dtype, "shape": list(e.shape)}
                for k, e in self.tensors.items()
            },
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Manifest:
        tensors = {
            k: TensorEntry(v["id"], v["dtype"], tuple(v["shape"]))
            for k, v in doc["tensors"].items()
        }
        return cls(tensors, doc.get("config", {}), doc.get("metadata", {}))


@dataclass(frozen=True)
class Trigger:
    """A ConDU task trigger: one mask object per tensor and one scale."""

    scale: float
    masks: dict[str, str]


@dataclass(frozen=True)
class Commit:
    """One version of a branch's adapter and how it came to be."""

    manifest: str
    kind: str
    parents: tuple[str, ...] = ()
    task: str | None = None
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    base_model: str | None = None
    triggers: dict[str, Trigger] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    author: str = ""
    time: float = 0.0
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["triggers"] = {k: asdict(v) for k, v in self.triggers.items()}
        doc["parents"], doc["sources"] = list(self.parents), list(self.sources)
        return {"type": "commit", "schema": SCHEMA, **doc}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Commit:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values["extra"] = {
            **doc.get("extra", {}),
            **{k: v for k, v in doc.items() if k not in known and k not in ("type", "schema")},
        }
        values["parents"] = tuple(doc.get("parents", ()))
        values["sources"] = tuple(doc.get("sources", ()))
        values["triggers"] = {k: Trigger(**v) for k, v in doc.get("triggers", {}).items()}
        return cls(**values)

    def referenced_objects(self) -> list[str]:
        """Every object id this commit needs besides its parents (manifest, trigger masks, ...)."""
        ids = [self.manifest]
        for trig in self.triggers.values():
            ids.extend(trig.masks.values())
        ids.extend(v for v in self.extra.get("objects", {}).values() if isinstance(v, str))
        return ids


def check_task_name(name: str) -> str:
    """Task names become parts of refs and folder names: no '/', '..', or control characters."""
    if (
        not name
        or len(name) > 100
        or "/" in name
        or "\\" in name
        or ".." in name
        or name.startswith(("-", "."))
        or any(ord(c) < 32 or ord(c) == 127 or c.isspace() for c in name)
    ):
        from adapterdb.errors import AdbError

        raise AdbError(
            f"task name {name!r} is not allowed; use letters, digits, '-', '_' or '.' "
            "(no '/', '..', spaces or control characters)"
        )
    return name
