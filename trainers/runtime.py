"""A task's runtime: base model, data, frozen head and the PEFT-wrapped model.

Training and evaluation both need the same pieces built the same way: the head's prototypes
come from the *base* model's features (before any LoRA), so the base model has a meaningful
zero-shot accuracy and an adapter only ever changes features, never the head.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from adapterdb import aligner
from adapterdb.errors import AdbError, MismatchError
from adapterdb.trainers.config import TaskConfig
from adapterdb.trainers.data import TaskData, carve_validation, load_task_data
from adapterdb.trainers.heads import PrototypeHead, class_prototypes
from adapterdb.trainers.models import LoadedModel, load_model

GENERATIVE = frozenset({"causal-lm", "vision-to-text"})
EVAL_BATCH = 64


@dataclass
class Runtime:
    task: TaskConfig
    loaded: LoadedModel
    data: TaskData
    peft: Any  # peft.PeftModel

    @property
    def generative(self) -> bool:
        return self.loaded.kind in GENERATIVE


def batches(rt: Runtime, dataset: Dataset, batch_size: int = EVAL_BATCH, **kw: Any) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, collate_fn=rt.loaded.collate, **kw)


def default_device() -> torch.device:
    """accelerate's device for this process: its GPU (the local rank's under a multi-GPU
    launch), a TPU core, or the CPU when there is none or ACCELERATE_USE_CPU is set."""
    from accelerate import PartialState

    return PartialState().device


def on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on `device` (strings and lists stay as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def base_features(loaded: LoadedModel, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of the frozen base model over a whole split (prototypes, routing),
    on the CPU: they are small, and results from several runtimes meet there."""
    loaded.module.eval()
    feats, labels = [], []
    loader = DataLoader(dataset, batch_size=EVAL_BATCH, collate_fn=loaded.collate)
    with torch.no_grad():
        for batch in loader:
            feats.append(loaded.forward_features(on_device(batch, loaded.device)).float().cpu())
            labels.append(batch["labels"])
    return torch.cat(feats), torch.cat(labels)


def build(
    task: TaskConfig, lora: Mapping[str, Any] | None = None, prototypes: torch.Tensor | None = None
) -> Runtime:
    """Load the task's model and data onto accelerate's device, attach the frozen head, wrap
    with LoRA (PEFT puts the LoRA weights beside the layers they adapt).

    `lora` is a stored PEFT config (evaluating a commit); None builds one from the task file.
    `prototypes` skips recomputing the head (they are stored with expert commits).
    """
    from peft import get_peft_model

    loaded = load_model(task.model, task.data.image_size or 64)
    loaded.to(default_device())
    data = load_task_data(task.data, task.optim.seed)
    if task.data.validation is not None:
        data = carve_validation(data, task.data.validation, task.optim.seed)
    if loaded.kind not in GENERATIVE and loaded.head is None:
        if data.num_classes is None:
            raise AdbError(
                f"task {task.name}: data has no labels; give data.label for a classifier"
            )
        if prototypes is None:
            feats, labels = base_features(loaded, data.train)
            prototypes = class_prototypes(feats, labels, data.num_classes)
        loaded.head = PrototypeHead(prototypes).to(loaded.device)
    for p in loaded.module.parameters():
        p.requires_grad_(False)
    peft = get_peft_model(loaded.module, lora_config(task, loaded, lora))
    return Runtime(task, loaded, data, peft)


def lora_config(task: TaskConfig, loaded: LoadedModel, lora: Mapping[str, Any] | None) -> Any:
    """The `peft.LoraConfig` a runtime wraps its model with: the stored PEFT config `lora`, or
    the task file's when None; its target modules checked against the model first."""
    from peft import LoraConfig

    kwargs = _lora_kwargs(task, loaded, lora)
    check_targets(loaded, kwargs.get("target_modules"), task.name)
    return LoraConfig(**kwargs)


def check_targets(loaded: LoadedModel, targets: Any, task: str) -> None:
    """Refuse `target_modules` that match no layer in one line (PEFT raises a traceback).

    Matching as PEFT does: a string is a regex on the full module name, a list names
    modules exactly or by their last dotted parts.
    """
    if targets is None or targets == "all-linear":
        return
    names = [n for n, _ in loaded.module.named_modules() if n]
    if isinstance(targets, str):
        try:
            hit = any(re.fullmatch(targets, n) for n in names)
        except re.error as exc:
            raise AdbError(f"task {task}: lora.target_modules is not a regex ({exc})") from None
    else:
        hit = any(n == t or n.endswith("." + t) for n in names for t in targets)
    if not hit:
        raise AdbError(
            f"task {task}: lora.target_modules = {targets!r} match no layer of the model; "
            f"use layer names such as {', '.join(loaded.target_modules[:4])}"
        )


def _lora_kwargs(
    task: TaskConfig, loaded: LoadedModel, stored: Mapping[str, Any] | None
) -> dict[str, Any]:
    if stored is not None:
        keys = (
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "rank_pattern",
            "alpha_pattern",
            "use_rslora",
        )
        return {k: stored[k] for k in keys if stored.get(k) is not None}
    return {
        "r": task.lora.r,
        "lora_alpha": task.lora.alpha,
        "lora_dropout": task.lora.dropout,
        "target_modules": task.lora.target_modules or loaded.target_modules,
    }


def lora_shape(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two LoRA configs build the same layers: rank, alpha and targets."""
    targets = config.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list | set | tuple) else targets
    return (
        config.get("r"),
        float(config.get("lora_alpha") or 0),
        repr(targets),
        bool(config.get("use_rslora")),  # PEFT saves False; a task file says nothing
    )


class RuntimeCache:
    """Runtimes by (model, data, seed) and LoRA shape: `adb run` trains and evaluates dozens of
    times on the same few tasks, and rebuilding model, data and prototypes each time would
    cost more than the training itself."""

    def __init__(self) -> None:
        self._runtimes: dict[str, list[Runtime]] = {}

    def get(self, task: TaskConfig, lora: Mapping[str, Any] | None = None) -> Runtime:
        key = repr(
            (task.model.model_dump(mode="json"), task.data.model_dump(mode="json"), task.optim.seed)
        )
        for rt in self._runtimes.get(key, []):
            want = lora if lora is not None else _lora_kwargs_as_config(task, rt.loaded)
            if lora_shape(rt.peft.peft_config["default"].to_dict()) == lora_shape(want):
                return rt
        rt = build(task, lora)
        self._runtimes.setdefault(key, []).append(rt)
        return rt


def _lora_kwargs_as_config(task: TaskConfig, loaded: LoadedModel) -> dict[str, Any]:
    kw = _lora_kwargs(task, loaded, None)
    return {"r": kw["r"], "lora_alpha": kw["lora_alpha"], "target_modules": kw["target_modules"]}


def fresh_lora(rt: Runtime, seed: int) -> None:
    """Re-initialise every LoRA layer as PEFT does for a new adapter (A random, B zero), seeded."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in rt.peft.modules():
        if isinstance(module, LoraLayer):
            module.reset_lora_parameters("default", True)


def lora_parameters(rt: Runtime) -> dict[str, torch.nn.Parameter]:
    """Live LoRA parameters keyed by the names PEFT saves (adapter name dropped)."""
    return aligner.lora_parameters(rt.peft)


def get_lora(rt: Runtime) -> dict[str, torch.Tensor]:
    """A detached copy of the LoRA weights, keyed like a PEFT adapter_model.safetensors."""
    return {k: p.detach().clone().cpu() for k, p in lora_parameters(rt).items()}


def set_lora(rt: Runtime, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load adapter weights into the live LoRA parameters (names and shapes must match)."""
    live = lora_parameters(rt)
    missing = sorted(set(live) - set(tensors))
    extra = sorted(set(tensors) - set(live))
    if missing or extra:
        which = missing[0] if missing else extra[0]
        raise MismatchError(
            f"adapter tensor '{which}' does not fit the model's LoRA layers "
            f"({len(missing)} missing, {len(extra)} extra); use the same lora r and target_modules"
        )
    with torch.no_grad():
        for name, p in live.items():
            src = tensors[name]
            if src.shape != p.shape:
                raise MismatchError(
                    f"tensor '{name}' is {tuple(src.shape)} but the model wants {tuple(p.shape)}; "
                    "use the same lora r as the stored adapter"
                )
            p.copy_(src.to(p.dtype))


def load_adapter(
    peft: Any, tensors: Mapping[str, torch.Tensor], adapter: str = "default", where: str = "model"
) -> None:
    """Load adapter weights, keyed as PEFT saves them, into the named adapter of a PEFT model.

    PEFT itself only warns about a tensor that has no place in the model and leaves a layer it
    found no tensor for at its initial value; an export or a router built that way would be
    silently wrong, so both are refused here, in one line, as are wrong shapes."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    places = get_peft_model_state_dict(peft, adapter_name=adapter)
    missing = sorted(set(places) - set(tensors))
    extra = sorted(set(tensors) - set(places))
    if missing or extra:
        which = f"'{extra[0]}' has no place in" if extra else f"'{missing[0]}' is missing for"
        raise MismatchError(
            f"adapter tensor {which} the {where} ({len(extra)} without a place, {len(missing)} "
            "missing); use the base model the adapter was trained on"
        )
    for name, place in places.items():
        if tuple(tensors[name].shape) != tuple(place.shape):
            raise MismatchError(
                f"tensor '{name}' is {tuple(tensors[name].shape)} but the {where} wants "
                f"{tuple(place.shape)}; use the base model the adapter was trained on"
            )
    set_peft_model_state_dict(peft, dict(tensors), adapter_name=adapter)


def logits_over(rt: Runtime, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the current adapter over a split (classification)."""
    rt.peft.eval()
    out, labels = [], []
    with torch.no_grad():
        for batch in batches(rt, dataset):
            out.append(rt.loaded.logits(on_device(batch, rt.loaded.device)).float().cpu())
            labels.append(batch["labels"])
    return torch.cat(out), torch.cat(labels)


def accuracy(rt: Runtime, dataset: Dataset | None = None) -> float:
    """Accuracy on the eval split: classification accuracy, or normalised exact match."""
    dataset = dataset if dataset is not None else rt.data.eval
    if dataset is None:
        raise AdbError(f"task {rt.task.name} has no eval split; add data.eval")
    if rt.generative:
        from adapterdb.trainers.generate import exact_match

        return exact_match(rt, dataset)
    logits, labels = logits_over(rt, dataset)
    return float((logits.argmax(1) == labels).float().mean()) if labels.numel() else 0.0


def iter_forever(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader
