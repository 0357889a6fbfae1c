"""PAM inside anyone's training loop.

- `Aligner(model, global_adapter, p=50, every=100, reinit="global", scope="global")`: call
  `.step()` after each optimiser step of a plain PyTorch / accelerate loop.
- `PamCallback(store=None, branch="main", task=..., ...)`: a `transformers.TrainerCallback`
  for `Trainer` and TRL's `SFTTrainer`; it aligns, logs the misaligned fraction, and commits
  the expert so that `adb merge --method pam` takes it.

Both run the one alignment step `adb train` runs (`adapterdb/aligner.py`). This module is a
facade: each name is imported from its layer on first use, so importing it (or `adapterdb`)
costs nothing and never loads transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapterdb.aligner import Aligner
    from adapterdb.trainers.callback import PamCallback

__all__ = ["Aligner", "PamCallback"]

_HOMES = {"Aligner": "adapterdb.aligner", "PamCallback": "adapterdb.trainers.callback"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
