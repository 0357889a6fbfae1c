"""ConDU's inference as an `nn.Module`: each input goes to its top-K decoupled experts.

`adb eval --routing condu` measures this on the eval splits of task files; `router` hands the
same computation to a user's own evaluation code, with nothing but the store: the base model
comes from the task file the experts recorded, the class prototypes from the expert commits
(`extra.objects.prototypes`, the frozen heads they were trained with) and the experts are
decoupled from the ConDU commit's unified delta and triggers. Routing and averaging are the
functions eval runs (`evaluate.route`, `evaluate.routed_logits`), so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from adapterdb.adapter import to_torch
from adapterdb.errors import AdbError
from adapterdb.storage.commits import Commit
from adapterdb.storage.store import Store
from adapterdb.trainers import runtime
from adapterdb.trainers.config import TaskConfig
from adapterdb.trainers.evaluate import (
    condu_tasks,
    decoupled_experts,
    expert_task,
    lineage_experts,
    route,
    routed_logits,
)
from adapterdb.trainers.heads import DEFAULT_SCALE, PrototypeHead
from adapterdb.trainers.merge import open_source
from adapterdb.trainers.models import LoadedModel, load_model


class Router(nn.Module):
    """A base model with a ConDU commit's decoupled experts loaded as named PEFT adapters
    (`expert0`, `expert1`, ... in the order of `tasks`) and each task's frozen class head.

    Inputs are the keyword tensors the task's model takes, on any device (they are moved to
    the router's): `input_ids` and `attention_mask` for a transformers text classifier,
    `pixel_values` for an image model (EfficientNet, CLIP's vision tower). `collate(rows)`
    builds them from rows shaped like the task files' data (`{"text": ...}`, `{"image": ...}`);
    a `labels` entry is ignored. The router is in eval mode with every parameter frozen;
    `.to(device)` moves the model, the experts and the heads together.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        peft: Any,
        tasks: Sequence[str],
        heads: Sequence[PrototypeHead],
        top_k: int,
    ) -> None:
        super().__init__()
        self.model = peft  # the PEFT model: base weights and every expert's LoRA
        self.heads = nn.ModuleList(heads)
        self.tasks = list(tasks)
        self.top_k = top_k
        self._loaded = loaded  # the features/collate closures over the base inside `model`
        self.eval()
        self.requires_grad_(False)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch for `forward` from data rows, tokenised / resized as in training."""
        return self._loaded.collate(rows)

    def route(self, **batch: Any) -> torch.Tensor:
        """(N, k) indices into `tasks`: the experts each input goes to, by the max cosine of its
        base-model feature (every adapter off) to each task's class prototypes."""
        batch = runtime.on_device(batch, self._loaded.device)
        with torch.no_grad(), self.model.disable_adapter():
            features = self._loaded.forward_features(batch)
        return route(features, [h.prototypes for h in self.heads], self.top_k)

    def forward(self, task: str | None = None, **batch: Any) -> torch.Tensor:
        """Logits averaged over each input's top-K experts, as `adb eval --routing condu`.

        `task` names the class head (the task whose classes the logits score), as eval scores
        each task's eval split with that task's head; None scores the classes of every task,
        concatenated in the order of `tasks` (class-incremental use, no task id at all)."""
        heads = list(self.heads) if task is None else [self.heads[self._index(task)]]
        batch = runtime.on_device(batch, self._loaded.device)
        chosen = self.route(**batch)

        def logits(e: int) -> torch.Tensor:
            self.model.set_adapter(adapter_name(e), inference_mode=True)
            features = self._loaded.forward_features(batch)
            return torch.cat([h.logits(features) for h in heads], 1)

        return routed_logits(chosen, logits, len(self.tasks))

    def _index(self, task: str) -> int:
        if task not in self.tasks:
            raise AdbError(f"task {task!r} is not routed here; use one of {', '.join(self.tasks)}")
        return self.tasks.index(task)


def adapter_name(e: int) -> str:
    """PEFT adapter names are attribute names; task names may hold dots, so experts go by index."""
    return f"expert{e}"


def router(store: Store, rev: str, top_k: int = 2) -> Router:
    """ConDU's inference for the merge commit `rev`: a `Router` that sends each input to its
    `top_k` experts by class prototypes and averages their logits (see `Router`).

    Every expert of `rev` must have been trained by `adb train` (its commit holds the task file
    and the head's prototypes) on one base model. Built on accelerate's device, like eval."""
    if top_k < 1:
        raise AdbError(f"top_k = {top_k}: route each input to at least 1 expert")
    oid = store.resolve(rev)
    commit = store.read_commit(oid)
    tasks = condu_tasks(commit)
    experts = _experts(store, oid, rev, tasks)
    first = experts[0][0]
    loaded = load_model(first.model, first.data.image_size or 64)
    scale = float(loaded.head.scale) if loaded.head is not None else DEFAULT_SCALE
    heads = [_head(store, c, scale) for _, c in experts]
    src = open_source(oid, store)
    unified = {n: src.tensors[n] for n in src.tensors}
    decoupled = decoupled_experts(store, commit, unified)
    for p in loaded.module.parameters():
        p.requires_grad_(False)
    peft = _with_experts(first, loaded, src.config, [decoupled[t] for t in tasks])
    out = Router(loaded, peft, tasks, heads, min(top_k, len(tasks)))
    return out.to(runtime.default_device())


def _experts(
    store: Store, oid: str, rev: str, tasks: Sequence[str]
) -> list[tuple[TaskConfig, Commit]]:
    """The task file and expert commit of each task, all trained on one base model."""
    found = lineage_experts(store, oid)
    missing = [t for t in tasks if t not in found]
    if missing:
        raise AdbError(
            f"expert {missing[0]!r} of {rev} was not trained by `adb train` (no task file and "
            "prototypes in its history); route a ConDU merge of trained experts"
        )
    experts = [(expert_task(*found[t]), found[t][1]) for t in tasks]
    models = {_model_key(task) for task, _ in experts}
    if len(models) > 1:
        raise AdbError(
            f"the experts of {rev} were trained on {len(models)} different base models; "
            "ConDU routing needs one"
        )
    return experts


def _model_key(task: TaskConfig) -> str:
    """What makes two tasks' base features the same: the model (not its class prompts or label
    count, which only shape heads) and the image size."""
    spec = task.model.model_dump(mode="json", exclude={"prompts", "num_labels"})
    return repr((sorted(spec.items()), task.data.image_size))


def _head(store: Store, expert: Commit, scale: float) -> PrototypeHead:
    """The frozen head the expert was trained with, its unit prototypes as stored, bit for bit
    (PrototypeHead would normalise them a second time)."""
    proto_id = (expert.extra.get("objects") or {}).get("prototypes")
    if proto_id is None:
        raise AdbError(
            f"expert {expert.task!r} has no class prototypes (a generative task?); routing "
            "needs classification tasks"
        )
    prototypes = to_torch(store.objects.get_tensor(proto_id)).float()
    head = PrototypeHead(prototypes, scale)
    with torch.no_grad():
        head.prototypes.copy_(prototypes)
    return head


def _with_experts(
    task: TaskConfig,
    loaded: LoadedModel,
    config: Mapping[str, Any],
    experts: Sequence[Mapping[str, torch.Tensor]],
) -> Any:
    """`loaded.module` wrapped by PEFT with one named LoRA adapter per expert (ConDU experts
    share the unified commit's LoRA config)."""
    from peft import get_peft_model

    peft = get_peft_model(
        loaded.module, runtime.lora_config(task, loaded, config), adapter_name=adapter_name(0)
    )
    for e, tensors in enumerate(experts):
        if e:
            peft.add_adapter(adapter_name(e), runtime.lora_config(task, loaded, config))
        runtime.load_adapter(peft, tensors, adapter_name(e), f"model of task {task.name}")
    return peft
