"""`adb run` and `adb report` on a tiny model and fake Fashion-MNIST written by the test."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ADB, adb_env
from fakedata import learnable_fashion

from adapterdb.metrics import cl_metrics
from adapterdb.stats import t_critical
from adapterdb.storage.store import Store
from adapterdb.trainers.config import load_sequence
from adapterdb.trainers.sequence import run_sequence

NET = """
import torch
import torch.nn as nn


class Net(nn.Module):
    lora_targets = ["c1", "fc"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c0 = nn.Conv2d(3, 8, 3, stride=2)
        self.c1 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(torch.relu(self.c0(x)))).mean((2, 3)))


def build():
    return Net()
"""

SEQ = """
name: tiny
defaults:
  model: {python: "net.py:build"}
  data: {builtin: fashion-mnist, folder: ./fm, limit: 40, eval_limit: 40, image_size: 16}
  lora: {r: 4, alpha: 8}
  optim: {lr: 0.02, steps: 6, batch_size: 8, seed: 0}
  align: {p: 50, every: 2}
tasks:
  - {name: a, data: {classes: [0, 1]}}
  - {name: b, data: {classes: [2, 3]}}
"""
METHODS = "finetune,pam,condu"


def adb(*args: str, cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = adb_env({"ADB_STORE": str(cwd)})
    out = subprocess.run([ADB, *args], cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("seq")
    (d / "net.py").write_text(NET)
    (d / "seq.yaml").write_text(SEQ)
    learnable_fashion(d / "fm")
    return d


def fresh_store(workdir: Path, name: str) -> Path:
    d = workdir / name
    d.mkdir()
    for f in ("net.py", "seq.yaml"):
        (d / f).write_text((workdir / f).read_text())
    (d / "fm").symlink_to(workdir / "fm")
    adb("init", ".", cwd=d)
    return d


def refs_snapshot(store: Path) -> dict[str, str]:
    root = store / ".adb"
    files = [
        p for p in root.rglob("*") if p.is_file() and "objects" not in p.parts and p.name != "lock"
    ]
    return {str(p.relative_to(root)): p.read_text() for p in files}


@pytest.fixture(scope="module")
def first_run(workdir: Path) -> tuple[Path, dict]:
    d = fresh_store(workdir, "full")
    out = adb("run", "seq.yaml", "--methods", METHODS, "--orders", "2", "--json", cwd=d)
    return d, json.loads(out.stdout)


def test_run_table_matches_matrices(first_run):
    _, doc = first_run
    assert sorted(doc["orders"]) == [["a", "b"], ["b", "a"]]
    assert set(doc["zero_shot"]) == set(doc["independent"]) == {"a", "b"}
    for method in METHODS.split(","):
        mats = doc["matrices"][method]
        assert len(mats) == 2
        for m in mats:
            assert len(m["R"]) == 2 and all(len(r) == 2 and None not in r for r in m["R"])
            assert m["metrics"] == pytest.approx(
                cl_metrics(m["R"], m["zero_shot"], m["A_t_per_task"])
            )
        accs = [m["metrics"]["ACC"] for m in mats]
        assert doc["table"][method]["ACC"][0] == pytest.approx(sum(accs) / 2)
    # ConDU experts are the independent ones (fresh LoRA, no alignment, same seed)
    condu = doc["matrices"]["condu"][0]
    for task, a_t in zip(condu["tasks"], condu["A_t_per_task"], strict=True):
        assert a_t == pytest.approx(doc["independent"][task])


def test_rerun_resumes_without_new_work(first_run):
    d, doc = first_run
    before = refs_snapshot(d)
    objects = sorted(p.name for p in (d / ".adb" / "objects").rglob("*") if p.is_file())
    out = adb("run", "seq.yaml", "--methods", METHODS, "--orders", "2", "--json", cwd=d)
    assert refs_snapshot(d) == before
    assert sorted(p.name for p in (d / ".adb" / "objects").rglob("*") if p.is_file()) == objects
    assert json.loads(out.stdout)["table"] == doc["table"]


def test_killed_run_resumes_to_the_same_result(workdir, first_run):
    _, doc = first_run
    d = fresh_store(workdir, "killed")
    args = [ADB, "run", "seq.yaml", "--methods", METHODS, "--orders", "2", "--json"]
    proc = subprocess.Popen(
        args,
        cwd=d,
        env=adb_env({"ADB_STORE": str(d)}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (d / ".adb" / "refs" / "heads" / "run" / "pam").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert adb("fsck", cwd=d).returncode == 0
    out = adb("run", "seq.yaml", "--methods", METHODS, "--orders", "2", "--json", cwd=d)
    assert json.loads(out.stdout)["table"] == doc["table"]


def test_run_json_has_intervals_and_paired_differences(first_run):
    _, doc = first_run
    assert doc["baseline"] == "finetune"  # no `average` in METHODS
    for method in METHODS.split(","):
        accs = [m["metrics"]["ACC"] for m in doc["matrices"][method]]
        iv = doc["intervals"][method]["ACC"]
        assert iv["mean"] == pytest.approx(doc["table"][method]["ACC"][0])
        # two orders: half-width = t_1 * |a - b| / 2 (the sample sd of two values is |a-b|/√2)
        assert iv["half_width"] == pytest.approx(t_critical(1) * abs(accs[0] - accs[1]) / 2)
    assert set(doc["differences"]) == {"pam", "condu"}
    for method in ("pam", "condu"):
        for k in ("ACC", "BWT"):
            d = doc["differences"][method][k]
            mine = [m["metrics"][k] for m in doc["matrices"][method]]
            base = [m["metrics"][k] for m in doc["matrices"]["finetune"]]
            expected = [a - b for a, b in zip(mine, base, strict=True)]
            assert d["orders"] == ["0", "1"] and d["per_order"] == pytest.approx(expected)
            assert d["positive"] == sum(x > 0 for x in expected)


def test_parallel_run_matches_in_process_run(workdir, first_run):
    """jobs=2 on a fresh store gives the in-process run's matrices, and the workers' progress
    reaches `say`. Without condu, the independent experts are jobs of their own. Called in
    this process: the workers' start-up is the cost, not another `adb`'s."""
    _, doc = first_run
    d = fresh_store(workdir, "jobs")
    lines: list[str] = []
    seq = load_sequence(d / "seq.yaml")
    par = run_sequence(Store.open(d), seq, ["pam", "finetune"], 2, say=lines.append, jobs=2)
    for shown in ("run/pam/1 step 2:", "run/finetune/0 2: b trained", "independent a:"):
        assert any(line.startswith(shown) for line in lines), lines
    assert par.orders == doc["orders"]
    assert par.zero_shot == doc["zero_shot"]
    assert par.independent == pytest.approx(doc["independent"])
    for method in ("pam", "finetune"):
        for mine, theirs in zip(par.matrices[method], doc["matrices"][method], strict=True):
            assert mine.to_json()["R"] == theirs["R"]
            assert mine.to_json()["A_t_per_task"] == theirs["A_t_per_task"]


def test_run_prints_intervals_and_paired_differences(first_run):
    d, doc = first_run
    shown = adb("run", "seq.yaml", "--methods", METHODS, "--orders", "2", cwd=d).stdout
    assert "mean ± 95% CI half-width" in shown
    acc = doc["intervals"]["pam"]["ACC"]
    assert f"{100 * acc['mean']:.1f} ± {100 * acc['half_width']:.1f}" in shown
    assert "ACC − finetune" in shown and "BWT > finetune" in shown
    diff = doc["differences"]["condu"]["BWT"]
    assert (
        f"{100 * diff['mean']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]" in shown
    )


def test_report_writes_plots_and_table(first_run):
    d, doc = first_run
    adb("report", "-o", "rep", cwd=d)
    rep = d / "rep"
    text = (rep / "report.md").read_text()
    assert "| pam | 2 |" in text and "| condu | 2 |" in text
    assert "95%" in text
    zs = 100 * sum(doc["zero_shot"].values()) / 2
    ind = 100 * sum(doc["independent"].values()) / 2
    assert f"| zero-shot (base) |  | {zs:.1f} |" in text
    assert f"| independent experts |  | {ind:.1f} |  |  | {ind:.1f} |" in text
    # the intervals and the paired differences are the ones `adb run --json` reports
    acc = doc["intervals"]["pam"]["ACC"]
    assert f"| pam | 2 | {100 * acc['mean']:.1f} ± {100 * acc['half_width']:.1f} |" in text
    diff = doc["differences"]["pam"]["ACC"]
    cell = f"{100 * diff['mean']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"
    assert f"| pam | {cell} | {diff['positive']}/2 |" in text
    assert f"- order 1: {' → '.join(doc['orders'][1])}" in text
    for png in ("forgetting.png", "acc-per-order.png", "matrix-pam.png", "matrix-condu.png"):
        assert (rep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_changed_run_on_same_branch_is_refused(first_run, tmp_path):
    d, _ = first_run
    changed = (d / "seq.yaml").read_text().replace("steps: 6", "steps: 7")
    (d / "seq2.yaml").write_text(changed)
    before = refs_snapshot(d)
    out = adb("run", "seq2.yaml", "--methods", "pam", cwd=d, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "holds a different run" in out.stderr
    assert refs_snapshot(d) == before


def test_condu_trains_each_expert_once_and_keeps_every_branch_history_its_own(first_run):
    from adapterdb.storage.store import Store
    from adapterdb.trainers.evaluate import merge_steps

    d, _ = first_run
    store = Store.find(d)
    first = store.refs.list("refs/experts/run/condu/0/")
    for task, oid in store.refs.list("refs/experts/run/condu/1/").items():
        copy = store.read_commit(oid)
        original = store.read_commit(copy.extra["reused_from"])
        assert copy.extra["reused_from"] == first[task]
        assert copy.manifest == original.manifest and copy.params == original.params
    for o in (0, 1):
        steps = merge_steps(store, f"run/condu/{o}")
        assert len(steps) == 2
        assert all(store.read_commit(s).extra["branch"] == f"run/condu/{o}"
                   for _, c in steps for s in c.sources)  # fmt: skip
