"""The task / sequence YAML schema (`adb train task.yaml`, `adb run sequence.yaml`).

Pydantic models with `extra="forbid"`, so a typo is an error instead of a silently ignored
setting; every validation failure is turned into ONE line naming the field, the value and what
is allowed. Relative paths resolve against the folder of the YAML file that holds them, so a
task file means the same thing wherever `adb` is started from.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adapterdb.errors import AdbError, NotFoundError
from adapterdb.trainers.textdata import LEXNAMES

HfTask = Literal["sequence-classification", "causal-lm", "clip", "vision-to-text"]
Packaged = Literal["efficientnet-lite0", "minilm"]
Builtin = Literal["fashion-mnist", "wordnet-supersenses"]
FileFormat = Literal["jsonl", "json", "csv", "parquet", "imagefolder"]
HF_TASKS: tuple[str, ...] = get_args(HfTask)
FILE_FORMATS: tuple[str, ...] = get_args(FileFormat)
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # a task names an expert ref: one safe segment


def _anchor(path: Path, base_dir: Path | None) -> Path:
    """A relative path means relative to the YAML file's folder, not to the working directory."""
    path = path.expanduser()
    return path if path.is_absolute() or base_dir is None else (base_dir / path).resolve()


def _resolve(value: Path, info: ValidationInfo) -> Path:
    return _anchor(value, (info.context or {}).get("base_dir"))


def _resolve_python(value: str, info: ValidationInfo) -> str:
    """`file.py:fn` names a file next to the YAML; `package.module:fn` stays importable as is."""
    module, _, function = value.rpartition(":")
    if not module or not function.isidentifier():
        raise ValueError(f"= {value!r} is not allowed; use 'module:function' or 'file.py:function'")
    if module.endswith(".py"):
        module = str(_resolve(Path(module), info))
    return f"{module}:{function}"


FilePath = Annotated[Path, AfterValidator(_resolve)]
PythonRef = Annotated[str, AfterValidator(_resolve_python)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    """Exactly one source: a local transformers folder, a pip-packaged model, or a factory."""

    path: FilePath | None = None
    task: HfTask | None = None
    num_labels: int | None = Field(None, ge=1)
    packaged: Packaged | None = None
    python: PythonRef | None = None
    prompts: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("path", "packaged", "python") if getattr(self, k) is not None]
        if len(given) != 1:
            names = ", ".join(given) or "none"
            raise ValueError(f"sets {names}; use exactly one of path, packaged, python")
        if self.path is not None and self.task is None:
            raise ValueError(f"needs task with path; use one of {', '.join(HF_TASKS)}")
        if self.path is None and self.task is not None:
            raise ValueError(f"task = {self.task!r} is not allowed without path; drop it")
        if self.task == "clip" and self.prompts is None:
            raise ValueError("task clip needs prompts: one class prompt per label")
        if self.prompts and self.num_labels and len(self.prompts) != self.num_labels:
            raise ValueError(f"has {len(self.prompts)} prompts for num_labels = {self.num_labels}")
        return self


class DataSpec(_Spec):
    """Local files read through HF `datasets`, or a built-in data set: Fashion-MNIST (classes
    by id 0..9) or WordNet supersenses (classes by name: noun.animal, verb.motion, ...)."""

    builtin: Builtin | None = None
    classes: list[int | str] | None = Field(None, min_length=2)
    folder: FilePath | None = None
    format: FileFormat | None = None
    train: FilePath | None = None
    eval: FilePath | None = None
    text: str | None = None
    label: str = "label"
    image: str | None = None
    question: str | None = None
    answer: str | None = None
    limit: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(None, ge=1)  # the eval split's own limit (default: limit)
    image_size: int = Field(64, ge=8, le=1024)
    # Carve the eval split out of the training data (this fraction, seeded) instead of using
    # the test data: what `adb run` selects learning rates on, so the test split stays unseen.
    validation: float | None = Field(None, gt=0, lt=1)

    @field_validator("classes")
    @classmethod
    def _builtin_classes(cls, value: list[int | str] | None, info: ValidationInfo) -> Any:
        """Fashion-MNIST names classes by id 0..9, WordNet by supersense (lexicographer file)."""
        builtin = info.data.get("builtin")
        for i, item in enumerate(value or []):
            if builtin == "fashion-mnist" and not (isinstance(item, int) and 0 <= item <= 9):
                raise ValueError(
                    f"[{i}] = {item!r} is not allowed; use a Fashion-MNIST class id, a value "
                    "greater than or equal to 0 and less than or equal to 9"
                )
            if builtin == "wordnet-supersenses" and item not in LEXNAMES:
                raise ValueError(
                    f"[{i}] = {item!r} is not allowed; use a WordNet supersense name such as "
                    "noun.animal or verb.motion (`man 5 lexnames` lists all 45)"
                )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        builtins = " | ".join(get_args(Builtin))
        if (self.builtin is None) == (self.train is None):
            raise ValueError(f"needs exactly one of train (a local file) or builtin: {builtins}")
        if self.builtin is None and (self.classes is not None or self.folder is not None):
            raise ValueError(f"classes and folder only apply to builtin: {builtins}")
        if self.builtin is None and self.file_format is None:
            raise ValueError(
                f"train = '{self.train}' has an unknown suffix; "
                f"set data.format to one of {', '.join(FILE_FORMATS)}"
            )
        if self.builtin is None and self.file_format != "imagefolder" and not self.columns_given:
            raise ValueError("names no input column; set text, image or question")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes = {self.classes} repeats a class; list each once")
        return self

    def split_limit(self, split: str) -> int | None:
        """How many examples of `split` (train/eval) to use."""
        return self.eval_limit or self.limit if split == "eval" else self.limit

    @property
    def columns_given(self) -> bool:
        return any(c is not None for c in (self.text, self.image, self.question))

    @property
    def file_format(self) -> str | None:
        """`format`, else guessed from the train path (a folder is an imagefolder)."""
        if self.format is not None or self.train is None:
            return self.format
        if self.train.suffix == "" or self.train.is_dir():
            return "imagefolder"
        return _SUFFIX_FORMAT.get(self.train.suffix)


class LoraSpec(_Spec):
    """LoRA shape; `target_modules` None means the model's defaults (Linear or Conv2d names)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1)


Schedule = Literal["constant", "linear", "cosine"]


def _positive(value: Any) -> float | None:
    """`value` as a finite float > 0 (YAML reads 1e-3 as a string), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if 0 < number < math.inf else None


class OptimSpec(_Spec):
    """Optimiser, schedule and run length: exactly one of `steps` or `epochs`.

    `lr` may list candidates in a sequence file (`adb run` picks one per sequence on a
    validation split); a single task needs one value. The schedule (linear warmup over
    `warmup` of the steps, then `schedule` decay to 0) is the default that bench/RESULTS.md
    ("Collapse") measured: at a constant rate the LoRA's update kept growing task after task
    until EfficientNet's last ReLU6 units saturated for every input, where no gradient flows
    again. Clipping (`max_grad_norm`) measured neither better nor worse, so it stays off.
    """

    lr: float | list[float] = 1e-3
    schedule: Schedule = "cosine"
    warmup: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(None, gt=0)
    on_collapse: Literal["warn", "stop"] = "warn"
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0

    @field_validator("lr", mode="before")
    @classmethod
    def _learning_rates(cls, value: Any) -> float | list[float]:
        """A positive finite number, or a non-empty list of distinct ones (candidates)."""
        items = [_positive(x) for x in (value if isinstance(value, list) else [value])]
        if None in items or not items or len(set(items)) != len(items):
            raise ValueError(
                f"= {value!r} is not allowed; use a number > 0, or a list of distinct ones"
            )
        return items if isinstance(value, list) else items[0]  # type: ignore[return-value]

    @model_validator(mode="after")
    def _one_length(self) -> OptimSpec:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("needs exactly one of steps or epochs")
        return self

    @property
    def candidates(self) -> list[float]:
        """The learning rates to choose from (one when `lr` is a number)."""
        return list(self.lr) if isinstance(self.lr, list) else [self.lr]


class AlignSpec(_Spec):
    """PAM alignment: every `every` steps, reset sign conflicts on the top-p% of |W_G|."""

    enabled: bool = True
    p: float = Field(50.0, ge=0, le=100)
    every: int = Field(100, ge=1)
    reinit: Literal["global", "zero"] = "global"
    scope: Literal["global", "tensor"] = "global"


class TaskConfig(_Spec):
    """One `task.yaml`: what to train, on what, and how."""

    name: str = Field(pattern=TASK_NAME, max_length=100)
    model: ModelSpec
    data: DataSpec
    lora: LoraSpec = LoraSpec()
    optim: OptimSpec
    align: AlignSpec = AlignSpec()
    init: Literal["global", "fresh"] = "global"

    def fingerprint(self) -> str:
        """sha256 of canonical JSON (sorted keys, defaults filled in): same settings, same id."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class SequenceConfig(_Spec):
    """One `sequence.yaml`: tasks in training order (defaults already merged in)."""

    name: str | None = None
    tasks: list[TaskConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> SequenceConfig:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names {dup} repeat; give every task its own name")
        return self


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge where `override` wins; lists and scalars are replaced, not merged."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping, or an AdbError that says what is wrong with the file."""
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file; pass the path of a task YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise AdbError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise AdbError(f"{path}: expected a mapping of fields at the top level")
    return data


def parse_task(data: Mapping[str, Any], base_dir: Path, source: str) -> TaskConfig:
    """Validate a task mapping; `source` prefixes the one-line error (file name, tasks[i])."""
    return _validate(TaskConfig, data, base_dir, source)


def load_task(path: str | Path) -> TaskConfig:
    """Read and validate a task YAML file."""
    path = Path(path)
    return parse_task(read_yaml(path), path.parent.resolve(), str(path))


def load_sequence(path: str | Path) -> SequenceConfig:
    """Read a sequence YAML: `tasks` (file paths or inline dicts), `defaults` merged into each."""
    path = Path(path)
    data = read_yaml(path)
    unknown = sorted(set(data) - {"name", "tasks", "defaults"})
    if unknown:
        raise AdbError(f"{path}: {unknown[0]} is not a known field; use name, tasks, defaults")
    defaults = data.get("defaults") or {}
    entries = data.get("tasks")
    if not isinstance(defaults, dict):
        raise AdbError(f"{path}: defaults = {defaults!r} is not allowed; use a mapping")
    if not isinstance(entries, list) or not entries:
        raise AdbError(f"{path}: tasks = {entries!r} is not allowed; use a non-empty list")
    tasks = [_sequence_task(entry, i, defaults, path) for i, entry in enumerate(entries)]
    fields = {"name": data.get("name"), "tasks": tasks}
    return _validate(SequenceConfig, fields, path.parent, str(path))


def _sequence_task(entry: Any, index: int, defaults: dict[str, Any], seq: Path) -> TaskConfig:
    """A task file (relative to the sequence file) or an inline mapping, with defaults under it."""
    if isinstance(entry, str):
        task_path = _anchor(Path(entry), seq.parent.resolve())
        raw, base, source = read_yaml(task_path), task_path.parent, str(task_path)
    elif isinstance(entry, dict):
        raw, base, source = entry, seq.parent.resolve(), f"{seq}: tasks[{index}]"
    else:
        raise AdbError(f"{seq}: tasks[{index}] = {entry!r} is not allowed; use a path or a mapping")
    return parse_task(deep_merge(defaults, raw), base, source)


def _validate(cls: type[_Spec], data: Any, base_dir: Path, source: str) -> Any:
    try:
        return cls.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise AdbError(_one_line(exc, cls, source)) from None


def _one_line(exc: ValidationError, cls: type[BaseModel], source: str) -> str:
    """The first error as `source: field = value is not allowed; use ...` (+ a count of others)."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    field, value = _dotted(err["loc"]), _short(err.get("input"))
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        line = f"{field} is missing; add it"
    elif kind == "extra_forbidden":
        allowed = ", ".join(_model_at(cls, err["loc"][:-1]).model_fields)
        line = f"{field} = {value} is not a known field; use one of {allowed}"
    elif kind == "literal_error":
        expected = err["ctx"]["expected"].replace(" or ", ", ").replace("'", "")
        line = f"{field} = {value} is not allowed; use one of {expected}"
    elif kind == "value_error":
        reason = msg.removeprefix("Value error, ")
        glue = "" if reason.startswith("[") else " "  # an item of the field: classes[1] = ...
        line = f"{field}{glue}{reason}" if field else reason
    elif kind == "string_pattern_mismatch":
        line = f"{field} = {value} is not allowed; use a string matching {err['ctx']['pattern']}"
    else:
        wanted = msg.removeprefix("Input should be ").split(" or instance of ")[0]
        line = f"{field} = {value} is not allowed; use {_RANGE.get(kind, '')}{wanted}"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {line}{more}"


_RANGE = dict.fromkeys(
    ("greater_than", "greater_than_equal", "less_than", "less_than_equal"), "a value "
)


def _dotted(loc: tuple[int | str, ...]) -> str:
    """('tasks', 0, 'optim', 'lr') -> 'tasks[0].optim.lr'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_at(cls: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel]:
    """The pydantic model class found by following field names `loc` down from `cls`."""
    for part in loc:
        if isinstance(part, str):
            cls = _model_in(cls.model_fields[part].annotation)
    return cls


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `X | None` or `list[X]` (the only wrappers the schema uses)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
