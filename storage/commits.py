"""Commit and manifest documents (JSON objects in the store).

Schema version 1. Later features only *add* optional fields: readers ignore what they do not
know (kept in `extra`), and every field has a default, so old commits stay readable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from adapterdb.errors import AdbError, SchemaViolationError
from adapterdb.tensorfile import DTYPES

SCHEMA = 1
_OID = re.compile(r"[0-9a-f]{64}")
_LAST_DATE = 253402300799  # 9999-12-31 23:59:59 UTC, the last second datetime can print


class SchemaError(ValueError):
    """What is wrong with a document, before we know to say which object it is."""


def _schema_error(kind: str, oid: str, why: str) -> SchemaViolationError:
    return SchemaViolationError(
        f"object {oid[:12]} is a {kind} that breaks the schema ({why}); `adb fsck` lists what "
        "refers to it and `adb fsck --repair` moves refs back to their last readable commit"
    )


def _typed(doc: dict[str, Any], key: str, types: type | tuple[type, ...], default: Any) -> Any:
    """`doc[key]` if it has one of `types` (bool never counts as a number), else SchemaError."""
    value = doc.get(key, default)
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in _flat(types)):
        return value
    what = "missing" if key not in doc else type(value).__name__
    raise SchemaError(f"'{key}' is {what}, not {_names(types)}")


def _flat(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in _flat(types))


def _oid(value: Any, what: str) -> str:
    """Ids become file paths under objects/: anything but 64 lowercase hex is refused."""
    if isinstance(value, str) and _OID.fullmatch(value):
        return value
    if value is None:
        raise SchemaError(f"{what} is missing")
    raise SchemaError(f"{what} is {str(value)[:20]!r}, not a 64-hex object id")


def _each(mapping: Any, what: str, check: Callable[[str, Any], Any]) -> dict[str, Any]:
    """A JSON object whose keys are strings, each value checked (and converted) by `check`."""
    if not isinstance(mapping, dict):
        raise SchemaError(f"{what} is {type(mapping).__name__}, not an object")
    return {k: check(k, v) for k, v in mapping.items()}


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
    def from_json(cls, doc: dict[str, Any], oid: str = "?") -> Manifest:
        """Parse a stored manifest; a document that breaks the schema is a CorruptObjectError
        naming `oid` (it hashed fine, so only a reader check stops it crashing a verb later)."""
        try:
            tensors = _each(doc.get("tensors"), "'tensors'", _tensor_entry)
            config = _typed(doc, "config", dict, {})
            metadata = _typed(doc, "metadata", dict, {})
            for key, value in metadata.items():
                if not isinstance(value, str):
                    raise SchemaError(f"metadata {key[:40]!r} is not a string")
        except SchemaError as exc:
            raise _schema_error("manifest", oid, str(exc)) from None
        return cls(tensors, config, metadata)


def _tensor_entry(name: str, v: Any) -> TensorEntry:
    if not name or not isinstance(v, dict):
        raise SchemaError(f"tensor {name[:40]!r} is not a name with an {{id, dtype, shape}} object")
    dtype, shape = v.get("dtype"), v.get("shape")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SchemaError(f"tensor {name[:40]!r} has dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SchemaError(f"tensor {name[:40]!r} has a shape that is not a list of counts")
    return TensorEntry(_oid(v.get("id"), f"tensor {name[:40]!r} id"), dtype, tuple(shape))


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
    def from_json(cls, doc: dict[str, Any], oid: str = "?") -> Commit:
        """Parse a stored commit; a document that breaks the schema (wrong types, missing
        fields, ids that are not hex, trigger names that are not task names) is a
        CorruptObjectError naming `oid`, never a crash in `show`, `log` or `fsck`."""
        known = {f.name for f in fields(cls)}
        try:
            values = {k: _typed(doc, k, t, None) for k, t in _COMMIT_FIELDS.items() if k in doc}
            values["manifest"] = _oid(doc.get("manifest"), "'manifest'")
            values["kind"] = _typed(doc, "kind", str, None)
            values["parents"] = _ids(doc, "parents")
            values["sources"] = tuple(_typed(doc, "sources", list, []))
            values["triggers"] = _each(doc.get("triggers", {}), "'triggers'", _trigger)
            values["time"] = _time(doc)
            values["extra"] = {
                **_typed(doc, "extra", dict, {}),
                **{k: v for k, v in doc.items() if k not in known and k not in ("type", "schema")},
            }
            _each(values["extra"].get("objects", {}), "'objects'", _maybe_oid)
            if not all(isinstance(s, str) for s in values["sources"]):
                raise SchemaError("'sources' holds something that is not a string")
        except SchemaError as exc:
            raise _schema_error("commit", oid, str(exc)) from None
        return cls(**values)

    def referenced_objects(self) -> list[str]:
        """Every object id this commit needs besides its parents (manifest, trigger masks, ...)."""
        ids = [self.manifest]
        for trig in self.triggers.values():
            ids.extend(trig.masks.values())
        ids.extend(v for v in self.extra.get("objects", {}).values() if isinstance(v, str))
        return ids


# Optional fields and their JSON types (None allowed where the dataclass default is None).
_COMMIT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "task": (str, type(None)),
    "method": (str, type(None)),
    "params": dict,
    "base_model": (str, type(None)),
    "eval": dict,
    "stats": dict,
    "provenance": dict,
    "author": str,
    "message": str,
}


def _ids(doc: dict[str, Any], key: str) -> tuple[str, ...]:
    return tuple(_oid(v, f"'{key}' entry") for v in _typed(doc, key, list, []))


def _time(doc: dict[str, Any]) -> float:
    stamp = _typed(doc, "time", (int, float), 0.0)
    if not 0 <= stamp <= _LAST_DATE:  # NaN fails too; `log` and `show` print it as a date
        raise SchemaError(f"'time' is {stamp!r}, not seconds since 1970 up to the year 9999")
    return float(stamp)


def _maybe_oid(key: str, value: Any) -> Any:
    """`extra.objects` values that are strings are object ids (fsck and gc follow them)."""
    return _oid(value, f"object {key[:40]!r}") if isinstance(value, str) else value


def _trigger(task: str, v: Any) -> Trigger:
    """Trigger names become folder names (`decouple --all`): they must be task names."""
    try:
        check_task_name(task)
    except AdbError:
        raise SchemaError(f"trigger name {task[:40]!r} is not a task name") from None
    if not isinstance(v, dict):
        raise SchemaError(f"trigger {task!r} is not an object")
    scale = _typed(v, "scale", (int, float), None)
    if not math.isfinite(scale):
        raise SchemaError(f"trigger {task!r} scale is not finite")
    masks = _each(v.get("masks"), f"trigger {task!r} masks", lambda k, m: _oid(m, f"mask {k!r}"))
    return Trigger(float(scale), masks)


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
        raise AdbError(
            f"task name {name!r} is not allowed; use letters, digits, '-', '_' or '.' "
            "(no '/', '..', spaces or control characters)"
        )
    return name
