"""Tensors that are not LoRA factors, on adapters PEFT itself saves (issue 12).

A sequence-classification LoRA with `modules_to_save` saves the full classifier weights, DoRA
saves `lora_magnitude_vector`s: values, not task vectors. Every registered method must merge
the LoRA factors exactly as before (as on an adapter without those tensors) and the values by
the rule of `adapterdb.merging.fullweights`: the mean with the method's task weights
(`finetune`: the last source). Before the fix TIES zeroed 80% of `classifier.weight`, MagMax
and λ scaled it, and DoRA magnitudes were trimmed to 0. ConDU's triggers carry no mask for a
value, and `adb decouple` gives every task the (running) mean. `use_rslora` adapters keep
their α/√r scaling through a product-space merge that PEFT loads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from tiny_models import adb_in_process, save_bert

from adapterdb.adapter import CONFIG_FILE, read_peft_raw, to_torch
from adapterdb.lora import lora_pairs
from adapterdb.merging import merge_adapters, methods, parse_params
from adapterdb.merging.fullweights import merge_values, value_weights
from adapterdb.merging.layers import LAYER_METHODS  # whole layers: test_continual_workflow
from adapterdb.storage.store import Store
from adapterdb.tensorkinds import Kind, classify, kind_of, values

PREFIX = "base_model.model."
CLASSIFIER = PREFIX + "classifier.weight"
QUERY = PREFIX + "bert.encoder.layer.0.attention.self.query"
# methods with task weights get weights=1,3 (a mean weighted 1/4, 3/4); tall needs k <= 2
WEIGHTED = {"average", "task_arithmetic", "ties", "dare", "dare_ties"}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bert(tmp_path_factory.mktemp("bert") / "model", hidden=8)


def base(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def save_adapter(bert: Path, out: Path, seed: int, **lora: object) -> Path:
    """A PEFT-saved LoRA on query/value of the tiny BERT; the trainable values that are not
    factors (modules_to_save copies, DoRA magnitudes) are moved per seed, as training would
    (they start equal in every adapter, which would hide how they are merged)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False, **lora
    )
    model = peft.get_peft_model(base(bert), config)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.rand(param.shape, generator=gen))
    model.save_pretrained(out)
    return out


def load(folder: Path) -> dict[str, torch.Tensor]:
    _, raw, _ = read_peft_raw(folder)
    return {n: to_torch(r) for n, r in raw.items()}


@pytest.fixture(scope="module")
def saved(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three adapters of each flavour PEFT saves: modules_to_save (a SEQ_CLS task: classifier
    weight and bias), DoRA, rsLoRA."""
    root = tmp_path_factory.mktemp("peft")
    flavours = {
        "head": {"task_type": "SEQ_CLS"},
        "dora": {"use_dora": True},
        "rslora": {"use_rslora": True},
    }
    return {
        flavour: [save_adapter(bert, root / f"{flavour}{s}", s, **kw) for s in (1, 2, 3)]
        for flavour, kw in flavours.items()
    }


def test_kinds_of_the_tensors_peft_saves(saved: dict[str, list[Path]]) -> None:
    head, dora, rs = (load(saved[f][0]) for f in ("head", "dora", "rslora"))
    assert {n: k for n, k in classify(head).items() if not k.is_delta} == {
        CLASSIFIER: Kind.FULL,
        PREFIX + "classifier.bias": Kind.FULL,
    }
    magnitudes = [n for n in dora if kind_of(n) is Kind.MAGNITUDE]
    assert len(magnitudes) == 2 and all(n.endswith("lora_magnitude_vector") for n in magnitudes)
    assert values(classify(rs)) == []
    pairs, rest = lora_pairs(head)
    assert all(kind_of(n) is Kind.FACTOR for p in pairs for n in (p.a, p.b))
    assert sorted(rest) == sorted(values(classify(head)))
    for name, kind in [
        ("m.lora_B.bias", Kind.FACTOR),  # lora_bias=True: part of ΔW
        ("emb.lora_embedding_A", Kind.FACTOR),
        ("m.lora_magnitude_vector.weight", Kind.MAGNITUDE),  # older PEFT's spelling
        ("m.bias", Kind.FULL),  # bias="all"
        ("emb.token_adapter.trainable_tokens_delta", Kind.FULL),  # new rows, not a change
    ]:
        assert kind_of(name) is kind, name


def expected_value(method: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if method == "finetune":
        return tensors[-1]
    w = [1.0, 3.0] if method in WEIGHTED else [1.0, 1.0]
    return (w[0] * tensors[0] + w[1] * tensors[1]) / sum(w)


def method_params(method: str) -> list[str]:
    return ["weights=1,3"] if method in WEIGHTED else []


@pytest.mark.parametrize("flavour", ["head", "dora"])
@pytest.mark.parametrize("method", [m for m in methods() if m not in LAYER_METHODS])
def test_every_method_merges_factors_as_before_and_values_as_weights(
    saved: dict[str, list[Path]], method: str, flavour: str
) -> None:
    sources = [load(p) for p in saved[flavour][:2]]
    kinds = classify(sources[0])
    params = parse_params(method, method_params(method))
    merged = dict(merge_adapters(method, sources, params, kinds=kinds))
    factors = [{n: t for n, t in s.items() if kinds[n].is_delta} for s in sources]
    before = dict(merge_adapters(method, factors, params))  # a LoRA-only adapter, as before
    assert sorted(merged) == sorted(sources[0])
    for name, kind in kinds.items():
        if kind.is_delta:
            assert torch.equal(merged[name], before[name]), name
        else:
            want = expected_value(method, [s[name] for s in sources])
            torch.testing.assert_close(merged[name], want, rtol=1e-6, atol=1e-6)
            if kind is Kind.MAGNITUDE:
                assert bool((merged[name] > 0).all()), f"{method} zeroed a DoRA magnitude"


@pytest.mark.parametrize("method", [m for m in methods() if m != "emr"] + ["pam"])
def test_cli_merge_of_peft_adapters_keeps_the_head(
    saved: dict[str, list[Path]], bert: Path, tmp_path: Path, method: str
) -> None:
    """`adb merge -o` on PEFT's own SEQ_CLS adapters: the classifier is the (weighted) mean,
    a warning says so, and PEFT loads the result with exactly that head."""
    a, b = saved["head"][:2]
    params = [f for p in method_params(method) for f in ("-p", p)]
    force = ["--force"] if method == "pam" else []
    rc, _, err = adb_in_process(
        ["merge", "--method", method, *params, *force, str(a), str(b), "-o", "m"], tmp_path
    )
    assert rc == 0, err
    assert "2 full weight tensors (not LoRA factors) merged as weights" in err
    merged, sources = load(tmp_path / "m"), [load(a), load(b)]
    want = expected_value(method, [s[CLASSIFIER] for s in sources])  # pam: equal weights
    torch.testing.assert_close(merged[CLASSIFIER], want, rtol=1e-6, atol=1e-6)
    loaded = peft.PeftModel.from_pretrained(base(bert), tmp_path / "m").eval()
    head = dict(loaded.named_parameters())
    copy = next(n for n in head if "classifier.modules_to_save" in n and n.endswith("weight"))
    torch.testing.assert_close(head[copy].detach(), want, rtol=1e-6, atol=1e-6)


def test_ties_no_longer_zeroes_the_classifier(saved: dict[str, list[Path]], tmp_path: Path) -> None:
    """The reported case: TIES (density 0.2) kept 20% of classifier.weight and zeroed the rest."""
    a, b = saved["head"][:2]
    rc, _, err = adb_in_process(["merge", "--method", "ties", str(a), str(b), "-o", "t"], tmp_path)
    assert rc == 0, err
    assert int((load(tmp_path / "t")[CLASSIFIER] == 0).sum()) == 0


def test_values_refuse_weights_that_make_no_mean() -> None:
    p = parse_params("task_arithmetic", ["weights=1,-1"])
    with pytest.raises(Exception, match=r"weights=.*non-negative weights with a positive sum"):
        value_weights("task_arithmetic", p, 2, CLASSIFIER)
    assert value_weights("finetune", parse_params("finetune", []), 3) == [0.0, 0.0, 1.0]
    running = parse_params("average", ["running=true", "step=4"])
    assert value_weights("average", running, 2) == [0.75, 0.25]
    x = [torch.ones(3), torch.zeros(3)]
    with pytest.raises(ValueError, match="merge it with the method"):
        merge_values("ties", x, parse_params("ties", []), Kind.FACTOR)


def condu_store(tmp_path: Path, sources: list[Path]) -> Store:
    (tmp_path / "repo").mkdir()
    rc, _, err = adb_in_process(["init"], tmp_path / "repo")
    assert rc == 0, err
    rc, _, err = adb_in_process(
        ["merge", "--method", "condu", "--into", "cb", *map(str, sources[:2])], tmp_path / "repo"
    )
    assert rc == 0, err
    assert "merged as weights" in err
    return Store.open(tmp_path / "repo")


@pytest.mark.parametrize("flavour", ["head", "dora"])
def test_condu_triggers_and_decouple_on_values(
    saved: dict[str, list[Path]], tmp_path: Path, flavour: str
) -> None:
    """ConDU: values get no trigger mask, λ_t comes from the factors alone, decouple gives
    every task the mean, and the continual step makes it the running mean of all tasks."""
    paths = saved[flavour]
    store = condu_store(tmp_path, paths)
    repo = tmp_path / "repo"
    commit = store.read_commit(store.resolve("cb"))
    names = list(load(paths[0]))
    kinds = classify(names)
    for trig in commit.triggers.values():
        assert sorted(trig.masks) == sorted(n for n in names if kinds[n].is_delta)
    sources = [load(p) for p in paths]
    rc, _, err = adb_in_process(["decouple", "cb", "--all", "-o", str(tmp_path / "x")], repo)
    assert rc == 0, err
    for task, own in zip(commit.triggers, sources[:2], strict=True):
        expert = load(tmp_path / "x" / task)
        for name in values(kinds):
            mean = (sources[0][name] + sources[1][name]) / 2
            torch.testing.assert_close(expert[name], mean, rtol=1e-6, atol=1e-6)
            assert bool((expert[name] != 0).all()), name
        factor = next(n for n in names if kinds[n].is_delta and n.endswith("lora_B.weight"))
        agree = expert[factor] != 0  # a decoupled factor: λ_t·M_t ⊙ τ_uni, signs of its task
        assert bool((torch.sign(expert[factor][agree]) == torch.sign(own[factor][agree])).all())
    rc, _, err = adb_in_process(["merge", "--method", "condu", "--into", "cb", str(paths[2])], repo)
    assert rc == 0, err
    third = store.read_commit(store.resolve("cb"))
    unified = {n: to_torch(store.objects.get_tensor(e.id)) for n, e in store.read_manifest(
        third.manifest).tensors.items()}  # fmt: skip
    for name in values(kinds):
        mean = sum(s[name] for s in sources) / 3
        torch.testing.assert_close(unified[name], mean, rtol=1e-5, atol=1e-6)


def test_rslora_product_merge_caps_the_rank_and_peft_loads_it(
    saved: dict[str, list[Path]], bert: Path, tmp_path: Path
) -> None:
    """rsLoRA (s = α/√r) through product space at --rank 100 on 8×8 layers: capped at 8, and
    the ΔW PEFT computes from the merged folder is the mean of the sources' ΔW."""
    a, b = saved["rslora"][:2]
    rc, _, err = adb_in_process(
        ["merge", "--method", "average", "--space", "product", "--rank", "100",
         str(a), str(b), "-o", "p"], tmp_path,
    )  # fmt: skip
    assert rc == 0, err
    assert "rank 100 exceeds the full rank" in err
    cfg = json.loads((tmp_path / "p" / CONFIG_FILE).read_text())
    assert cfg["r"] == 8 and cfg["use_rslora"] is True
    assert load(tmp_path / "p")[QUERY + ".lora_A.weight"].shape == (8, 8)

    def delta(folder: Path) -> torch.Tensor:
        model = peft.PeftModel.from_pretrained(base(bert), folder).eval()
        layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
        return layer.get_delta_weight("default").detach()

    torch.testing.assert_close(
        delta(tmp_path / "p"), (delta(a) + delta(b)) / 2, rtol=1e-4, atol=1e-5
    )
