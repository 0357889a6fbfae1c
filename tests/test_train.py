"""`adb train` on a tiny BERT: the expert commit, PAM alignment against the global adapter,
the global moving only with `adb merge`, multi-process training, Ctrl-C and bad task files.

Most checks call the library in-process (trainers.loop.train, trainers.merge.merge_into); the
real `adb` script runs where the process boundary is the point (accelerate launch, SIGINT,
error lines).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ADB, adb_env, run_adb, snapshot
from tiny_models import TOPICS, adb_in_process, save_bert, topic_task, write_topic_data, write_yaml

from adapterdb.adapter import to_torch
from adapterdb.merging import registry
from adapterdb.storage.commits import Commit
from adapterdb.storage.store import STORE_DIR, Store
from adapterdb.trainers import loop, runtime
from adapterdb.trainers import merge as wf
from adapterdb.trainers.config import TaskConfig, load_task, parse_task
from adapterdb.trainers.heads import class_prototypes

# `model: {python: hooks.py:...}` factories for the subprocess tests: the tiny BERT of this
# module plus a way to observe the training process from outside it.
HOOKS = '''
import atexit
import os
from pathlib import Path

import torch

from adapterdb.trainers.config import ModelSpec
from adapterdb.trainers.models import load_model


def _bert():
    folder = Path(__file__).parent / "bert"
    return load_model(ModelSpec(path=folder, task="sequence-classification", num_labels=4))


def dump_at_exit():
    """Every process saves its own final LoRA weights to $ADB_TEST_DUMP/<RANK>.pt at exit."""
    loaded = _bert()

    def dump():
        lora = {n: p.detach().clone() for n, p in loaded.module.named_parameters() if "lora_" in n}
        world = int(os.environ.get("WORLD_SIZE", "1"))
        path = Path(os.environ["ADB_TEST_DUMP"]) / f"{os.environ.get('RANK', '0')}.pt"
        torch.save({"world": world, "lora": lora}, path)

    atexit.register(dump)
    return loaded


def mark_training():
    """Touches $ADB_TEST_MARK at the first forward pass with gradients (= training started)."""
    loaded = _bert()
    features = loaded.features_fn

    def observed(batch):
        if torch.is_grad_enabled():
            Path(os.environ["ADB_TEST_MARK"]).touch()
        return features(batch)

    loaded.features_fn = observed
    return loaded
'''


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bert/, data/t1_*.jsonl, data/t2_*.jsonl, t1.yaml, t2.yaml (p=100, every=1), hooks.py."""
    root = tmp_path_factory.mktemp("train")
    save_bert(root / "bert", [w for task in TOPICS.values() for words in task for w in words])
    for task in TOPICS:
        write_topic_data(root / "data", task)
    write_yaml(root / "t1.yaml", topic_task("t1", "bert", "data/t1"))
    write_yaml(root / "t2.yaml", topic_task("t2", "bert", "data/t2", align={"p": 100, "every": 1}))
    (root / "hooks.py").write_text(HOOKS)
    return root


def lora_of(store: Store, rev: str) -> dict[str, torch.Tensor]:
    return {n: to_torch(r) for n, r in store.iter_tensors(store.manifest_of(rev))}


def all_commits(store: Store) -> list[Commit]:
    ids = [i for i in store.objects.ids() if store.objects.kind(i) == "json"]
    return [store.read_commit(i) for i in ids if store.objects.get_json(i).get("type") == "commit"]


def one_error_line(rc: int, err: str) -> str:
    assert rc != 0 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH = (
    "launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
    "--dynamo_backend no --main_process_port {port} -m adapterdb.cli train mp.yaml"
)


@dataclass
class Jobs:
    """The two slow subprocess jobs, started together before the in-process work."""

    multi: subprocess.Popen[str]  # accelerate launch, 2 processes, dumps in `dumps`
    multi_repo: Path
    dumps: Path
    long: subprocess.Popen[str]  # adb train with 100k steps, touches `mark` when training
    long_repo: Path
    mark: Path
    long_before: dict[str, bytes]  # the store before `long` started


@pytest.fixture(scope="module")
def jobs(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    """Start the multi-process and the interrupt jobs at once: on a busy 2-core box their
    interpreter start-up (most of their time) then overlaps with each other and with the
    in-process training of the `trained` fixture."""
    root = tmp_path_factory.mktemp("jobs")
    multi_repo, dumps, long_repo, mark = (root / n for n in ("multi", "dumps", "long", "mark"))
    dumps.mkdir()
    for repo, name, steps, hook in ((multi_repo, "mp", 3, "dump_at_exit"),
                                    (long_repo, "long", 100_000, "mark_training")):  # fmt: skip
        Store.init(repo)
        doc = topic_task(name, "bert", str(ws / "data" / "t1"), steps=steps, batch_size=8)
        doc["model"] = {"python": f"{ws / 'hooks.py'}:{hook}"}
        write_yaml(repo / f"{name}.yaml", doc)
    # `accelerate launch --cpu` runs multi-CPU jobs only through MPI (--mpirun_hostfile) and
    # otherwise starts ONE process; `--multi_gpu` is the torch.distributed launcher, and
    # ACCELERATE_USE_CPU=1 makes its processes one gloo group on a machine without a GPU.
    bin_dir = Path(sys.executable).parent
    launch = [str(bin_dir / "accelerate"), *LAUNCH.format(port=_free_port()).split()]
    # Own sessions: teardown can end a job's whole process group (the launcher's workers too).
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
             "start_new_session": True}  # fmt: skip
    multi_env = {"ACCELERATE_USE_CPU": "1", "ADB_TEST_DUMP": str(dumps), "OMP_NUM_THREADS": "1"}
    multi = subprocess.Popen(launch, cwd=multi_repo, env=adb_env(multi_env), **pipes)
    long_before = snapshot(long_repo / STORE_DIR)
    long = subprocess.Popen(
        [ADB, "train", "long.yaml"],
        cwd=long_repo,
        env=adb_env({"ADB_TEST_MARK": str(mark), "PYTHONFAULTHANDLER": "1"}),
        **pipes,
    )
    yield Jobs(multi, multi_repo, dumps, long, long_repo, mark, long_before)
    for proc in (multi, long):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


@dataclass
class Trained:
    """train t1 on an empty branch -> merge it (pam) -> train t2 with p=100, every=1."""

    repo: Path
    store: Store
    t1: TaskConfig
    t2: TaskConfig
    init1: dict[str, torch.Tensor]
    r1: loop.TrainResult
    losses1: list[float]
    head1: str
    r2: loop.TrainResult
    head_after_t2: str | None


@pytest.fixture(scope="module")
def trained(ws: Path, jobs: Jobs) -> Trained:
    """(Requests `jobs` only to start them first.)"""
    from accelerate.utils import set_seed

    repo = ws / "repo"
    store = Store.init(repo)
    t1, t2 = load_task(ws / "t1.yaml"), load_task(ws / "t2.yaml")
    set_seed(t1.optim.seed)  # what train() does: build, then PEFT's LoRA init, seeded
    rt1 = runtime.build(t1)
    runtime.fresh_lora(rt1, t1.optim.seed)
    init1 = runtime.get_lora(rt1)
    losses: list[float] = []
    r1 = loop.train(t1, store, "main", lambda step, total, loss, mis: losses.append(loss))
    assert store.refs.read("refs/heads/main") is None  # training never moves the branch
    head1 = wf.merge_into(store, "main", "pam", registry.parse_params("average", []), []).commit_id
    r2 = loop.train(t2, store, "main")
    return Trained(
        repo, store, t1, t2, init1, r1, losses, head1, r2, store.refs.read("refs/heads/main")
    )


def test_expert_commit_records_the_training(trained: Trained) -> None:
    store, r1 = trained.store, trained.r1
    assert r1.commit_id == store.refs.read("refs/experts/main/t1")
    c = store.read_commit(r1.commit_id)
    assert (c.kind, c.task, c.parents) == ("train", "t1", ())
    assert c.params["align"] == trained.t1.align.model_dump()
    assert c.params["fingerprint"] == trained.t1.fingerprint()
    assert parse_task(c.params["task_file"], Path("/"), "commit") == trained.t1
    assert c.eval["accuracy"] == {"t1": r1.accuracy} and 0.0 <= r1.accuracy <= 1.0
    assert c.stats["steps"] == trained.t1.optim.steps == len(trained.losses1)
    assert c.stats["align_skipped"] == r1.align_skipped == "the branch has no global adapter yet"
    assert c.stats["align_checks"] == []
    # The head's prototypes: stored with the commit, reachable, and made by the *base* model.
    proto_id = c.extra["objects"]["prototypes"]
    assert proto_id in c.referenced_objects() and store.fsck().ok
    stored = to_torch(store.objects.get_tensor(proto_id))
    rt = runtime.build(trained.t1)
    feats, labels = runtime.base_features(rt.loaded, rt.data.train)
    torch.testing.assert_close(stored, F.normalize(class_prototypes(feats, labels, 4), dim=1))


def test_the_lora_moved_away_from_its_init(trained: Trained) -> None:
    expert = lora_of(trained.store, trained.r1.commit_id)
    assert sorted(expert) == sorted(trained.init1) and len(expert) == 4
    for name, start in trained.init1.items():
        if ".lora_B." in name:
            assert not start.any() and expert[name].abs().min() > 0, name  # B starts at zero
        else:
            assert (expert[name] - start).abs().min() > 0, name
    assert trained.losses1[-1] < trained.losses1[0]


def test_the_global_adapter_moves_only_with_merge(trained: Trained) -> None:
    store = trained.store
    merge = store.read_commit(trained.head1)
    assert (merge.kind, merge.sources) == ("merge", (trained.r1.commit_id,))
    assert trained.head_after_t2 == trained.head1  # training t2 left the branch alone
    expert2 = store.read_commit(trained.r2.commit_id)
    assert expert2.parents == (trained.head1,)  # trained from the global
    glob, e1 = lora_of(store, trained.head1), lora_of(store, trained.r1.commit_id)
    assert all(torch.equal(glob[n], e1[n]) for n in e1)  # first merge: the expert as is


def test_full_alignment_makes_the_expert_agree_with_the_global_in_sign(trained: Trained) -> None:
    """p=100, every=1: after every step each weight whose global value is nonzero has the
    global's sign (conflicts are reset to W_G)."""
    store, r2 = trained.store, trained.r2
    c = store.read_commit(r2.commit_id)
    assert c.params["align"] == {
        "enabled": True, "p": 100.0, "every": 1, "reinit": "global", "scope": "global"
    }  # fmt: skip
    assert [row["step"] for row in r2.align] == list(range(1, trained.t2.optim.steps + 1))
    assert c.stats["align_checks"] == r2.align
    assert any(row["reset_fraction"] > 0 for row in r2.align)  # training did create conflicts
    glob, expert = lora_of(store, trained.head1), lora_of(store, r2.commit_id)
    assert any(not torch.equal(glob[n], expert[n]) for n in glob)  # and still learned
    for name, g in glob.items():
        agree = (torch.sign(expert[name]) == torch.sign(g)) | (g == 0)
        assert agree.all(), f"{name}: {int((~agree).sum())} sign conflicts left"


def test_pam_refuses_an_expert_trained_without_alignment(
    trained: Trained, ws: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(trained.repo / STORE_DIR, repo / STORE_DIR)
    store = Store.open(repo)
    doc = topic_task("t3", "bert", "data/t2", steps=3, align={"enabled": False})
    r3 = loop.train(parse_task(doc, ws, "t3.yaml"), store, "main")
    c = store.read_commit(r3.commit_id)
    assert c.params["align"]["enabled"] is False
    assert c.stats["align_checks"] == [] and c.stats["align_skipped"] is None
    before = snapshot(repo / STORE_DIR)
    rc, _, err = adb_in_process(["merge", "--method", "pam", "--into", "main"], repo)
    line = one_error_line(rc, err)
    assert "'t3'" in line and "without alignment" in line and "--force" in line
    assert snapshot(repo / STORE_DIR) == before
    forced = wf.merge_into(
        store, "main", "pam", registry.parse_params("average", []), [], force=True
    )
    assert store.refs.read("refs/heads/main") == forced.commit_id != trained.head1
    assert store.read_commit(forced.commit_id).sources == (r3.commit_id,)


def test_two_processes_train_one_expert(jobs: Jobs) -> None:
    """2 CPU processes (gloo): one expert commit, holding rank 0's weights.

    The model's `python:` hook makes every process dump its final LoRA at exit: rank 1 must
    end bit-identical to rank 0 (gradients are all-reduced; ranks that train alone on their
    data shards end ~5e-2 apart here), and the store must hold exactly rank 0's tensors.
    """
    out, err = jobs.multi.communicate(timeout=400)
    assert jobs.multi.returncode == 0, err[-2000:]
    assert out.count("[experts/main/mp ") == 1  # only the main process reports
    store = Store.open(jobs.multi_repo)
    assert [c.kind for c in all_commits(store)] == ["train"]
    assert store.fsck().ok
    ranks = {p.stem: torch.load(p) for p in jobs.dumps.glob("*.pt")}
    assert sorted(ranks) == ["0", "1"] and {r["world"] for r in ranks.values()} == {2}
    rank0, rank1 = (_saved_names(ranks[r]["lora"]) for r in ("0", "1"))
    stored = lora_of(store, "experts/main/mp")
    assert sorted(stored) == sorted(rank0) == sorted(rank1)
    for name, tensor in rank0.items():
        assert torch.equal(stored[name], tensor), name
        assert torch.equal(rank1[name], tensor), name
        if ".lora_B." in name:
            assert tensor.abs().min() > 0, name  # it trained


def _saved_names(live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Live module parameter names -> the names PEFT saves (adapter name dropped, prefixed)."""
    return {"base_model.model." + n.replace(".default", ""): t for n, t in live.items()}


def test_interrupt_leaves_the_store_unchanged(jobs: Jobs) -> None:
    proc = jobs.long
    deadline = time.monotonic() + 300
    while not jobs.mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert jobs.mark.exists(), f"training never started: {proc.poll()}"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # PYTHONFAULTHANDLER: SIGABRT prints every stack
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"adb train went on for 120 s after SIGINT; its stacks:\n{err[-6000:]}")
    assert one_error_line(proc.returncode, err).startswith("interrupted")
    assert snapshot(jobs.long_repo / STORE_DIR) == jobs.long_before


def test_an_interrupt_swallowed_mid_step_stops_training_at_the_next_step() -> None:
    """Python drops a KeyboardInterrupt raised inside __del__ or a weakref callback; the
    training loop's check raises it again, and the default handler comes back afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(signal, "getsignal", lambda _: signal.default_int_handler)
        with loop.interrupts() as stop_if_interrupted:
            stop_if_interrupted()  # nothing pressed yet
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs here
            except KeyboardInterrupt:
                pass  # swallowed
            with pytest.raises(KeyboardInterrupt):
                stop_if_interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    ("patch", "field"),
    [({"optim": {"lr": 1e-3, "stepz": 40}}, "optim.stepz"), ({"align": {"p": 150}}, "align.p")],
    ids=["unknown-field", "out-of-range"],
)
def test_bad_task_file_is_one_line_naming_the_field(
    ws: Path, tmp_path: Path, patch: dict[str, object], field: str
) -> None:
    Store.init(tmp_path)
    doc = {**topic_task("bad", str(ws / "bert"), str(ws / "data" / "t1")), **patch}
    write_yaml(tmp_path / "bad.yaml", doc)
    before = snapshot(tmp_path / STORE_DIR)
    rc, _, err = run_adb(["train", "bad.yaml"], tmp_path)
    assert f"bad.yaml: {field} = " in one_error_line(rc, err)
    assert snapshot(tmp_path / STORE_DIR) == before


def test_diverged_training_stops_before_the_store(ws: Path, tmp_path: Path) -> None:
    """A NaN loss (here: an absurd learning rate) ends `adb train` with one line naming the
    step and the fix, and no expert is committed."""
    Store.init(tmp_path)
    doc = topic_task("boom", str(ws / "bert"), str(ws / "data" / "t1"), steps=5, lr=1e30)
    write_yaml(tmp_path / "boom.yaml", doc)
    before = snapshot(tmp_path / STORE_DIR)
    rc, _, err = run_adb(["train", "boom.yaml"], tmp_path)
    line = one_error_line(rc, err)
    assert "task boom: training diverged at step" in line and "optim.lr" in line
    assert snapshot(tmp_path / STORE_DIR) == before
