"""The CLI a git user expects: merge into HEAD's branch, status, log of experts, full ref names,
reflog revisions, reflog/reset, --version, completion, --store after the verb, --json on the
writing verbs, and output to a pipe that is not cut at 80 columns."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import adb_env, make_peft, one_error_line, run_adb, snapshot
from tiny_models import adb_in_process

from adapterdb.storage.commits import Commit
from adapterdb.storage.objects import TEMP_PREFIX
from adapterdb.storage.store import STORE_DIR, Store


def ok(args: list[str], cwd: Path) -> str:
    rc, out, err = adb_in_process(args, cwd)
    assert rc == 0, f"adb {' '.join(args)} failed ({rc}): {err}"
    return out


def trained_expert(store: Store, folder: Path, task: str, accuracy: float, flags: list) -> str:
    """An expert commit as `adb train` writes it (alignment on, A_t, health flags)."""
    from adapterdb.adapter import read_peft_raw

    config, tensors, _ = read_peft_raw(folder)
    head = store.refs.read("refs/heads/main")
    commit = Commit(
        manifest=store.put_adapter(tensors, config),
        kind="train",
        parents=(head,) if head else (),
        task=task,
        method="train",
        params={"align": {"enabled": True}},
        eval={"accuracy": {task: accuracy}},
        stats={"health": {"flags": flags}},
        message=f"train {task}",
    )
    return store.commit(commit, ref=f"refs/experts/main/{task}")


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """repo/ with main = import of a (task t1); PEFT folders a, b, c beside it."""
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        make_peft(tmp_path / name, seed)
    (tmp_path / "repo").mkdir()
    ok(["init"], tmp_path / "repo")
    ok(["import", "../a", "--task", "t1"], tmp_path / "repo")
    return tmp_path


def test_merge_without_into_targets_heads_branch(ws: Path) -> None:
    repo = ws / "repo"
    store = Store.open(repo)
    ok(["branch", "dev", "--switch"], repo)
    expert = trained_expert(store, ws / "b", "t2", 0.9, [])  # an expert of main, not dev
    rc, _, err = adb_in_process(["merge", "--method", "pam"], repo)
    assert "branch 'dev' has no unmerged expert" in one_error_line(rc, err)
    ok(["branch", "main", "--switch"], repo)
    before_dev = store.refs.read("refs/heads/dev")
    out = ok(["merge", "--method", "pam"], repo)
    assert out.startswith("[main ")
    head = store.read_commit(store.refs.read("refs/heads/main"))
    assert head.sources == (expert,) and head.method == "pam"
    assert store.refs.read("refs/heads/dev") == before_dev
    # with SOURCES and no --into, they too go into HEAD's branch, as `git merge X` does
    ok(["branch", "dev", "--switch"], repo)
    assert ok(["merge", "--method", "average", "../c"], repo).startswith("[dev ")


def test_merge_without_target_refuses_detached_head_and_no_store(ws: Path) -> None:
    repo = ws / "repo"
    store = Store.open(repo)
    head = store.refs.read("refs/heads/main")
    (repo / STORE_DIR / "HEAD").write_text(f"{head}\n")
    before = snapshot(repo / STORE_DIR)
    rc, _, err = adb_in_process(["merge", "--method", "pam", "../b"], repo)
    assert "HEAD is detached" in one_error_line(rc, err)
    assert snapshot(repo / STORE_DIR) == before
    rc, _, err = adb_in_process(["merge", "--method", "pam"], ws)
    assert "no adb store" in one_error_line(rc, err)


def test_status_shows_head_waiting_experts_last_eval_and_problems(ws: Path) -> None:
    from adapterdb.trainers.evaluate import record_eval

    repo = ws / "repo"
    store = Store.open(repo)
    flag = {"check": "collapse", "step": 12, "value": 1.0}
    trained_expert(store, ws / "b", "t2", 0.875, [flag])
    trained_expert(store, ws / "c", "t3", 0.5, [])
    head = store.refs.read("refs/heads/main")
    record_eval(store, head, store.read_commit(head), {"t1": 0.75}, "task-id", {})
    doc = json.loads(ok(["status", "--json"], repo))
    assert doc["branch"] == "main" and doc["head"]["id"] == head
    assert [(r["task"], r["accuracy"], r["flags"]) for r in doc["unmerged"]] == [
        ("t3", 0.5, []),
        ("t2", 0.875, ["collapse"]),
    ]
    assert doc["last_eval"]["accuracy"] == {"t1": 0.75} and doc["problems"] == []
    text = ok(["status"], repo)
    assert "On branch main" in text and "collapse" in text and "t1=0.7500" in text
    # merged experts no longer wait
    ok(["merge", "--method", "pam"], repo)
    assert [r["task"] for r in json.loads(ok(["status", "--json"], repo))["unmerged"]] == ["t2"]
    # cheap problems: a broken ref, a ref to a missing commit, a leftover temp file
    root = repo / STORE_DIR
    (root / "refs" / "tags" / "broken").write_text("garbage\n")
    (root / "refs" / "tags" / "gone").write_text("ab" * 32 + "\n")
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp" / f"{TEMP_PREFIX}leftover").write_bytes(b"x")
    problems = json.loads(ok(["status", "--json"], repo))["problems"]
    assert len(problems) == 3, problems
    assert any("refs/tags/broken" in p for p in problems)
    assert any("refs/tags/gone" in p and "not in the store" in p for p in problems)
    assert any("temp file" in p for p in problems)


def test_status_does_not_import_torch(ws: Path) -> None:
    code = (
        "import sys\n"
        "from adapterdb.cli.app import main\n"
        "sys.argv = ['adb', 'status']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ws / "repo",
        env=adb_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "On branch main" in proc.stdout and "torch loaded: False" in proc.stdout


def test_log_on_a_branch_with_experts_only_and_log_all(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 2)):
        make_peft(tmp_path / name, seed)
    repo = tmp_path / "repo"
    repo.mkdir()
    ok(["init"], repo)
    store = Store.open(repo)
    trained_expert(store, tmp_path / "a", "t1", 0.9, [])
    trained_expert(store, tmp_path / "b", "t2", 0.8, [])
    out = ok(["log"], repo)
    assert "no global adapter yet; 2 expert(s) wait" in out and "adb merge --method pam" in out
    assert json.loads(ok(["log", "--json"], repo)) == []
    ok(["merge", "--method", "pam"], repo)
    from adapterdb.trainers.evaluate import record_eval

    head = store.refs.read("refs/heads/main")
    record = record_eval(store, head, store.read_commit(head), {"t2": 0.5}, "task-id", {})
    rows = json.loads(ok(["log", "--all", "--json"], repo))
    refs = {r["id"]: r["ref"] for r in rows}
    assert refs[head] == "refs/heads/main"
    assert refs[record] == f"refs/evals/{head}"
    assert refs[store.refs.read("refs/experts/main/t1")] == "refs/experts/main/t1"
    assert refs[store.refs.read("refs/experts/main/t2")] == "refs/experts/main/t2"
    assert [r["time"] for r in rows] == sorted((r["time"] for r in rows), reverse=True)
    assert "refs/evals/" in ok(["log", "--all"], repo)


def test_full_ref_names_and_reflog_revisions(ws: Path) -> None:
    repo = ws / "repo"
    store = Store.open(repo)
    first = store.refs.read("refs/heads/main")
    ok(["import", "../b", "--task", "t2"], repo)
    second = store.refs.read("refs/heads/main")
    ok(["tag", "v1", "HEAD~1"], repo)
    expert = trained_expert(store, ws / "c", "t3", 0.5, [])
    for rev, want in (
        ("refs/heads/main", second),
        ("refs/heads/main~1", first),
        ("refs/tags/v1", first),
        ("refs/experts/main/t3", expert),
        ("experts/main/t3", expert),
        ("main@{0}", second),
        ("main@{1}", first),
        ("refs/heads/main@{1}", first),
        ("HEAD@{1}", first),
        ("@{1}", first),
        ("v1@{0}", first),
    ):
        assert store.resolve(rev) == want, rev
    assert json.loads(ok(["show", "main@{1}", "--json"], repo))["id"] == first
    rc, _, err = adb_in_process(["show", "main@{5}"], repo)
    assert "has only 2 entries" in one_error_line(rc, err)
    rc, _, err = adb_in_process(["show", "nosuch@{1}"], repo)
    assert "no ref named 'nosuch'" in one_error_line(rc, err)
    rows = json.loads(ok(["reflog", "--json"], repo))
    assert [(r["selector"], r["new"]) for r in rows] == [("main@{0}", second), ("main@{1}", first)]
    assert rows[0]["message"].startswith("import")
    assert "v1@{0}: tag: v1" in ok(["reflog", "refs/tags/v1"], repo)
    # options that name a branch take its full name too, and never nest it
    assert ok(["import", "../a", "-b", "refs/heads/dev"], repo).startswith("[dev ")
    out = ok(["merge", "--method", "average", "--into", "refs/heads/dev", "../b"], repo)
    assert out.startswith("[dev ")
    assert sorted(store.branches()) == ["dev", "main"]


def test_reset_to_main_at_1_undoes_a_bad_merge(ws: Path) -> None:
    repo = ws / "repo"
    store = Store.open(repo)
    good = store.refs.read("refs/heads/main")
    trained_expert(store, ws / "b", "t2", 0.9, [])
    ok(["merge", "--method", "ties", "--param", "density=0.2"], repo)
    bad = store.refs.read("refs/heads/main")
    assert bad != good
    out = ok(["reset", "main@{1}"], repo)
    assert out.startswith(f"main is now at {good[:10]}")
    assert store.refs.read("refs/heads/main") == good
    last = store.refs.reflog("refs/heads/main")[-1]
    assert (last.old, last.new, last.message) == (bad, good, "reset: moving to main@{1}")
    ok(["reset", "main@{1}"], repo)  # the reset is in the reflog too, so it undoes the same way
    assert store.refs.read("refs/heads/main") == bad
    head = store.refs.read("refs/heads/main")
    (repo / STORE_DIR / "HEAD").write_text(f"{head}\n")
    before = snapshot(repo / STORE_DIR)
    rc, _, err = adb_in_process(["reset", good], repo)
    assert "HEAD is detached" in one_error_line(rc, err)
    assert snapshot(repo / STORE_DIR) == before


def test_version_completion_and_store_after_the_verb(ws: Path) -> None:
    from adapterdb import __version__

    assert ok(["--version"], ws) == f"adb {__version__}\n"
    script = ok(["--show-completion", "bash"], ws)
    assert "_ADB_COMPLETE" in script and "complete" in script
    repo = str(ws / "repo")
    rows = json.loads(ok(["log", "--json", "--store", repo], ws))
    assert [r["task"] for r in rows] == ["t1"]
    assert json.loads(ok(["--store", repo, "status", "--json"], ws))["branch"] == "main"
    out = ok(["import", str(ws / "b"), "--task", "t2", "--store", repo], ws)
    assert out.startswith("[main ")
    rc, _, err = adb_in_process(["log", "--store", str(ws / "nowhere")], ws)
    assert "is not an adb store" in one_error_line(rc, err)


def test_json_on_the_writing_verbs(ws: Path, tmp_path: Path) -> None:
    repo = ws / "repo"
    store = Store.open(repo)
    doc = json.loads(ok(["import", "../b", "--task", "t2", "--json"], repo))
    assert doc["id"] == store.refs.read("refs/heads/main")
    assert (doc["ref"], doc["branch"], doc["kind"], doc["task"]) == (
        "refs/heads/main",
        "main",
        "import",
        "t2",
    )
    doc = json.loads(ok(["import", "../c", "--task", "t3", "--expert", "--json"], repo))
    assert doc["ref"] == "refs/experts/main/t3" and doc["branch"] is None
    assert store.read_commit(doc["id"]).parents == (store.refs.read("refs/heads/main"),)
    rc, out, err = adb_in_process(["merge", "--method", "pam", "--json"], repo)
    assert rc == 0, err
    doc = json.loads(out)  # stdout is the document alone; the warning went to stderr
    assert (doc["kind"], doc["method"], doc["task"], doc["branch"]) == (
        "merge",
        "pam",
        "t3",
        "main",
    )
    assert doc["warnings"] and "no training record" in doc["warnings"][0] and "warning:" in err
    ok(["merge", "--method", "condu", "--into", "cb", "../a", "../b"], repo)
    doc = json.loads(ok(["decouple", "cb", "--all", "-o", str(tmp_path / "x"), "--json"], repo))
    assert sorted(doc["folders"]) == ["a", "b"]
    assert all(Path(f, "adapter_model.safetensors").is_file() for f in doc["folders"].values())
    rc, _, err = adb_in_process(["import", "../a", "--expert"], repo)
    assert "--task" in one_error_line(rc, err)


def test_output_to_a_pipe_is_not_cut_at_80_columns(ws: Path) -> None:
    repo = ws / "repo"
    message = "a long message " + "x" * 120 + " end"
    long = "lin_" + "y" * 90
    make_peft(ws / "wide", 4, linear=((long, 6, 5),), conv=())
    make_peft(ws / "wide2", 5, linear=((long, 6, 5),), conv=())
    ok(["import", "../wide", "-m", message], repo)
    env = {"COLUMNS": "80"}  # what a terminal would say; a pipe must not be cut there anyway
    rc, out, err = run_adb(["log"], repo, env)
    assert rc == 0, err
    assert message in out
    rc, out, err = run_adb(["diff", "../wide", "../wide2"], repo, env)
    assert rc == 0, err
    assert f"base_model.model.{long}.lora_A.weight" in out


def test_train_json_then_log_status_and_the_missions_merge(tmp_path: Path) -> None:
    """`adb train --json` prints the expert commit (progress on stderr); the branch is empty
    until `adb merge --method pam`, which needs no --into."""
    from tiny_models import TOPICS, save_bert, topic_task, write_topic_data, write_yaml

    save_bert(tmp_path / "bert", [w for task in TOPICS.values() for words in task for w in words])
    write_topic_data(tmp_path / "data", "t1")
    repo = tmp_path / "repo"
    repo.mkdir()
    ok(["init"], repo)
    write_yaml(
        repo / "t1.yaml", topic_task("t1", str(tmp_path / "bert"), str(tmp_path / "data/t1"))
    )
    doc = json.loads(ok(["train", "t1.yaml", "--json"], repo))
    assert (doc["ref"], doc["kind"], doc["task"], doc["branch"]) == (
        "refs/experts/main/t1",
        "train",
        "t1",
        None,
    )
    assert "1 expert(s) wait" in ok(["log"], repo)
    waiting = json.loads(ok(["status", "--json"], repo))["unmerged"]
    assert [(r["id"], r["accuracy"]) for r in waiting] == [
        (doc["id"], doc["eval"]["accuracy"]["t1"])
    ]
    assert ok(["merge", "--method", "pam"], repo).startswith("[main ")
    assert Store.open(repo).read_commit(Store.open(repo).resolve("main")).sources == (doc["id"],)


def test_status_flags_a_lost_branch_ref_and_its_advice_restores_it(ws: Path) -> None:
    repo = ws / "repo"
    head = Store.open(repo).refs.read("refs/heads/main")
    (repo / STORE_DIR / "refs" / "heads" / "main").unlink()
    problems = json.loads(ok(["status", "--json"], repo))["problems"]
    assert len(problems) == 1 and "refs/heads/main is missing" in problems[0]
    advice = problems[0].split("`")[1]
    ok(advice.split()[1:], repo)  # adb branch main main@{0}
    assert Store.open(repo).refs.read("refs/heads/main") == head
    assert json.loads(ok(["status", "--json"], repo))["problems"] == []


def test_every_verb_takes_store_after_it() -> None:
    import typer

    from adapterdb.cli import app as cli_app

    cli_app._register()

    def verbs(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
        subs = getattr(command, "commands", None)  # a group (adb, adb remote) or a verb
        if path:  # `adb --store X` is the root's own option
            yield path, command
        for name, sub in (subs or {}).items():
            yield from verbs(sub, (*path, name))

    found = dict(verbs(typer.main.get_command(cli_app.app)))
    assert {("log",), ("status",), ("reset",), ("merge",)} <= set(found)
    missing = [p for p, c in found.items() if not any("--store" in o.opts for o in c.params)]
    assert not missing, missing


def test_status_still_answers_with_a_broken_head_or_expert_ref(ws: Path) -> None:
    repo = ws / "repo"
    root = repo / STORE_DIR
    (root / "refs" / "experts" / "main").mkdir(parents=True)
    (root / "refs" / "experts" / "main" / "t9").write_text("nonsense\n")
    doc = json.loads(ok(["status", "--json"], repo))
    assert doc["branch"] == "main" and doc["unmerged"] == []
    assert len(doc["problems"]) == 1 and "refs/experts/main/t9" in doc["problems"][0]
    (root / "HEAD").write_text("garbage\n")
    doc = json.loads(ok(["status", "--json"], repo))
    assert doc["branch"] is None and doc["head"] is None
    assert [p.split(":")[0] for p in doc["problems"]] == [
        "HEAD is broken",
        "ref refs/experts/main/t9 is broken",
    ]


def test_run_json_still_reports_progress_on_stderr(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long `adb run --json` must not be silent: its progress lines go to stderr, the
    document alone to stdout. (The run itself is replaced: only the printing is tested.)"""
    from adapterdb.trainers import sequence

    class Done:
        def to_json(self) -> dict[str, Any]:
            return {"done": True}

    def fake_run(store: Store, seq: Any, methods: list[str], *args: Any, **kw: Any) -> Done:
        say = args[3]  # run_sequence(store, seq, methods, orders, seed, top_k, say, jobs=...)
        say(f"pam order 0: task 1 of {len(seq.tasks)}")
        return Done()

    monkeypatch.setattr(sequence, "run_sequence", fake_run)
    rc, out, err = adb_in_process(
        ["run", "split-wordnet", "--methods", "pam", "--json"], ws / "repo"
    )
    assert rc == 0, err
    assert json.loads(out) == {"done": True} and "pam order 0: task 1 of" in err
