"""`adb export`: a revision folded into its base model (a plain transformers folder that loads
without PEFT and computes what base + adapter computes), or written as a PEFT folder; bad
input is refused in one line before anything is written."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest import make_peft, one_error_line, run_adb, snapshot
from readme_blocks import block
from tiny_models import TOPICS, adb_in_process, save_bert

from adapterdb.adapter import load_peft

WORDS = [w for task in TOPICS.values() for words in task for w in words]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bert/ (+ tokenizer), lora/ (a trained-looking LoRA on its query/value, B != 0), and a
    store whose main is that LoRA and whose `other` branch is a LoRA of other modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("export")
    save_bert(root / "bert", WORDS)
    save_bert(root / "narrow", WORDS, hidden=8)
    base = AutoModelForSequenceClassification.from_pretrained(root / "bert")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(root / "lora")
    make_peft(root / "foreign")  # LoRA on modules named lin / conv: no such layer in BERT
    for args in (
        ["init"],
        ["import", "lora", "--task", "topics"],
        ["import", "foreign", "--task", "other", "--branch", "other"],
    ):
        rc, _, err = adb_in_process(args, root)
        assert rc == 0, err
    return root


def outputs(model: torch.nn.Module, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden state) on a few sentences tokenised by the folder's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["apple pear plum car", "oak rain one salt", "red red blue cow", "mint"]
    with torch.no_grad():
        out = model.eval()(
            **tokenizer(texts, padding=True, return_tensors="pt"), output_hidden_states=True
        )
    return out.logits, out.hidden_states[-1]


def test_merged_export_loads_without_peft_and_computes_base_plus_adapter(ws: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification as Auto

    rc, out, err = adb_in_process(
        ["export", "main", "--merged-into", "bert", "-o", "merged", "--json"], ws
    )
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["output"] == str(ws / "merged") and doc["merged_into"] == str(ws / "bert")
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"} <= set(
        doc["files"]
    )
    assert sorted(p.name for p in (ws / "merged").iterdir()) == doc["files"]
    merged = Auto.from_pretrained(ws / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    peft = PeftModel.from_pretrained(Auto.from_pretrained(ws / "bert"), ws / "lora")
    want = outputs(peft, ws / "bert")
    for got, expected in zip(outputs(merged, ws / "merged"), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    base = outputs(Auto.from_pretrained(ws / "bert"), ws / "bert")
    # The adapter changes the model well beyond the tolerance (the tiny head's logits are small)
    assert (base[0] - want[0]).abs().max() > 2e-4 and (base[1] - want[1]).abs().max() > 0.05


def test_export_without_base_writes_the_peft_folder(ws: Path) -> None:
    rc, out, err = adb_in_process(["export", "main", "-o", "peft", "--json"], ws)
    assert rc == 0, err
    assert json.loads(out)["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    exported, original = load_peft(ws / "peft"), load_peft(ws / "lora")
    assert sorted(exported.tensors) == sorted(original.tensors)
    assert all(torch.equal(exported.tensors[n], t) for n, t in original.tensors.items())


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["main", "--merged-into", "notes"], "has no config.json"),  # a folder, not a model
        (["main", "--merged-into", "nomodel"], "cannot load nomodel"),  # config.json, no weights
        (["main", "--merged-into", "missing"], "is not a folder"),
        (["other", "--merged-into", "bert"], "does not fit the model"),  # targets lin / conv
        (["main", "--merged-into", "narrow"], "wants (4, 8)"),  # hidden 8, not 16
        (["nope", "--merged-into", "bert"], "'nope'"),
        (["main", "--merged-into", "bert", "-o", "full"], "not empty; pass --force"),
        (["main", "-o", "full"], "not empty; pass --force"),
        (["main", "--merged-into", "bert", "-o", "bert", "--force"], "would overwrite the base"),
        (["main", "--merged-into", "bert", "-o", "bert/sub"], "would overwrite the base"),
        (["main", "-o", ".adb/tmp/x"], "inside the adb store"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(ws: Path, args: list[str], says: str) -> None:
    (ws / "notes").mkdir(exist_ok=True)
    (ws / "notes" / "README.md").write_text("not a model\n")
    (ws / "nomodel").mkdir(exist_ok=True)
    (ws / "nomodel" / "config.json").write_text((ws / "bert" / "config.json").read_text())
    (ws / "full").mkdir(exist_ok=True)
    (ws / "full" / "keep.txt").write_text("mine\n")
    before = snapshot(ws)
    out = ["-o", "bad"] if "-o" not in args else []
    rc, _, err = adb_in_process(["export", *args, *out], ws)
    assert says in one_error_line(rc, err), err
    assert snapshot(ws) == before  # no output, no stage folder, store unchanged


def test_force_writes_into_a_folder_that_is_not_empty(ws: Path) -> None:
    (ws / "used").mkdir()
    (ws / "used" / "keep.txt").write_text("mine\n")
    rc, _, err = adb_in_process(
        ["export", "main", "--merged-into", "bert", "-o", "used", "--force"], ws
    )
    assert rc == 0, err
    names = {p.name for p in (ws / "used").iterdir()}
    assert {"keep.txt", "config.json", "model.safetensors"} <= names


def test_a_full_disk_at_the_rename_leaves_nothing(ws: Path) -> None:
    """The merged folder is staged beside the output and renamed in: a failure there (here a
    full disk, through the failpoint the checkout tests use) leaves no output and no stage."""
    before = snapshot(ws)
    rc, _, err = run_adb(
        ["export", "main", "--merged-into", "bert", "-o", "late"],
        ws,
        {"ADB_FAILPOINT": "output.rename:enospc"},
    )
    assert "No space left on device" in one_error_line(rc, err)
    assert snapshot(ws) == before


def test_the_readme_export_commands_run_as_written(ws: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    for line in block("export").splitlines():
        args = shlex.split(line, comments=True)
        assert args[0] == "adb", line
        rc, _, err = adb_in_process(args[1:], ws)
        assert rc == 0, f"`{line}`: {err}"
    AutoModelForSequenceClassification.from_pretrained(ws / "bert-merged")
    assert sorted(load_peft(ws / "lora-main").tensors) == sorted(load_peft(ws / "lora").tensors)
