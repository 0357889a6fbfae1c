"""`PamCallback`: PAM inside a Hugging Face `Trainer` (or TRL's `SFTTrainer`) run.

A user's own training script keeps its model, data, optimiser and launcher; the callback adds
what `adb train` adds around its loop: the branch's global adapter read at the start, PAM's
alignment step (`adapterdb.aligner.Aligner`, the one `adb train` uses) after every optimiser
step, and at the end the expert committed on `refs/experts/<branch>/<task>` by the commit
builder `adb train` uses, so `adb merge --method pam` takes it like any other expert.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Literal, Protocol

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from adapterdb.aligner import Aligner, GlobalAdapter, check_settings, unwrap
from adapterdb.alignment import Reinit, Scope
from adapterdb.errors import AdbError
from adapterdb.storage.refs import check_ref_name
from adapterdb.storage.store import Store
from adapterdb.trainers.config import TASK_NAME, AlignSpec
from adapterdb.trainers.loop import NO_GLOBAL, TrainResult, commit_trained, global_adapter


class _Facade(Protocol):
    """The public `adapterdb.Store` (adapterdb/api.py): it wraps a low-level store."""

    storage: Store


StoreLike = Store | str | os.PathLike[str] | _Facade


class PamCallback(TrainerCallback):
    """Align a PEFT model's LoRA with a global adapter every `every` optimiser steps and
    commit the trained expert to the store.

    The global adapter is `global_adapter` (an `Adapter`, a PEFT folder or a dict of
    tensors) or else the head of `branch` in `store` (a path, an `adapterdb.Store`, a
    low-level store, or None: the nearest `.adb` upwards, as the CLI finds it). An empty
    branch means nothing to align to yet: training runs as is and the commit says so
    (`stats.align_skipped`), as `adb train` does for a branch's first task. `p`, `every`,
    `reinit` and `scope` are task.yaml's `align` settings. `init="global"` (PAM, and
    `adb train`'s default) copies the global adapter into the LoRA when training begins, so
    the expert starts as a copy of it; `init="keep"` trains the LoRA the script built. With
    `commit`, the main process commits the expert at the end; its id is then in `commit_id`.
    """

    def __init__(
        self,
        store: StoreLike | None = None,
        branch: str = "main",
        task: str | None = None,
        global_adapter: GlobalAdapter | None = None,
        p: float = 50.0,
        every: int = 100,
        reinit: Reinit = "global",
        scope: Scope = "global",
        init: Literal["global", "keep"] = "global",
        commit: bool = True,
        message: str | None = None,
    ) -> None:
        check_settings(p, every, reinit, scope)
        check_ref_name(branch)
        if init not in ("global", "keep"):
            raise AdbError(f"PamCallback(init={init!r}) is unknown; use 'global' or 'keep'")
        if commit:
            _check_task(task)
        self.branch, self.task, self.commit, self.message = branch, task, commit, message
        self.align = AlignSpec(p=p, every=every, reinit=reinit, scope=scope)
        self.init = init
        self.global_adapter = global_adapter
        self.store = open_store(store) if commit or global_adapter is None else None
        self.aligner: Aligner | None = None
        self.align_skipped: str | None = None
        self.commit_id: str | None = None
        self._head: str | None = None
        self._started = 0.0
        self._logged = 0  # alignment checks already shown in the Trainer's logs

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Read the global adapter and build the aligner on the model the Trainer trains."""
        self._started = time.perf_counter()
        model = peft_model(model)
        glob: GlobalAdapter | None = self.global_adapter
        if glob is None:
            assert self.store is not None
            self._head, glob = global_adapter(self.store, self.branch)
        elif self.store is not None:  # the expert's parent: the branch it will be merged into
            self._head = self.store.refs.read(f"refs/heads/{self.branch}")
        if glob is None:
            self.align_skipped = NO_GLOBAL
            return
        a = self.align
        self.aligner = Aligner(model, glob, a.p, a.every, a.reinit, a.scope)
        if self.init == "global" and state.global_step == 0:  # not again on a resumed run
            self.aligner.start_from_global()
        self.aligner.steps = state.global_step  # a resumed run goes on counting from there

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """Once per optimiser step (the Trainer counts gradient accumulation for us)."""
        if self.aligner is not None:
            self.aligner.step()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Put the newest check's figures into this log line. The Trainer appends a copy of
        `logs` to `state.log_history` before callbacks see it, so both are updated."""
        checks = self.aligner.checks if self.aligner is not None else []
        if logs is None or len(checks) == self._logged:
            return
        self._logged = len(checks)
        figures = {
            "pam_reset_fraction": checks[-1]["reset_fraction"],
            "pam_misaligned_top_p": checks[-1]["misaligned_top_p"],
        }
        logs.update(figures)
        if state.log_history:
            state.log_history[-1].update(figures)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Commit the expert (main process only), with `adb train`'s metadata."""
        if not self.commit or not state.is_world_process_zero:
            return
        from peft import get_peft_model_state_dict

        assert self.store is not None and self.task is not None
        model = peft_model(model)
        seconds = time.perf_counter() - self._started
        checks = self.aligner.checks if self.aligner is not None else []
        result = TrainResult(
            None, 0.0, state.global_step, seconds, checks, self.align_skipped, seconds,
            device_label(args),
        )  # fmt: skip
        accuracy = last_eval_accuracy(state)
        evaluated = {"accuracy": {self.task: accuracy}} if accuracy is not None else {}
        self.commit_id = commit_trained(
            self.store, self.branch, self._head, self.task,
            get_peft_model_state_dict(model), model.peft_config["default"].to_dict(),
            {"align": self.align.model_dump(), "init": self.init}, result, evaluated, {},
            self.message,
        )  # fmt: skip


def open_store(store: StoreLike | None) -> Store:
    """The low-level store behind any way of naming one (see `PamCallback`)."""
    if store is None:
        return Store.find()
    if isinstance(store, Store):
        return store
    inner = getattr(store, "storage", None)  # the facade `adapterdb.Store` wraps one
    if isinstance(inner, Store):
        return inner
    if isinstance(store, str | os.PathLike):
        return Store.open(store)
    raise AdbError(
        f"store is a {type(store).__name__}; pass a store path, an adapterdb.Store, or None "
        "for the nearest .adb upwards"
    )


def peft_model(model: torch.nn.Module | None) -> Any:
    """The PEFT model the Trainer trains, outside any DDP / FSDP / compile wrapper."""
    inner = None if model is None else unwrap(model)
    if inner is None or not hasattr(inner, "peft_config"):
        raise AdbError(
            f"PamCallback needs a PEFT model, got {type(inner).__name__}; wrap it with "
            "peft.get_peft_model(model, LoraConfig(...)) (or pass peft_config= to SFTTrainer)"
        )
    return inner


def device_label(args: TrainingArguments) -> str:
    """Where it trained, as `adb train` records it: device, precision, process count."""
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return f"{args.device} {precision} x{args.world_size}"


def last_eval_accuracy(state: TrainerState) -> float | None:
    """The run's last `eval_accuracy` (a `compute_metrics` returning `accuracy`), as A_t."""
    found = [row["eval_accuracy"] for row in state.log_history if "eval_accuracy" in row]
    return float(found[-1]) if found else None


def _check_task(task: str | None) -> None:
    if task is None or not re.fullmatch(TASK_NAME, task) or len(task) > 100:
        raise AdbError(
            f"PamCallback(task={task!r}): committing needs a task name of letters, digits, '.', "
            "'_' and '-' (it names the expert ref); pass task='NAME' or commit=False"
        )
