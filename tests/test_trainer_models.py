"""Model loaders (tiny transformers folders written here, packaged models, the python: hatch),
PEFT wrapping of Linear and Conv2d targets, and the prototype heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from tiny_models import WORDS, save_clip, save_llama, save_llava, save_word_tokenizer
from torch import nn

from adapterdb.errors import AdbError, MismatchError
from adapterdb.trainers.config import ModelSpec, load_task
from adapterdb.trainers.heads import PrototypeHead, build_prototype_head, class_prototypes
from adapterdb.trainers.models import (
    LoadedModel,
    default_targets,
    load_model,
    mean_pool,
    plain_pointwise_convs,
)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForSequenceClassification, BertConfig

    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder


def _lora(module: nn.Module, targets: list[str]) -> nn.Module:
    return get_peft_model(module, LoraConfig(r=2, lora_alpha=4, target_modules=targets))


def _only_lora_has_grads(module: nn.Module) -> None:
    grads = {n for n, p in module.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(p.grad.abs().sum() > 0 for n, p in module.named_parameters() if n in grads)


def _perturb_lora_b(module: nn.Module) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_()


def test_sequence_classification_folder(bert_folder: Path) -> None:
    loaded = load_model(ModelSpec(path=bert_folder, task="sequence-classification", num_labels=4))
    assert loaded.kind == "sequence-classification"
    assert loaded.target_modules == ["query", "value"]
    items = [{"text": "a photo of a cat", "label": 1}, {"text": "dog", "label": 3}]
    batch = loaded.collate(items)
    assert batch["labels"].tolist() == [1, 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    loaded.module.eval()
    assert loaded.logits(batch).shape == (2, 4)  # num_labels from the task overrides 3
    before = loaded.forward_features(batch).detach()
    assert before.shape == (2, 8)
    peft_model = _lora(loaded.module, loaded.target_modules)
    torch.testing.assert_close(loaded.forward_features(batch), before)  # B = 0 at init
    F.cross_entropy(loaded.logits(batch), batch["labels"]).backward()
    _only_lora_has_grads(peft_model)
    _perturb_lora_b(peft_model)
    assert not torch.allclose(loaded.forward_features(batch), before)  # LoRA is in the path


def test_missing_or_broken_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(AdbError, match="is not a folder"):
        load_model(ModelSpec(path=tmp_path / "nope", task="causal-lm"))
    with pytest.raises(AdbError, match=r"cannot load .* with AutoModelForCausalLM") as info:
        load_model(ModelSpec(path=tmp_path, task="causal-lm"))
    assert "\n" not in str(info.value)


def test_clip_head_is_the_prompt_text_embeddings(tmp_path: Path) -> None:
    save_clip(tmp_path)
    prompts = ["a photo of a cat", "a photo of a dog", "a photo of it"]
    loaded = load_model(ModelSpec(path=tmp_path, task="clip", prompts=prompts))
    assert loaded.head is not None and loaded.head.num_classes == 3
    assert loaded.target_modules and all(
        n.startswith("vision_model.") and n.rsplit(".", 1)[1] in ("q_proj", "v_proj")
        for n in loaded.target_modules
    )
    images = [torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8) for _ in range(2)]
    batch = loaded.collate([{"image": im, "label": i} for i, im in enumerate(images)])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    loaded.module.eval()
    text = loaded.preprocessor(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = loaded.module(pixel_values=batch["pixel_values"], **text).logits_per_image
        torch.testing.assert_close(loaded.logits(batch), reference, rtol=1e-4, atol=1e-4)
    peft_model = _lora(loaded.module, loaded.target_modules)
    F.cross_entropy(loaded.logits(batch), batch["labels"]).backward()
    _only_lora_has_grads(peft_model)


def test_causal_lm_question_answer_batches(tmp_path: Path) -> None:
    save_llama(tmp_path)
    loaded = load_model(ModelSpec(path=tmp_path, task="causal-lm"))
    assert loaded.target_modules == ["q_proj", "v_proj"]
    batch = loaded.collate(
        [{"question": "what is it", "answer": "a cat"}, {"question": "dog", "answer": "yes"}]
    )
    ids = {w: i for i, w in enumerate(WORDS)}
    assert batch["input_ids"].tolist() == [
        [ids[w] for w in ("what", "is", "it", "a", "cat", "[EOS]")],
        [ids[w] for w in ("dog", "yes", "[EOS]", "[PAD]", "[PAD]", "[PAD]")],
    ]
    assert batch["lm_labels"].tolist() == [
        [-100, -100, -100, ids["a"], ids["cat"], ids["[EOS]"]],
        [-100, ids["yes"], ids["[EOS]"], -100, -100, -100],
    ]
    loaded.module.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = loaded.module(**inputs).logits[:, :-1]
    reference = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["lm_labels"][:, 1:].reshape(-1)
    )
    torch.testing.assert_close(loaded.lm_loss(batch), reference)
    assert loaded.forward_features(batch).shape == (2, 8)
    with pytest.raises(AdbError, match="build_prototype_head"):
        loaded.logits(batch)


def test_vision_to_text_loss_only_on_answers(tmp_path: Path) -> None:
    save_llava(tmp_path)
    loaded = load_model(ModelSpec(path=tmp_path, task="vision-to-text"))
    assert loaded.kind == "vision-to-text" and loaded.target_modules == ["q_proj", "v_proj"]
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    items = [
        {"question": "<image> what is it", "answer": "a cat", "image": image},
        {"question": "<image> it", "answer": "yes", "image": image},
    ]
    batch = loaded.collate(items)
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    ids = {w: i for i, w in enumerate(WORDS)}
    eos = loaded.preprocessor.tokenizer.eos_token_id
    assert eos is not None
    real = batch["attention_mask"].sum(1).tolist()
    assert real == [5 + 5 + 1, 5 + 2 + 1]  # 5 image tokens each, answers end with EOS
    answers = [row[row != -100].tolist() for row in batch["lm_labels"]]
    assert answers == [[ids["a"], ids["cat"], eos], [ids["yes"], eos]]
    loaded.module.eval()
    logits = loaded.module(
        **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    ).logits[:, :-1]
    reference = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["lm_labels"][:, 1:].reshape(-1)
    )
    torch.testing.assert_close(loaded.lm_loss(batch), reference)
    assert loaded.forward_features(batch).shape == (2, 8)
    peft_model = _lora(loaded.module, loaded.target_modules)
    loaded.lm_loss(batch).backward()
    _only_lora_has_grads(peft_model)


NETS = """
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def not_a_module():
    return 42
"""


def _task_yaml(folder: Path, python: str) -> Path:
    path = folder / "task.yaml"
    path.write_text(
        f"name: t\nmodel: {{python: '{python}'}}\n"
        "data: {builtin: fashion-mnist, classes: [0, 6], image_size: 8}\n"
        "optim: {steps: 1}\n"
    )
    return path


def test_python_hatch_conv_net_with_peft_lora(tmp_path: Path) -> None:
    (tmp_path / "nets.py").write_text(NETS)
    cfg = load_task(_task_yaml(tmp_path, "nets.py:build"))
    loaded = load_model(cfg.model, image_size=cfg.data.image_size)
    assert loaded.kind == "python" and loaded.target_modules == ["0", "2"]
    items = [{"image": torch.full((1, 28, 28), 30 * i, dtype=torch.uint8), "label": i % 2}
             for i in range(4)]  # fmt: skip
    batch = loaded.collate(items)
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    with torch.no_grad():
        loaded.head = build_prototype_head(loaded.forward_features(batch), batch["labels"], 2)
    peft_model = _lora(loaded.module, loaded.target_modules)
    lora_a = {n: m for n, m in peft_model.named_modules() if n.endswith("lora_A.default")}
    assert sorted(type(m).__name__ for m in lora_a.values()) == ["Conv2d", "Conv2d"]
    assert sorted(m.kernel_size for m in lora_a.values()) == [(1, 1), (3, 3)]
    F.cross_entropy(loaded.logits(batch), batch["labels"]).backward()
    _only_lora_has_grads(peft_model)


def test_python_hatch_by_module_name_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "adb_test_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model(ModelSpec(python="adb_test_nets:build"))
    assert isinstance(loaded.module, nn.Sequential)
    with pytest.raises(AdbError, match=r"returned int; return an nn\.Module"):
        load_model(ModelSpec(python="adb_test_nets:not_a_module"))
    with pytest.raises(AdbError, match="has no function 'missing'"):
        load_model(ModelSpec(python="adb_test_nets:missing"))
    with pytest.raises(AdbError, match="cannot import"):
        load_model(ModelSpec(python="no_such_module_xyz:build"))
    with pytest.raises(AdbError, match="cannot import"):
        load_model(ModelSpec(python=f"{tmp_path / 'absent.py'}:build"))


class PaddedConv(nn.Conv2d):
    """Like efficientnet_lite_pytorch's Conv2dStaticSamePadding: needs image_size to build."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, *, image_size: int) -> None:
        super().__init__(cin, cout, k, stride, bias=False)
        self.pad = nn.ZeroPad2d((k - 1) // 2 + image_size * 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


def test_plain_pointwise_convs_keeps_outputs_and_lets_peft_wrap() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        PaddedConv(3, 4, 1, image_size=8),
        PaddedConv(4, 4, 3, image_size=8),
        PaddedConv(4, 5, 1, stride=2, image_size=8),
        nn.Conv2d(5, 5, 1),
    )
    x = torch.randn(2, 3, 8, 8)
    want = net(x)
    assert plain_pointwise_convs(net) == 1
    assert type(net[0]) is nn.Conv2d
    assert [type(m) for m in net[1:3]] == [PaddedConv, PaddedConv]
    torch.testing.assert_close(net(x), want)
    peft_model = _lora(net, ["0", "3"])
    peft_model(x).sum().backward()
    _only_lora_has_grads(peft_model)


def test_train_mode_keeps_batchnorm_frozen() -> None:
    module = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.5))
    loaded = LoadedModel(module, "python", ["0"], collate=dict, features_fn=module)
    loaded.train()
    assert module[0].training and module[2].training and not module[1].training
    stats = module[1].running_mean.clone()
    loaded.forward_features(torch.randn(4, 3, 2, 2) + 5)
    assert torch.equal(module[1].running_mean, stats)


def test_default_targets_follow_naming_conventions() -> None:
    class Attention(nn.Module):
        def __init__(self, q: str, v: str) -> None:
            super().__init__()
            self.add_module(q, nn.Linear(2, 2))
            self.add_module(v, nn.Linear(2, 2))
            self.out = nn.Linear(2, 2)

    assert default_targets(nn.Sequential(Attention("q_proj", "v_proj"))) == ["q_proj", "v_proj"]
    assert default_targets(nn.Sequential(Attention("query", "value"))) == ["query", "value"]
    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Conv2d(1, 1, 1)))
    assert default_targets(plain) == ["0", "2.0"]


def _mean_pool_reference(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(hidden.shape[0], hidden.shape[2], dtype=torch.float64)
    for b in range(hidden.shape[0]):
        rows = [hidden[b, t].double() for t in range(hidden.shape[1]) if mask[b, t]]
        if rows:
            out[b] = torch.stack(rows).mean(0)
    return out


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 6),
    dim=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_mean_pool_matches_loop_reference(
    batch: int, tokens: int, dim: int, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, dim, generator=gen).to(dtype)
    mask = torch.randint(0, 2, (batch, tokens), generator=gen)
    mask[0] = 0  # an all-padding row pools to zeros instead of dividing by zero
    got = mean_pool(hidden, mask)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), _mean_pool_reference(hidden, mask), rtol=tol, atol=tol)


def _prototypes_reference(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(k, features.shape[1], dtype=torch.float64)
    for c in range(k):
        rows = [
            f.double() / max(f.double().norm(), 1e-12)
            for f, y in zip(features, labels, strict=True)
            if y == c
        ]
        out[c] = torch.stack(rows).mean(0)
    return out


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 4),
    extra=st.integers(0, 8),
    dim=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    zero_row=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_class_prototypes_and_head_match_reference(
    k: int, extra: int, dim: int, dtype: torch.dtype, zero_row: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(k), torch.randint(0, k, (extra,), generator=gen)])
    features = torch.randn(len(labels), dim, generator=gen).to(dtype)
    if zero_row:
        features[0] = 0
    tol = 1e-5 if dtype == torch.float32 else 1e-6  # inputs are exact; math is float32
    want = _prototypes_reference(features, labels, k)
    got = class_prototypes(features, labels, k)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    head = build_prototype_head(features, labels, k, scale=10.0)
    logits = head.logits(features)
    assert logits.dtype == torch.float32 and logits.shape == (len(labels), k)
    unit = F.normalize(features.double(), dim=1)
    cosine = unit @ F.normalize(want, dim=1).T
    torch.testing.assert_close(logits.double(), 10.0 * cosine, rtol=1e-4, atol=1e-4)


def test_prototype_head_separates_synthetic_classes() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=gen) * 3
    labels = torch.randint(0, 5, (400,), generator=gen)
    features = centers[labels] + torch.randn(400, 32, generator=gen)
    head = build_prototype_head(features[:200], labels[:200], 5)
    accuracy = (head(features[200:]).argmax(1) == labels[200:]).float().mean()
    assert accuracy == 1.0
    shuffled = build_prototype_head(features[:200], labels[:200][torch.randperm(200)], 5)
    assert (shuffled(features[200:]).argmax(1) == labels[200:]).float().mean() < 0.6
    assert set(dict(head.named_buffers())) == {"prototypes", "scale"}
    assert not list(head.parameters())  # frozen: nothing for an optimiser to pick up


def test_prototype_errors() -> None:
    with pytest.raises(AdbError, match=r"classes \[1\] have no examples"):
        class_prototypes(torch.randn(3, 2), torch.tensor([0, 0, 2]), 3)
    with pytest.raises(AdbError, match=r"labels must lie in 0\.\.1"):
        class_prototypes(torch.randn(2, 2), torch.tensor([0, 2]), 2)
    with pytest.raises(MismatchError, match="pass \\(N, D\\) features"):
        class_prototypes(torch.randn(3, 2), torch.tensor([0, 1]), 2)
    with pytest.raises(MismatchError, match=r"pass \(batch, 4\)"):
        PrototypeHead(torch.randn(2, 4)).logits(torch.randn(3, 5))


def test_packaged_efficientnet_lite0_lora_on_pointwise_convs() -> None:
    loaded = load_model(ModelSpec(packaged="efficientnet-lite0"), image_size=64)
    pointwise = [
        n
        for n, m in loaded.module.named_modules()
        if n.endswith(("_expand_conv", "_project_conv", "_conv_head"))
    ]
    assert len(pointwise) == 32
    assert all(type(loaded.module.get_submodule(n)) is nn.Conv2d for n in pointwise)
    batch = loaded.collate(
        [{"image": torch.full((1, 28, 28), 9 * i, dtype=torch.uint8), "label": i} for i in range(2)]
    )
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    peft_model = _lora(loaded.module, loaded.target_modules)
    wrapped = [n for n, m in peft_model.named_modules() if n.endswith("lora_A.default")]
    assert len(wrapped) == 32
    stats = loaded.module._bn1.running_mean.clone()
    loaded.train()
    features = loaded.forward_features(batch)
    assert features.shape == (2, 1280)
    features.pow(2).mean().backward()
    _only_lora_has_grads(peft_model)
    assert torch.equal(loaded.module._bn1.running_mean, stats)


def test_packaged_minilm_features() -> None:
    loaded = load_model(ModelSpec(packaged="minilm"))
    assert loaded.target_modules == ["query", "value"]
    texts = ["a cat sleeps on the sofa", "a kitten naps on a couch", "interest rates rose again"]
    batch = loaded.collate([{"text": t, "label": 0} for t in texts])
    loaded.module.eval()
    with torch.no_grad():
        unit = F.normalize(loaded.forward_features(batch), dim=1)
    assert unit.shape == (3, 384)
    similarity = unit @ unit.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2
