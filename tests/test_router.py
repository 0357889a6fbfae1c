"""`adapterdb.trainers.router`: ConDU's inference as an nn.Module, on the store that
tests/test_eval.py builds (two topic tasks on a tiny BERT, experts unified by ConDU on `cb`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from readme_blocks import block
from test_eval import Branches, branches, ws  # noqa: F401  (module fixtures, reused)
from tiny_models import adb_in_process

from adapterdb.adapter import to_torch
from adapterdb.errors import AdbError
from adapterdb.trainers import runtime
from adapterdb.trainers.config import TaskConfig
from adapterdb.trainers.data import load_task_data
from adapterdb.trainers.merge import decouple_task
from adapterdb.trainers.router import Router, router


def eval_split(rt: Router, task: TaskConfig) -> dict[str, Any]:
    """The task's eval split as one batch, as eval builds it (one batch of up to 64)."""
    rows = list(load_task_data(task.data, task.optim.seed).eval)
    assert 0 < len(rows) <= runtime.EVAL_BATCH
    return rt.collate(rows)


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_predicts_what_adb_eval_routing_measures(
    branches: Branches,  # noqa: F811
    top_k: int,
) -> None:
    args = ["eval", "cb", "--routing", "condu", "--top-k", str(top_k), "--json"]
    rc, out, err = adb_in_process(
        [*args, "--tasks", "../t1.yaml", "--tasks", "../t2.yaml"], branches.repo
    )
    assert rc == 0, err
    doc = json.loads(out)
    rt = router(branches.store, "cb", top_k=top_k)
    assert rt.tasks == ["t1", "t2"] and rt.top_k == top_k and not rt.training
    assert not any(p.requires_grad for p in rt.parameters())
    for task in branches.tasks:
        batch = eval_split(rt, task)
        logits = rt(task=task.name, **batch)
        assert logits.shape == (len(batch["labels"]), 4)
        accuracy = float((logits.argmax(1) == batch["labels"]).float().mean())
        assert accuracy == doc["accuracy"][task.name]
        own = (rt.route(**batch) == rt.tasks.index(task.name)).any(1).float().mean()
        assert float(own) == doc["routed_to_own_expert"][task.name]
        # No task id at all: every task's classes, each block equal to that task's head.
        both = rt(**batch)
        assert both.shape == (len(batch["labels"]), 8)
        block = rt.tasks.index(task.name) * 4
        torch.testing.assert_close(both[:, block : block + 4], logits, rtol=0, atol=0)
    with pytest.raises(AdbError, match="'t9' is not routed here; use one of t1, t2"):
        rt(task="t9", **batch)


def test_top_1_with_a_perfect_router_is_the_decoupled_expert(branches: Branches) -> None:  # noqa: F811
    rt = router(branches.store, "cb", top_k=1)
    perfect = 0
    for task in branches.tasks:
        batch = eval_split(rt, task)
        if not bool((rt.route(**batch) == rt.tasks.index(task.name)).all()):
            continue
        perfect += 1
        raw, config = decouple_task(branches.store, "cb", task.name)
        alone = runtime.build(task, config)  # eval's runtime, with only this task's expert
        runtime.set_lora(alone, {n: to_torch(r) for n, r in raw.items()})
        expected, labels = runtime.logits_over(alone, load_task_data(task.data, 0).eval)
        torch.testing.assert_close(rt(task=task.name, **batch), expected, rtol=0, atol=0)
        assert torch.equal(labels, batch["labels"])
    assert perfect, "routing sent no task's whole eval split to its own expert"


@pytest.mark.parametrize(
    ("rev", "top_k", "says"),
    [
        ("nope", 2, "'nope'"),
        ("main", 2, "routing needs a ConDU commit"),  # a PAM merge: no triggers
        ("experts/main/t1", 1, "kind 'train'"),
        ("cb", 0, "top_k = 0"),
    ],
)
def test_bad_input_is_one_line(branches: Branches, rev: str, top_k: int, says: str) -> None:  # noqa: F811
    with pytest.raises(AdbError) as info:
        router(branches.store, rev, top_k=top_k)
    message = str(info.value)
    assert says in message and "\n" not in message, message


def test_the_readme_router_example_runs(
    branches: Branches,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rc, _, err = adb_in_process(["branch", "condu", "cb"], branches.repo)  # the README's name
    assert rc == 0, err
    monkeypatch.chdir(branches.repo)
    scope: dict[str, Any] = {}
    exec(block("router"), scope)
    assert capsys.readouterr().out == "['t1', 't2'] [[0], [1]]\n"
    assert scope["logits"].shape == (2, 4) and scope["scores"].shape == (2, 8)
