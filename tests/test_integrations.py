"""PAM in anyone's training loop: `Aligner` (plain loops), `PamCallback` (HF `Trainer`, TRL's
`SFTTrainer`, a 2-process `accelerate launch`), the README's examples, and the issue's proof
that `adb train`, the callback and `Aligner` take the same alignment step."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import adb_env
from readme_blocks import block
from test_train import all_commits, lora_of
from tiny_models import (
    TOPICS,
    adb_in_process,
    save_bert,
    save_llama,
    topic_task,
    write_topic_data,
)

from adapterdb.adapter import Adapter, from_torch, save_peft
from adapterdb.aligner import Aligner, lora_parameters
from adapterdb.alignment import align_adapter_, alignment_thresholds
from adapterdb.errors import AdbError
from adapterdb.integrations import PamCallback
from adapterdb.storage.commits import Commit
from adapterdb.storage.store import Store
from adapterdb.trainers import loop, runtime
from adapterdb.trainers.callback import last_eval_accuracy
from adapterdb.trainers.config import AlignSpec, parse_task

# The README example's words.
WORDS = "a red green blue apple pear bus car tram".split()  # noqa: SIM905
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}

# A Trainer script with PamCallback for `accelerate launch`: each process dumps its final LoRA.
LAUNCHED = """
import os
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer
from transformers import TrainingArguments

from adapterdb.aligner import lora_parameters
from adapterdb.integrations import PamCallback

tokenizer = AutoTokenizer.from_pretrained("model")
rows = {"text": ["a red apple", "a green pear", "a blue bus", "a red tram"] * 2,
        "label": [0, 0, 1, 1] * 2}
data = Dataset.from_dict(rows).map(
    lambda b: tokenizer(b["text"], padding="max_length", max_length=8), batched=True
)
model = AutoModelForSequenceClassification.from_pretrained("model", num_labels=2)
lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
model = get_peft_model(model, lora)
pam = PamCallback(task="mp", p=50, every=2, init="keep")  # PEFT's start: resets happen
args = TrainingArguments("out", max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                         report_to="none", save_strategy="no", use_cpu=True)
Trainer(model=model, args=args, train_dataset=data, callbacks=[pam]).train()
lora = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
dump = {"world": int(os.environ["WORLD_SIZE"]), "lora": lora, "checks": pam.aligner.checks}
torch.save(dump, Path("dumps") / (os.environ["RANK"] + ".pt"))
"""
LAUNCH = (
    "launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
    "--dynamo_backend no --main_process_port {port} script.py"
)


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Trainers and `adb train` leave accelerate's process-wide state behind (SFTConfig turns
    bf16 on, the gradient accumulation count stays), and the next Accelerator that wants other
    settings refuses to start: reset it around each test, as accelerate's own tests do."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_peft(seed: int = 0) -> Any:
    """A 1-layer BERT classifier built from a config, LoRA on query/value, random B (so
    that A and B both have signs to disagree on)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, num_labels=2)  # fmt: skip
    model = get_peft_model(BertForSequenceClassification(config), LoraConfig(**LORA))
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_()
    return model


def random_like(model: Any, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in lora_parameters(model).items()}


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


def hf_state(out: Path) -> tuple[Any, Any, Any]:
    """(args, state, control) for calling a callback's events by hand."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(str(out), report_to="none", use_cpu=True)
    return args, TrainerState(), TrainerControl()


def run_block(name: str) -> dict[str, Any]:
    """Run a README block in the current folder as a user's script; its globals."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(block(name), f"README.md:{name}", "exec"), namespace)
    return namespace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the 2-process launch, started first so its start-up overlaps the in-process tests ----------


@dataclass
class Launch:
    proc: subprocess.Popen[str]
    root: Path


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    """`accelerate launch` of LAUNCHED on 2 CPU processes (gloo), against a store whose main
    holds a random global adapter of the script's LoRA shape."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("launch")
    save_bert(root / "model", WORDS, num_labels=2)
    Store.init(root)
    model = AutoModelForSequenceClassification.from_pretrained(root / "model", num_labels=2)
    model = get_peft_model(model, LoraConfig(**LORA))
    for name, t in random_like(model, 3).items():
        lora_parameters(model)[name].data.copy_(t)
    model.save_pretrained(root / "global")
    rc, _, err = adb_in_process(["import", "global", "--task", "g"], root)
    assert rc == 0, err
    (root / "script.py").write_text(LAUNCHED)
    (root / "dumps").mkdir()
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, *LAUNCH.format(port=_free_port()).split()]
    env = adb_env({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen(
        launch, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    yield Launch(proc, root)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


# -- Aligner ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reinit", "scope", "given"),
    [("global", "global", "adapter"), ("zero", "tensor", "folder"), ("global", "tensor", "dict")],
)
def test_aligner_resets_what_the_kernel_resets_every_nth_step(
    reinit: str, scope: str, given: str, tmp_path: Path
) -> None:
    model = tiny_peft()
    glob = random_like(model, 1)
    start = weights(model)
    expected = {n: t.clone() for n, t in start.items()}
    report = align_adapter_(expected, glob, alignment_thresholds(glob, 30, scope), reinit)  # type: ignore[arg-type]
    assert report.total.misaligned > 0
    source: Any = {"adapter": Adapter(glob), "dict": glob}.get(given)
    if given == "folder":
        source = save_peft(Adapter(glob, {"peft_type": "LORA", "r": 4, "lora_alpha": 8}), tmp_path)
    aligner = Aligner(model, source, p=30, every=3, reinit=reinit, scope=scope)  # type: ignore[arg-type]
    assert aligner.step() is None and aligner.step() is None
    assert all(torch.equal(p, start[n]) for n, p in weights(model).items())  # not yet
    assert aligner.step() == report
    after = weights(model)
    assert all(torch.equal(after[n], expected[n]) for n in expected)
    assert aligner.checks == [
        {"step": 3, "reset_fraction": report.reset_fraction,
         "sign_conflicts": report.total.conflict_fraction,
         "misaligned_top_p": report.total.misaligned_fraction}
    ]  # fmt: skip


def test_aligner_ignores_values_the_global_holds_beside_its_lora() -> None:
    """A merged global of Trainer experts holds the classifier (modules_to_save) too."""
    model = tiny_peft()
    glob = {**random_like(model, 1), "base_model.model.classifier.weight": torch.ones(2, 8)}
    report = Aligner(model, glob, p=100, every=1).step()
    assert report is not None and sorted(report.tensors) == sorted(lora_parameters(model))


def _model_without_lora() -> torch.nn.Module:
    return torch.nn.Linear(2, 2)


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"p": 101}, "p=101 is out of range"),
        ({"p": float("nan")}, "p=nan is out of range"),
        ({"every": 0}, "every=0 is not a step count"),
        ({"every": 2.5}, "every=2.5 is not a step count"),
        ({"reinit": "random"}, "reinit='random' is unknown"),
        ({"scope": "layer"}, "scope='layer' is unknown"),
        ({"drop": "lora_B"}, "is missing from the global adapter"),
        ({"extra": True}, "is not in the model"),
        ({"shape": True}, "model shape (4, 8) != global (2, 8)"),
        ({"model": "plain"}, "the model has no LoRA parameters"),
        ({"global_adapter": 3}, "global_adapter is a int"),
        ({"global_adapter": "/no/such/folder"}, "is not a folder"),
    ],
)
def test_bad_aligner_input_is_one_line(change: dict[str, Any], expect: str) -> None:
    model = tiny_peft()
    glob = random_like(model, 1)
    first_a = next(n for n in glob if ".lora_A." in n)
    if change.pop("drop", None):
        del glob[next(n for n in glob if ".lora_B." in n)]
    if change.pop("extra", None):
        glob["base_model.model.other.lora_A.weight"] = torch.zeros(4, 8)
    if change.pop("shape", None):
        glob[first_a] = torch.zeros(2, 8)
    if change.pop("model", None):
        model = _model_without_lora()
    kwargs: dict[str, Any] = {"global_adapter": glob, **change}
    with pytest.raises(AdbError) as exc:
        Aligner(model, **kwargs)
    message = str(exc.value)
    assert expect in message and "\n" not in message, message


# -- PamCallback -----------------------------------------------------------------------------


def test_bad_callback_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADB_STORE", raising=False)
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "committing needs a task name"),
        ({"task": "a/b"}, "committing needs a task name"),
        ({"task": "t", "every": 0}, "every=0 is not a step count"),
        ({"task": "t", "branch": "no good"}, "'no good' is not a valid branch name"),
        ({"task": "t"}, "no adb store here or in any parent folder"),
        ({"task": "t", "store": tmp_path}, "is not an adb store"),
        ({"task": "t", "store": 3.5}, "store is a float"),
    ]
    for kwargs, expect in cases:
        with pytest.raises(AdbError) as exc:
            PamCallback(**kwargs)
        assert expect in str(exc.value) and "\n" not in str(exc.value), (kwargs, exc.value)
    pam = PamCallback(global_adapter={}, commit=False)  # needs no store
    with pytest.raises(AdbError, match="PamCallback needs a PEFT model, got Linear"):
        pam.on_train_begin(*hf_state(tmp_path / "out"), model=_model_without_lora())


def test_the_callback_records_the_last_eval_accuracy_as_a_t() -> None:
    from transformers import TrainerState

    state = TrainerState(
        log_history=[{"eval_accuracy": 0.5}, {"loss": 1.0}, {"eval_accuracy": 0.75}]
    )
    assert last_eval_accuracy(state) == 0.75
    assert last_eval_accuracy(TrainerState(log_history=[{"loss": 1.0}])) is None


def test_the_callback_opens_the_store_however_it_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path (str or Path), None (the nearest .adb upwards), a low-level store, and the
    public `adapterdb.Store`."""
    import adapterdb as adb

    low = Store.init(tmp_path)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.delenv("ADB_STORE", raising=False)
    for given in (str(tmp_path), tmp_path / ".adb", None, low, adb.open(tmp_path)):
        assert PamCallback(store=given, task="t").store.root == low.root, given


def test_the_facade_imports_nothing_heavy_until_used() -> None:
    import adapterdb as adb

    assert adb.Aligner is Aligner and adb.PamCallback is PamCallback
    code = (
        "import sys, adapterdb, adapterdb.integrations; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_alignment_step_is_the_same_in_adb_train_the_callback_and_aligner(
    tmp_path: Path,
) -> None:
    """Same LoRA weights, same global: `adb train`'s check, PamCallback's and Aligner's reset
    exactly the same entries (bit for bit), and record the same row.

    The loop's weights right before its check are those of the same run with alignment off
    (training is a function of the task file and the start weights)."""
    save_bert(tmp_path / "bert", [w for words in TOPICS["t1"] for w in words])
    write_topic_data(tmp_path / "data", "t1")
    doc = topic_task("t", "bert", "data/t1", steps=1, align={"p": 50, "every": 1})
    task = parse_task(doc, tmp_path, "t.yaml")
    store = Store.init(tmp_path)
    rt = runtime.build(task)
    glob, start = random_like(rt.peft, 1), random_like(rt.peft, 2)
    manifest = store.put_adapter({n: from_torch(t) for n, t in glob.items()}, {})
    store.commit(Commit(manifest=manifest, kind="import", task="g"), "main")

    unaligned = task.model_copy(update={"align": AlignSpec(enabled=False)})
    before = lora_of(store, loop.train(unaligned, store, "main", init=start).commit_id)
    trained = loop.train(task, store, "main", init=start)
    by_loop = lora_of(store, trained.commit_id)
    assert any(not torch.equal(by_loop[n], before[n]) for n in before)  # the check reset some

    runtime.set_lora(rt, before)
    aligner = Aligner(rt.peft, glob, p=50, every=1)
    aligner.step()
    by_aligner = runtime.get_lora(rt)

    runtime.set_lora(rt, before)
    pam = PamCallback(store=store, task="t", p=50, every=1, init="keep", commit=False)
    args, state, control = hf_state(tmp_path / "out")
    pam.on_train_begin(args, state, control, model=rt.peft)
    state.global_step = 1
    pam.on_step_end(args, state, control, model=rt.peft)
    by_callback = runtime.get_lora(rt)

    for name, tensor in by_loop.items():
        assert torch.equal(by_aligner[name], tensor) and torch.equal(by_callback[name], tensor)
    assert pam.aligner is not None
    assert trained.align == aligner.checks == pam.aligner.checks and len(aligner.checks) == 1


def test_readme_trainer_example_commits_experts_that_pam_merges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launched: Launch
) -> None:
    """The README's Trainer script, run as written twice (first task, then the next one,
    aligned against the merged global), each expert merged with `adb merge --method pam`;
    then the README's plain-loop Aligner example against the global."""
    save_bert(tmp_path / "model", WORDS, num_labels=2)
    store = Store.init(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADB_STORE", raising=False)
    pam_merge = ["merge", "--method", "pam"]  # as the README: into HEAD's branch
    ref = "refs/experts/main/fruit-or-vehicle"

    run_block("trainer-pam")
    first = store.read_commit(store.refs.read(ref) or "")
    assert first.stats["align_skipped"] == loop.NO_GLOBAL and first.stats["align_checks"] == []
    rc, _, err = adb_in_process(pam_merge, tmp_path)
    assert rc == 0, err
    head = store.refs.read("refs/heads/main")

    trainer = run_block("trainer-pam")["trainer"]
    pam = next(c for c in trainer.callback_handler.callbacks if isinstance(c, PamCallback))
    assert pam.commit_id == store.refs.read(ref)
    c = store.read_commit(pam.commit_id)
    assert (c.kind, c.task, c.method, c.parents) == ("train", "fruit-or-vehicle", "train", (head,))
    assert c.params["align"] == {
        "enabled": True, "p": 50.0, "every": 4, "reinit": "global", "scope": "global"
    }  # fmt: skip
    assert c.base_model == "./model" and c.stats["steps"] == 12
    assert c.stats["align_skipped"] is None and c.stats["device"] == "cpu fp32 x1"
    rows = c.stats["align_checks"]
    assert [r["step"] for r in rows] == [4, 8, 12] and c.params["init"] == "global"
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["pam_reset_fraction"] for r in logged] == [r["reset_fraction"] for r in rows]
    assert [r["pam_misaligned_top_p"] for r in logged] == [r["misaligned_top_p"] for r in rows]
    rc, _, err = adb_in_process(pam_merge, tmp_path)
    assert rc == 0, err
    merged = store.read_commit(store.refs.read("refs/heads/main") or "")
    assert merged.sources == (pam.commit_id,) and merged.parents == (head, pam.commit_id)

    rc, _, err = adb_in_process(["checkout", "main", "-o", "global"], tmp_path)
    assert rc == 0, err
    aligner = run_block("aligner-loop")["aligner"]
    assert [r["step"] for r in aligner.checks] == [5, 10, 15, 20]
    assert (tmp_path / "expert" / "adapter_model.safetensors").is_file()


def test_sft_trainer_with_the_callback_trains_aligns_and_commits(
    tmp_path: Path, launched: Launch
) -> None:
    """TRL's SFTTrainer builds the PEFT model itself (peft_config=); the global is given as a
    dict; gradient accumulation 2 over 4 optimiser steps aligns at steps 2 and 4."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    save_llama(tmp_path / "llama")
    store = Store.init(tmp_path / "repo")
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    shaped = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "llama"), lora)
    glob = random_like(shaped, 1)  # init="keep": PEFT's start, far from it, so resets happen
    pam = PamCallback(store=store, task="sft", global_adapter=glob, every=2, init="keep")
    data = Dataset.from_dict({"text": ["a photo of a cat", "what is it", "a dog", "yes it is"] * 2})
    args = SFTConfig(
        str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, max_length=16,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=str(tmp_path / "llama"), args=args, train_dataset=data, peft_config=lora,
        callbacks=[pam],
    )  # fmt: skip
    before = weights(trainer.model)
    trainer.train()
    after = weights(trainer.model)
    assert any(not torch.equal(after[n], before[n]) for n in before)  # it trained
    c = store.read_commit(pam.commit_id or "")
    assert (c.kind, c.task, c.parents) == ("train", "sft", ())
    assert [r["step"] for r in c.stats["align_checks"]] == [2, 4]
    assert c.stats["align_checks"][0]["reset_fraction"] > 0 and c.stats["steps"] == 4
    stored = lora_of(store, pam.commit_id or "")
    assert all(torch.equal(stored[n], t) for n, t in after.items())
    assert any("pam_reset_fraction" in r for r in trainer.state.log_history)


def test_two_processes_align_alike_and_commit_one_expert(launched: Launch) -> None:
    """2 CPU processes (gloo): both replicas align and end bit-identical; only the main
    process commits, and the store holds exactly its weights."""
    _, err = launched.proc.communicate(timeout=400)
    assert launched.proc.returncode == 0, err[-3000:]
    store = Store.open(launched.root)
    assert sorted(c.kind for c in all_commits(store)) == ["import", "train"]
    ranks = {p.stem: torch.load(p) for p in (launched.root / "dumps").glob("*.pt")}
    assert sorted(ranks) == ["0", "1"] and {r["world"] for r in ranks.values()} == {2}
    assert ranks["0"]["checks"] == ranks["1"]["checks"]
    assert [r["step"] for r in ranks["0"]["checks"]] == [2, 4, 6]
    assert ranks["0"]["checks"][0]["reset_fraction"] > 0
    expert = store.read_commit(store.refs.read("refs/experts/main/mp") or "")
    assert expert.stats["align_checks"] == ranks["0"]["checks"]
    assert expert.stats["device"].endswith(" fp32 x2")  # DDP names the CPU cpu:0
    stored = lora_of(store, "experts/main/mp")
    for name, tensor in ranks["0"]["lora"].items():
        assert torch.equal(ranks["1"]["lora"][name], tensor), name
        assert torch.equal(stored[name], tensor), name


def test_callback_starts_the_expert_as_a_copy_of_the_global(tmp_path: Path) -> None:
    """PAM's temporary LoRA starts as the global adapter (init="global", the default), and
    `init="keep"` leaves the LoRA the script built."""
    save_bert(tmp_path / "bert", [w for words in TOPICS["t1"] for w in words])
    write_topic_data(tmp_path / "data", "t1")
    task = parse_task(topic_task("t", "bert", "data/t1", steps=1), tmp_path, "t.yaml")
    rt = runtime.build(task)
    glob, start = random_like(rt.peft, 1), random_like(rt.peft, 2)
    args, state, control = hf_state(tmp_path / "out")
    for init, expected in (("keep", start), ("global", glob)):
        runtime.set_lora(rt, start)
        pam = PamCallback(global_adapter=glob, init=init, commit=False)  # type: ignore[arg-type]
        pam.on_train_begin(args, state, control, model=rt.peft)
        live = runtime.get_lora(rt)
        assert all(torch.equal(live[n], expected[n]) for n in live), init
    with pytest.raises(AdbError, match=r"init='fresh'\) is unknown"):
        PamCallback(global_adapter=glob, init="fresh", commit=False)  # type: ignore[arg-type]
