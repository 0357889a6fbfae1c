"""Task / sequence YAML schema: happy path, one-line errors, defaults merge, fingerprints."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapterdb.errors import AdbError, NotFoundError
from adapterdb.trainers.config import TaskConfig, deep_merge, load_sequence, load_task, parse_task

MINIMAL = """\
name: topics
model: {path: ./minilm, task: sequence-classification, num_labels: 4}
data: {train: data/train.jsonl, eval: data/eval.jsonl, text: text, label: label}
lora: {r: 8, alpha: 16, target_modules: [query, value]}
optim: {lr: 1.0e-3, steps: 40, batch_size: 16, seed: 0}
align: {p: 50, every: 10, reinit: global}
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _raw() -> dict[str, Any]:
    return yaml.safe_load(MINIMAL)


def test_minimal_task_validates_as_written(tmp_path: Path) -> None:
    cfg = load_task(_write(tmp_path / "sub" / "task.yaml", MINIMAL))
    assert cfg.name == "topics"
    assert cfg.model.path == tmp_path / "sub" / "minilm"
    assert (cfg.model.task, cfg.model.num_labels) == ("sequence-classification", 4)
    assert cfg.data.train == tmp_path / "sub" / "data" / "train.jsonl"
    assert cfg.data.eval == tmp_path / "sub" / "data" / "eval.jsonl"
    assert cfg.data.file_format == "jsonl"
    assert (cfg.data.text, cfg.data.label) == ("text", "label")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 16.0, ["query", "value"])
    assert (cfg.optim.lr, cfg.optim.steps, cfg.optim.batch_size) == (1e-3, 40, 16)
    assert (cfg.optim.precision, cfg.optim.epochs, cfg.optim.grad_accum) == ("fp32", None, 1)
    assert (cfg.align.enabled, cfg.align.p, cfg.align.every) == (True, 50, 10)
    assert (cfg.align.reinit, cfg.align.scope, cfg.init) == ("global", "global", "global")


def test_absolute_paths_stay_and_python_file_resolves(tmp_path: Path) -> None:
    raw = _raw()
    raw["model"] = {"python": "nets.py:build"}
    raw["data"]["train"] = str(tmp_path / "elsewhere.csv")
    cfg = parse_task(raw, tmp_path, "task.yaml")
    assert cfg.model.python == f"{tmp_path / 'nets.py'}:build"
    assert cfg.data.train == tmp_path / "elsewhere.csv"
    assert cfg.data.file_format == "csv"
    raw["model"] = {"python": "my_pkg.nets:build"}
    assert parse_task(raw, tmp_path, "task.yaml").model.python == "my_pkg.nets:build"


def _set(section: str | None, **values: Any) -> Any:
    def mutate(raw: dict[str, Any]) -> None:
        (raw if section is None else raw.setdefault(section, {})).update(values)

    return mutate


def _pop(section: str | None, key: str) -> Any:
    def mutate(raw: dict[str, Any]) -> None:
        (raw if section is None else raw[section]).pop(key)

    return mutate


# (mutation, substrings the one-line message must contain: field, value, what is allowed)
WRONG = [
    (_set("optim", precision="fp8"), ["optim.precision", "'fp8'", "fp32, bf16, fp16"]),
    (_set("optim", momentum=0.9), ["optim.momentum", "0.9", "not a known field", "lr, schedule"]),
    (_set(None, extra=1), ["extra", "not a known field", "name, model, data"]),
    (_set("optim", lr="fast"), ["optim.lr", "'fast'", "a number > 0"]),
    (_set("optim", lr=0), ["optim.lr", "= 0", "a number > 0"]),
    (_set("optim", lr=[1e-3, 1e-3]), ["optim.lr", "[0.001, 0.001]", "distinct"]),
    (_set("optim", schedule="step"), ["optim.schedule", "'step'", "constant, linear, cosine"]),
    (_set("optim", on_collapse="ignore"), ["optim.on_collapse", "'ignore'", "warn, stop"]),
    (_set("optim", warmup=1.0), ["optim.warmup", "1.0", "less than 1"]),
    (_set("optim", steps=1.5), ["optim.steps", "1.5", "valid integer"]),
    (_set("optim", epochs=3), ["optim", "exactly one of steps or epochs"]),
    (_set("lora", r=0), ["lora.r", "= 0", "greater than or equal to 1"]),
    (_set("lora", dropout=1.0), ["lora.dropout", "1.0", "less than 1"]),
    (_set("lora", target_modules="query"), ["lora.target_modules", "'query'", "valid list"]),
    (_set("align", reinit="random"), ["align.reinit", "'random'", "global, zero"]),
    (_set("align", scope="layer"), ["align.scope", "'layer'", "global, tensor"]),
    (_set("align", p=150), ["align.p", "150", "less than or equal to 100"]),
    (_set("align", every=0), ["align.every", "= 0", "greater than or equal to 1"]),
    (_set(None, init="random"), ["init", "'random'", "global, fresh"]),
    (_set(None, name="two words"), ["name", "'two words'", "matching"]),
    (_pop(None, "name"), ["name is missing"]),
    (_pop(None, "optim"), ["optim is missing"]),
    (_set("model", task="gpt"), ["model.task", "'gpt'", "sequence-classification, causal-lm"]),
    (_pop("model", "task"), ["model", "needs task", "sequence-classification"]),
    (_set("model", packaged="minilm"), ["model", "path, packaged", "exactly one of"]),
    (
        _set("model", packaged="resnet"),
        ["model.packaged", "'resnet'", "efficientnet-lite0, minilm"],
    ),
    (_set("model", num_labels=0), ["model.num_labels", "= 0", "greater than or equal to 1"]),
    (_set("model", python="nocolon"), ["model.python", "'nocolon'", "module:function"]),
    (_set("model", task="clip"), ["model", "clip needs prompts"]),
    (_set("model", prompts=["a", "b"]), ["model", "2 prompts", "num_labels = 4"]),
    (_set("data", builtin="fashion-mnist"), ["data", "exactly one of train", "builtin"]),
    (_set("data", builtin="cifar"), ["data.builtin", "'cifar'", "fashion-mnist"]),
    (_set("data", classes=[0, 6]), ["data", "classes and folder only apply to builtin"]),
    (_set("data", format="xml"), ["data.format", "'xml'", "jsonl, json, csv, parquet"]),
    (_set("data", limit=-5), ["data.limit", "-5", "greater than or equal to 1"]),
    (_set("data", image_size=2), ["data.image_size", "= 2", "greater than or equal to 8"]),
    (_pop("data", "text"), ["data", "no input column", "text, image or question"]),
    (_set(None, data=[1]), ["data", "[1]", "valid dictionary"]),
]


@pytest.mark.parametrize(("mutate", "expected"), WRONG)
def test_wrong_field_gives_one_line_naming_field_value_and_allowed(
    mutate: Any, expected: list[str]
) -> None:
    raw = copy.deepcopy(_raw())
    mutate(raw)
    with pytest.raises(AdbError) as info:
        parse_task(raw, Path("/tmp"), "task.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("task.yaml: ")
    for part in expected:
        assert part in message, (part, message)


def test_builtin_classes_checked_per_item() -> None:
    raw = _raw()
    raw["data"] = {"builtin": "fashion-mnist", "classes": [0, 12]}
    with pytest.raises(AdbError, match=r"data\.classes\[1\] = 12 .*less than or equal to 9"):
        parse_task(raw, Path("/tmp"), "task.yaml")
    raw["data"] = {"builtin": "fashion-mnist", "classes": [6, 6]}
    with pytest.raises(AdbError, match=r"repeats a class"):
        parse_task(raw, Path("/tmp"), "task.yaml")


def test_several_errors_still_one_line_with_a_count() -> None:
    raw = _raw()
    raw["optim"].update(precision="fp8", lr="x")
    with pytest.raises(AdbError, match=r"\(\+1 more\)$"):
        parse_task(raw, Path("/tmp"), "task.yaml")


def test_unknown_suffix_needs_format(tmp_path: Path) -> None:
    raw = _raw()
    raw["data"]["train"] = "data/train.txt"
    with pytest.raises(AdbError, match=r"data train = '.*train\.txt' .* set data\.format to one"):
        parse_task(raw, tmp_path, "task.yaml")
    raw["data"]["format"] = "jsonl"
    assert parse_task(raw, tmp_path, "task.yaml").data.file_format == "jsonl"
    raw["data"] = {"train": "images", "eval": "images_eval"}
    assert parse_task(raw, tmp_path, "task.yaml").data.file_format == "imagefolder"


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such file"):
        load_task(tmp_path / "missing.yaml")
    broken = _write(tmp_path / "broken.yaml", "name: [unclosed\n")
    with pytest.raises(AdbError, match=r"not valid YAML at line \d+") as info:
        load_task(broken)
    assert "\n" not in str(info.value)
    with pytest.raises(AdbError, match="mapping of fields"):
        load_task(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def _reordered(value: Any) -> Any:
    """The same mapping with every level's keys in reverse order."""
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    return value


def test_fingerprint_stable_under_key_order_and_defaults(tmp_path: Path) -> None:
    a = load_task(_write(tmp_path / "a.yaml", MINIMAL))
    b = load_task(_write(tmp_path / "b.yaml", yaml.safe_dump(_reordered(_raw()))))
    assert list(_reordered(_raw())) != list(_raw())
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    explicit = _raw()
    explicit["optim"]["precision"] = "fp32"  # the default, spelled out
    explicit["init"] = "global"
    assert parse_task(explicit, tmp_path, "x").fingerprint() == a.fingerprint()
    changed = _raw()
    changed["optim"]["lr"] = 2e-3
    assert parse_task(changed, tmp_path, "x").fingerprint() != a.fingerprint()


def test_deep_merge_task_wins_and_lists_replace() -> None:
    base = {"optim": {"lr": 1, "steps": 5}, "lora": {"target_modules": ["a", "b"]}, "x": 1}
    over = {"optim": {"lr": 2}, "lora": {"target_modules": ["c"]}, "y": 2}
    merged = deep_merge(base, over)
    assert merged == {
        "optim": {"lr": 2, "steps": 5},
        "lora": {"target_modules": ["c"]},
        "x": 1,
        "y": 2,
    }
    assert base["optim"] == {"lr": 1, "steps": 5}  # inputs untouched


def test_sequence_merges_defaults_into_file_and_inline_tasks(tmp_path: Path) -> None:
    _write(tmp_path / "tasks" / "a.yaml", MINIMAL.replace("steps: 40", "steps: 7"))
    inline = _raw()
    inline["name"] = "inline"
    del inline["optim"]["lr"], inline["align"]
    sequence = {
        "name": "demo",
        "defaults": {"optim": {"lr": 5e-4, "precision": "bf16"}, "align": {"p": 80}},
        "tasks": ["tasks/a.yaml", inline],
    }
    seq = load_sequence(_write(tmp_path / "seq.yaml", yaml.safe_dump(sequence)))
    first, second = seq.tasks
    assert seq.name == "demo"
    assert (first.name, second.name) == ("topics", "inline")
    assert (first.optim.lr, first.optim.steps, first.optim.precision) == (1e-3, 7, "bf16")
    assert (second.optim.lr, second.optim.precision) == (5e-4, "bf16")
    assert (first.align.p, first.align.every) == (50, 10)  # the task file wins
    assert (second.align.p, second.align.every) == (80, 100)  # default + built-in default
    assert first.data.train == tmp_path / "tasks" / "data" / "train.jsonl"
    assert second.data.train == tmp_path / "data" / "train.jsonl"
    assert TaskConfig.model_validate(first.model_dump()).fingerprint() == first.fingerprint()


def test_sequence_errors_name_the_task(tmp_path: Path) -> None:
    bad = _raw()
    bad["optim"]["precision"] = "fp8"
    seq = _write(tmp_path / "seq.yaml", yaml.safe_dump({"tasks": [_raw(), bad]}))
    with pytest.raises(AdbError, match=r"seq\.yaml: tasks\[1\]: optim\.precision = 'fp8'"):
        load_sequence(seq)
    twice = _write(tmp_path / "twice.yaml", yaml.safe_dump({"tasks": [_raw(), _raw()]}))
    with pytest.raises(AdbError, match=r"\['topics'\] repeat"):
        load_sequence(twice)
    unknown = _write(tmp_path / "u.yaml", yaml.safe_dump({"tasks": [_raw()], "order": 1}))
    with pytest.raises(AdbError, match="order is not a known field"):
        load_sequence(unknown)
    empty = _write(tmp_path / "e.yaml", yaml.safe_dump({"tasks": []}))
    with pytest.raises(AdbError, match="non-empty list"):
        load_sequence(empty)
    missing = _write(tmp_path / "m.yaml", yaml.safe_dump({"tasks": ["nope.yaml"]}))
    with pytest.raises(NotFoundError, match=r"nope\.yaml"):
        load_sequence(missing)
