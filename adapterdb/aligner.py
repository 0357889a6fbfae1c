"""`Aligner`: PAM's training-time step on a live model, for any training loop.

PAM trains an expert against a frozen global adapter W_G and, every `every` optimiser steps,
re-initialises the expert's sign conflicts on the top-p% of |W_G| (`adapterdb/alignment.py`).
This class is that step, and the only one: `adb train`'s loop, the Hugging Face callback
(`adapterdb.integrations.PamCallback`) and a user's own loop all call it, so the three cannot
reset different entries given the same weights.

It works on the model's live LoRA parameters, named as PEFT saves them, so a global adapter
read from a PEFT folder, an `Adapter` or the store lines up name for name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from adapterdb.adapter import Adapter, load_peft
from adapterdb.alignment import (
    AlignReport,
    Reinit,
    Scope,
    align_adapter_,
    alignment_thresholds,
)
from adapterdb.errors import AdbError, MismatchError

GlobalAdapter = Adapter | str | os.PathLike[str] | Mapping[str, torch.Tensor]


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Live LoRA parameters keyed by the names PEFT saves (`.default`, the adapter name,
    dropped), so they match an `adapter_model.safetensors` name for name."""
    return {
        name.replace(".default", ""): p for name, p in model.named_parameters() if "lora_" in name
    }


def check_settings(p: float, every: int, reinit: str, scope: str) -> None:
    """Refuse bad PAM settings in one line each, before any training starts."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 100:
        raise AdbError(f"PAM p={p!r} is out of range; use a percentage in [0, 100]")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise AdbError(f"PAM every={every!r} is not a step count; use a whole number >= 1")
    if reinit not in ("global", "zero"):
        raise AdbError(f"PAM reinit={reinit!r} is unknown; use 'global' or 'zero'")
    if scope not in ("global", "tensor"):
        raise AdbError(f"PAM scope={scope!r} is unknown; use 'global' or 'tensor'")


def check_row(step: int, report: AlignReport) -> dict[str, float]:
    """One alignment check as expert commits record it (`stats.align_checks`)."""
    t = report.total
    return {
        "step": step,
        "reset_fraction": report.reset_fraction,
        "sign_conflicts": t.conflict_fraction,
        "misaligned_top_p": t.misaligned_fraction,
    }


class Aligner:
    """Align `model`'s LoRA with `global_adapter` every `every` calls of `step()`.

    Call `step()` once per optimiser step (after `optimizer.step()`); it returns the check's
    `AlignReport` on the steps that align and None on the others. `align()` aligns now.
    `checks` holds one row per check (`check_row`). The thresholds are computed once, here:
    W_G is frozen for the whole task, so τ never changes.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        global_adapter: GlobalAdapter,
        p: float = 50.0,
        every: int = 100,
        reinit: Reinit = "global",
        scope: Scope = "global",
    ) -> None:
        check_settings(p, every, reinit, scope)
        self.every, self.reinit = every, reinit
        self.params = lora_parameters(unwrap(model))
        glob = _matching(self.params, _global_tensors(global_adapter))
        self.thresholds = alignment_thresholds(glob, p, scope)
        self.global_ = glob
        self._follow_devices()
        self.steps = 0  # optimiser steps seen (a resumed run sets it to where it resumes)
        self.checks: list[dict[str, float]] = []

    def step(self) -> AlignReport | None:
        """Count one optimiser step; align when the count is a multiple of `every`."""
        self.steps += 1
        return self.align() if self.steps % self.every == 0 else None

    def align(self) -> AlignReport:
        """One PAM check now, in place on the live parameters; recorded in `checks`."""
        self._follow_devices()
        report = align_adapter_(self.params, self.global_, self.thresholds, self.reinit)
        self.checks.append(check_row(self.steps, report))
        return report

    def start_from_global(self) -> None:
        """Copy W_G into the live LoRA: PAM's expert starts as a copy of the global adapter
        (`init: global` in task.yaml), so alignment only undoes what training changed."""
        self._follow_devices()
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.global_[name])

    def _follow_devices(self) -> None:
        """Each W_G tensor lives where its parameter does: a loop may move the model after
        building us (`accelerator.prepare`), a model split over GPUs (`device_map="auto"`)
        has its LoRA on several, and the kernel compares each pair on one device."""
        for name, param in self.params.items():
            if self.global_[name].device != param.device:
                self.global_[name] = self.global_[name].to(param.device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / FSDP / DeepSpeed / torch.compile wrappers: their parameter
    names carry a `module.` or `_orig_mod.` prefix that no saved adapter has."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def _global_tensors(value: GlobalAdapter) -> Mapping[str, torch.Tensor]:
    if isinstance(value, Adapter):
        return value.tensors
    if isinstance(value, str | os.PathLike):
        return load_peft(value).tensors
    if isinstance(value, Mapping):
        return value
    raise AdbError(
        f"global_adapter is a {type(value).__name__}; pass an adapterdb.Adapter, a PEFT "
        "folder path or a dict of tensors"
    )


def _matching(
    params: Mapping[str, torch.nn.Parameter], glob: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The global's tensors for the model's LoRA parameters, in the parameters' order. Both
    sides must name the same LoRA tensors with the same shapes; values the global also holds
    (a classifier in `modules_to_save`) are not aligned and are ignored. The tensors stay
    where they are: τ is computed from them as `adb train` always has."""
    if not params:
        raise AdbError(
            "the model has no LoRA parameters; wrap it with "
            "peft.get_peft_model(model, LoraConfig(...)) first"
        )
    lora = {n for n in glob if "lora_" in n}
    missing, extra = sorted(set(params) - lora), sorted(lora - set(params))
    if missing or extra:
        which = (
            f"'{missing[0]}' is missing from the global adapter"
            if missing
            else f"the global adapter's '{extra[0]}' is not in the model"
        )
        raise MismatchError(
            f"LoRA tensor {which} ({len(missing)} missing, {len(extra)} extra); train with the "
            "global adapter's LoRA config (same r and target_modules)"
        )
    out = {}
    for name, p in params.items():
        t = glob[name]
        if not isinstance(t, torch.Tensor):
            raise AdbError(f"global tensor '{name}' is a {type(t).__name__}, not a torch.Tensor")
        if t.shape != p.shape:
            raise MismatchError(
                f"LoRA tensor '{name}': model shape {tuple(p.shape)} != global "
                f"{tuple(t.shape)}; use the global adapter's lora r"
            )
        out[name] = t
    return out
