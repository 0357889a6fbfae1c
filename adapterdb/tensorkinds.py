"""What each tensor of a saved PEFT LoRA adapter is: a task-vector factor or a value.

Merge methods (TIES' trim and sign election, DARE's drops, MagMax, TALL, EMR/ConDU masks,
λ-scaling) are defined on task vectors τ_t = θ_t − θ_0. In a LoRA adapter those are the
factors; but PEFT's `adapter_model.safetensors` also holds tensors that are *values*, whose
zero is not "no change":
- full copies of `modules_to_save` modules (a sequence classifier's `classifier.weight` and
  `.bias`), biases saved by `bias="all"` / `"lora_only"`, and trainable-token rows
  (`trainable_tokens_delta` holds the new rows, not a difference);
- DoRA's `lora_magnitude_vector`: the column norms m of the adapted weight, W' = m·V/‖V‖_c.
Treating those as task vectors silently wrecks them (TIES keeps the top 20% of a head and
zeroes the rest; a DoRA magnitude of 0 switches the layer off). So the kind is decided per
tensor from its saved name, here, and `adapterdb.merging.fullweights` says how each method
merges the kinds that are not factors.

The name is enough: PEFT saves LoRA factors under fixed suffixes (`lora_A.weight`,
`lora_B.weight`, `lora_B.bias` for `lora_bias=True`, `lora_embedding_A`/`_B` for embeddings)
and DoRA magnitudes as `lora_magnitude_vector` (`.weight` in some versions). Anything else is
a value: treating an unknown tensor as a full weight (averaged) is the choice that cannot
destroy it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

FACTOR_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_embedding_A",
    ".lora_embedding_B",
)
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")


class Kind(enum.Enum):
    """The kinds of tensor a LoRA adapter saves (the value is how messages name them)."""

    FACTOR = "LoRA factor"
    FULL = "full weight (modules_to_save, bias or trainable tokens)"
    MAGNITUDE = "DoRA magnitude"

    @property
    def is_delta(self) -> bool:
        """True for the kind merge methods are defined on (part of a task vector)."""
        return self is Kind.FACTOR


def kind_of(name: str) -> Kind:
    """The kind of the saved tensor `name` (see the module doc for the rule)."""
    if name.endswith(FACTOR_SUFFIXES):
        return Kind.FACTOR
    if name.endswith(MAGNITUDE_SUFFIXES):
        return Kind.MAGNITUDE
    return Kind.FULL


def classify(names: Iterable[str]) -> dict[str, Kind]:
    """Name -> kind for every tensor of an adapter."""
    return {name: kind_of(name) for name in names}


def values(kinds: Mapping[str, Kind]) -> list[str]:
    """The names that are values (not factors), in order: what a merge averages instead."""
    return [name for name, kind in kinds.items() if not kind.is_delta]


def summary(kinds: Mapping[str, Kind]) -> str:
    """'2 full weight (...) and 4 DoRA magnitude tensors' for the non-factor names, '' if none."""
    counts = {k: sum(1 for v in kinds.values() if v is k) for k in (Kind.FULL, Kind.MAGNITUDE)}
    parts = [f"{n} {k.value.split(' (')[0]}" for k, n in counts.items() if n]
    if not parts:
        return ""
    return f"{' and '.join(parts)} tensor{'s' if sum(counts.values()) != 1 else ''}"
