"""LoRA structure: pairing A/B factor tensors per module and the product ΔW = B·A·s.

PEFT saves factors as `<module>.lora_A.weight` / `<module>.lora_B.weight`. Linear LoRA has
A: (r, in), B: (out, r); Conv LoRA has A: (r, in, kh, kw), B: (out, r, 1, 1). In both cases
ΔW = (B.flatten(1) @ A.flatten(1)) · s, reshaped to the base weight's shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adapterdb.adapter import LORA_A as _A
from adapterdb.adapter import LORA_B as _B
from adapterdb.adapter import lora_scale
from adapterdb.errors import MismatchError


@dataclass(frozen=True)
class LoraPair:
    """The two factor tensors of one LoRA-adapted module."""

    module: str
    a: str
    b: str


def lora_pairs(names: Iterable[str]) -> tuple[list[LoraPair], list[str]]:
    """Split tensor names into LoRA (A, B) pairs and the rest (dense or unpaired tensors)."""
    names = list(names)
    present = set(names)
    pairs: list[LoraPair] = []
    paired: set[str] = set()
    for name in names:
        if name.endswith(_A):
            module = name[: -len(_A)]
            b = module + _B
            if b in present:
                pairs.append(LoraPair(module, name, b))
                paired.update((name, b))
    rest = [n for n in names if n not in paired]
    return pairs, rest


def rank_of(a: torch.Tensor) -> int:
    return int(a.shape[0])


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = B·A·scale in float32, shaped like the adapted weight (2-D or conv 4-D)."""
    if a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[1]:
        raise MismatchError(
            f"LoRA factors do not pair: A is {list(a.shape)}, B is {list(b.shape)}; "
            "re-save the adapter with PEFT"
        )
    prod = b.flatten(1).float() @ a.flatten(1).float()
    if a.dim() > 2:
        prod = prod.reshape(b.shape[0], *a.shape[1:])
    return prod * scale


def pair_scale(config: Mapping[str, Any], pair: LoraPair, a: torch.Tensor) -> float:
    """The scaling of one pair, from the PEFT config and the factor's actual rank."""
    return lora_scale(config, module_path(pair.module), rank_of(a))


def module_path(saved_name: str) -> str:
    """`base_model.model.x.y` (PEFT's saved prefix) -> `x.y`, the name patterns match on."""
    prefix = "base_model.model."
    return saved_name[len(prefix) :] if saved_name.startswith(prefix) else saved_name
