"""The `Adapter` value type and PEFT-folder I/O.

An adapter is named tensors plus the PEFT `adapter_config.json` that gives them meaning.
Reading and writing use the PEFT folder layout so that `PeftModel.from_pretrained` loads
what `adb` writes and `adb` imports what PEFT saves.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapterdb.atomic_folder import check_complete, write_folder, write_text
from adapterdb.errors import AdbError, NotFoundError
from adapterdb.tensorfile import RawTensor, read_safetensors, write_safetensors

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class Adapter:
    """Named tensors (a LoRA's A/B factors, or a dense delta) and their PEFT config."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def check_finite(tensors: Mapping[str, RawTensor], where: str) -> None:
    """Refuse NaN/inf: a non-finite weight would poison every later merge silently."""
    for name, t in tensors.items():
        if t.nonfinite():
            raise AdbError(
                f"{where}: tensor {name[:80]!r} contains NaN or inf; fix the training run that "
                "produced it (or drop the tensor) before importing"
            )


def read_peft_config(path: Path) -> dict[str, Any]:
    """Read `adapter_config.json`, failing with a fix-it message when it is absent or bad."""
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdbError(
            f"{path} is not a PEFT adapter folder: {CONFIG_FILE} is missing "
            "(save one with model.save_pretrained(DIR))"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdbError(f"{cfg_path} is not valid JSON; re-save the adapter") from None
    if not isinstance(config, dict):
        raise AdbError(f"{cfg_path} must hold a JSON object, not {type(config).__name__}")
    check_lora_config(config, str(cfg_path))
    return config


def check_lora_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse LoRA settings that merge and diff compute with: found at import, not as a crash
    in a later merge. Keys PEFT fills with defaults may be absent, never of the wrong type."""
    for key in ("r", "lora_alpha"):
        if key in config:
            _check_setting(config[key], f"{key} = {config[key]!r}", where, whole=key == "r")
    for key in ("alpha_pattern", "rank_pattern"):
        pattern = config.get(key)
        if pattern is not None and not isinstance(pattern, dict):
            raise AdbError(
                f"{where}: {key} must map module names to numbers, not "
                f"{type(pattern).__name__}; fix it or re-save the adapter with PEFT"
            )
        for module, value in (pattern or {}).items():
            what = f"{key}[{module[:40]!r}] = {value!r}"
            _check_setting(value, what, where, whole=key == "rank_pattern")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdbError(f"{where}: use_rslora must be true or false; fix it or re-save the adapter")


def _check_setting(value: Any, what: str, where: str, whole: bool) -> None:
    """A rank is a whole number >= 1; an alpha a finite number (bool is neither)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if whole and not (number and type(value) is int and value >= 1):
        raise AdbError(f"{where}: {what[:80]} is not a LoRA rank (a whole number >= 1); fix it")
    if not whole and not (number and math.isfinite(value)):
        raise AdbError(f"{where}: {what[:80]} is not a finite number; fix it or re-save it")


def check_lora_shapes(tensors: Mapping[str, RawTensor], where: str) -> None:
    """LoRA factors of rank >= 1 whose A and B agree on the rank: a rank-0 or mismatched pair
    imports fine and crashes merge later."""
    for name, t in tensors.items():
        if not name.endswith((LORA_A, LORA_B)):
            continue
        axis = 0 if name.endswith(LORA_A) else 1
        if len(t.shape) < 2 or t.shape[axis] < 1:
            raise AdbError(
                f"{where}: tensor {name[:80]!r} has shape {list(t.shape)}, not a LoRA factor "
                "of rank >= 1; drop the layer or re-train it with r >= 1"
            )
        partner = tensors.get(name[: -len(LORA_A)] + LORA_B) if axis == 0 else None
        if partner is not None and len(partner.shape) >= 2 and partner.shape[1] != t.shape[0]:
            raise AdbError(
                f"{where}: tensor {name[:80]!r} has rank {t.shape[0]} but its lora_B has rank "
                f"{partner.shape[1]}; re-save the adapter with PEFT"
            )


def read_peft_raw(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, RawTensor], dict[str, str]]:
    """Read a PEFT folder as (config, raw tensors, safetensors metadata), without torch."""
    folder = Path(path)
    if not folder.is_dir():
        raise NotFoundError(f"{folder} is not a folder; pass a PEFT adapter folder")
    check_complete(folder)
    config = read_peft_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise AdbError(
            f"{folder} is not a PEFT adapter folder: {WEIGHTS_FILE} is missing "
            "(save with safe_serialization=True)"
        )
    tensors, metadata = read_safetensors(weights)
    check_tensors(tensors, str(weights))
    return config, tensors, metadata


def check_tensors(tensors: Mapping[str, RawTensor], where: str) -> None:
    """What every adapter must pass before it is stored, from a folder or from Python: some
    tensors, all finite, LoRA factors that fit together."""
    if not tensors:
        raise AdbError(f"{where} holds no tensors; nothing to import")
    check_finite(tensors, where)
    check_lora_shapes(tensors, where)


def write_peft_raw(
    path: str | os.PathLike[str],
    config: Mapping[str, Any],
    tensors: Mapping[str, RawTensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a PEFT folder from raw tensors: config and weights land together, as one unit
    (a kill never leaves weights without their config, see atomic_folder.py)."""
    text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    return write_folder(
        path,
        {
            WEIGHTS_FILE: lambda p: write_safetensors(
                p, tensors, {"format": "pt", **(metadata or {})}
            ),
            CONFIG_FILE: lambda p: write_text(p, text),
        },
    )


def check_adapter(adapter: Adapter, where: str) -> dict[str, Any]:
    """An `Adapter` built in Python holds what a PEFT folder would (str names to torch
    tensors, a valid LoRA config, str metadata); its config as plain JSON. Checked where one is
    handed in, so a wrong value is one line there, not a crash in a merge or an unreadable
    commit."""
    import torch

    if not isinstance(adapter.tensors, Mapping) or not isinstance(adapter.config, Mapping):
        raise AdbError(f"{where}: tensors and config must be dicts; build Adapter(tensors, config)")
    for name, t in adapter.tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise AdbError(
                f"{where}: {str(name)[:80]!r} maps to a {type(t).__name__}; an adapter maps "
                "tensor names (str) to torch tensors"
            )
    metadata = adapter.metadata
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdbError(f"{where}: metadata must map str to str (safetensors metadata)")
    config = plain_config(adapter.config)
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AdbError(
            f"{where}: the config is not plain JSON ({exc}); pass PEFT's config.to_dict()"
        ) from None
    check_lora_config(config, where)
    return config


def plain_config(value: Any) -> Any:
    """A PEFT config as JSON: `LoraConfig.to_dict()` holds sets (`target_modules`) and enums
    (`task_type`); sets become sorted lists, enums their values, keys strings."""
    if isinstance(value, Mapping):
        return {str(k): plain_config(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [plain_config(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if hasattr(value, "value") and not isinstance(value, int | float | str | bool):
        return value.value
    return value


def adapter_raw(adapter: Adapter, where: str) -> tuple[dict[str, Any], dict[str, RawTensor]]:
    """An in-memory adapter as (config, raw tensors), checked as `read_peft_raw` checks a
    folder: what `adb import` would refuse, committing it from Python refuses too."""
    config = check_adapter(adapter, where)
    raw = {name: from_torch(t) for name, t in adapter.tensors.items()}
    check_tensors(raw, where)
    return config, raw


def load_peft(path: str | os.PathLike[str]) -> Adapter:
    """Load a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) as torch tensors."""
    config, raw, metadata = read_peft_raw(path)
    return Adapter({k: to_torch(v) for k, v in raw.items()}, config, metadata)


def save_peft(adapter: Adapter, path: str | os.PathLike[str]) -> Path:
    """Write `adapter` as a PEFT folder that `PeftModel.from_pretrained` loads."""
    raw = {k: from_torch(v) for k, v in adapter.tensors.items()}
    return write_peft_raw(path, adapter.config, raw, adapter.metadata)


_TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def to_torch(raw: RawTensor) -> torch.Tensor:
    """A torch tensor over (a copy of) the raw bytes."""
    import torch

    dtype = torch_dtype(raw.dtype)
    if raw.numel == 0:
        return torch.empty(raw.shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw.data), dtype=dtype).reshape(raw.shape)


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code ("F32", "BF16", ...)."""
    import torch

    return getattr(torch, _TORCH_DTYPES[code])


def from_torch(t: torch.Tensor) -> RawTensor:
    """The raw little-endian bytes of a CPU tensor."""
    import torch

    code = dtype_code(t.dtype)
    flat = t.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
    return RawTensor(code, tuple(t.shape), data)


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code ("F32", "BF16", ...) of a torch dtype; one line for a dtype the
    format cannot hold (a complex or float8 tensor handed in from Python)."""
    name = str(dtype).removeprefix("torch.")
    for code, torch_name in _TORCH_DTYPES.items():
        if torch_name == name:
            return code
    raise AdbError(f"tensors of dtype {name} cannot be stored; convert them (e.g. .float()) first")


def lora_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """The LoRA scaling s in ΔW = B·A·s for one module, as PEFT computes it.

    Honours `alpha_pattern`/`rank_pattern` (matched on the module name's suffix, as PEFT
    does) and `use_rslora` (s = α/√r instead of α/r). Configs stored before import checked
    them are checked here too: a bad one is one line, not a crash mid-merge.
    """
    check_lora_config(config, "the adapter's stored adapter_config.json")
    if rank < 1:
        raise AdbError(f"LoRA factors of '{module}' have rank {rank}; drop the layer or re-train")
    alpha = float(config.get("lora_alpha", rank))
    for key, value in (config.get("alpha_pattern") or {}).items():
        if module == key or module.endswith("." + key):
            alpha = float(value)
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank
