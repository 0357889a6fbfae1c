"""The history CLI through the real `adb` console script: every verb, --json, bad input."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import lora_tensors, make_peft, peft_config, run_adb, snapshot, to_raw

from adapterdb.adapter import CONFIG_FILE, WEIGHTS_FILE, write_peft_raw
from adapterdb.errors import AdbError
from adapterdb.storage.store import STORE_DIR, Store
from adapterdb.tensorfile import read_safetensors

Result = tuple[int, str, str]


def ok(args: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    rc, out, err = run_adb(args, cwd, env)
    assert rc == 0, f"adb {' '.join(args)} failed ({rc}): {err}"
    assert "Traceback" not in err
    return out


def run_all(calls: Sequence[tuple[Sequence[str], Path, dict[str, str] | None]]) -> list[Result]:
    """Independent commands at once (each is mostly interpreter start-up)."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda c: run_adb(*c), calls))


def same_tensors(folder: Path, source: Path, names: Sequence[str] | None = None) -> bool:
    got, _ = read_safetensors(folder / WEIGHTS_FILE)
    want, _ = read_safetensors(source / WEIGHTS_FILE)
    want = {k: v for k, v in want.items() if names is None or k in names}
    return sorted(got) == sorted(want) and all(
        (got[k].dtype, got[k].shape, got[k].data.tobytes())
        == (want[k].dtype, want[k].shape, want[k].data.tobytes())
        for k in want
    )


@pytest.fixture(scope="module")
def cli_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A store made by `adb init` + two `adb import`s: fp32 (task t1), then bf16 (task t2)."""
    base = tmp_path_factory.mktemp("cli")
    a1, a2 = make_peft(base / "a1", 1, "F32"), make_peft(base / "a2", 2, "BF16")
    repo = base / "repo"
    repo.mkdir()
    assert "Initialised" in ok(["init"], repo)
    assert (repo / STORE_DIR / "FORMAT").is_file()
    assert "[main " in ok(["import", str(a1), "--task", "t1"], repo)
    out = ok(["import", str(a2), "--task", "t2", "-m", "second [wip] [/] run"], repo)
    assert out.startswith("[main ") and "4 tensors" in out
    return repo, a1, a2


def copy_repo(cli_repo: tuple[Path, Path, Path], dest: Path) -> Path:
    shutil.copytree(cli_repo[0], dest)
    return dest


def test_log_and_show(cli_repo: tuple[Path, Path, Path]) -> None:
    repo = cli_repo[0]
    calls = [["log"], ["log", "--json"], ["show", "--json", "--tensors"], ["show", "HEAD~1"]]
    (rc1, log, _), (rc2, log_json, _), (rc3, show_json, _), (rc4, show, _) = run_all(
        [(c, repo, None) for c in calls]
    )
    assert rc1 == rc2 == rc3 == rc4 == 0
    assert "t1" in log and "t2" in log and "second [wip] [/] run" in log
    rows = json.loads(log_json)
    assert [r["task"] for r in rows] == ["t2", "t1"]
    assert rows[0]["parents"] == [rows[1]["id"]] and rows[1]["parents"] == []
    assert {r["kind"] for r in rows} == {"import"} and rows[0]["author"] == "tester"
    doc = json.loads(show_json)
    assert doc["id"] == rows[0]["id"] and doc["tensor_count"] == 4
    numel = sum(t.numel for t in lora_tensors(2).values())
    assert doc["parameters"] == numel and doc["bytes_raw"] == 2 * numel  # bf16
    assert doc["bytes_stored"] > 0 and doc["base_model"] == "tiny-test-model"
    assert {t["dtype"] for t in doc["tensors"].values()} == {"BF16"}
    assert doc["tensors"]["base_model.model.conv.lora_A.weight"]["shape"] == [2, 3, 3, 3]
    assert doc["peft_config"] == json.loads((cli_repo[2] / CONFIG_FILE).read_text())
    assert rows[1]["id"] in show and "t1" in show


def test_checkout(cli_repo: tuple[Path, Path, Path], tmp_path: Path) -> None:
    repo, a1, a2 = cli_repo
    head = Store.open(repo).resolve("HEAD")
    out, only_a = tmp_path / "o1", tmp_path / "oa"
    results = run_all(
        [
            (["checkout", "HEAD~1", "-o", str(out)], repo, None),
            (["checkout", "main", "-o", str(only_a), "--tensor", "*lora_A*"], repo, None),
        ]
    )
    assert [r[0] for r in results] == [0, 0], results
    assert same_tensors(out, a1)
    config = json.loads((a1 / CONFIG_FILE).read_text())
    assert json.loads((out / CONFIG_FILE).read_text()) == config
    a_names = [n for n in lora_tensors(2) if "lora_A" in n]
    assert same_tensors(only_a, a2, a_names) and len(a_names) == 2
    rc, _, err = run_adb(["checkout", "HEAD", "-o", str(out)], repo)
    assert rc != 0 and "--force" in err and same_tensors(out, a1)
    ok(["checkout", head[:7], "-o", str(out), "--force"], repo)  # a short id works too
    assert same_tensors(out, a2)


def test_diff(cli_repo: tuple[Path, Path, Path]) -> None:
    repo, a1, _ = cli_repo
    (rc1, table, err1), (rc2, same, err2) = run_all(
        [
            (["diff", "HEAD~1", "HEAD"], repo, None),
            (["diff", "--json", str(a1), "HEAD~1"], repo, None),
        ]
    )
    assert rc1 == 0 and rc2 == 0, (err1, err2)
    assert "ΔW" in table and "summary" in table and "base_model.model.conv" in table
    doc = json.loads(same)
    assert set(doc["tensors"]) == set(lora_tensors(1))
    assert all(r["rel_l2"] == 0 and r["changed"] == 0 for r in doc["tensors"].values())
    assert set(doc["delta_w"]) == {"base_model.model.lin", "base_model.model.conv"}
    assert doc["summary_delta_w"]["cosine"] == pytest.approx(1.0)
    assert doc["only_a"] == doc["only_b"] == []


def test_branch_tag_fsck_gc(cli_repo: tuple[Path, Path, Path], tmp_path: Path) -> None:
    repo = copy_repo(cli_repo, tmp_path / "repo")
    store = Store.open(repo)
    main_head, main_first = store.resolve("main"), store.resolve("main~1")
    out = ok(["branch", "dev", "--switch"], repo)
    assert "created branch dev" in out and "HEAD is now on branch dev" in out
    assert ok(["import", str(cli_repo[1]), "--task", "t3"], repo).startswith("[dev ")
    junk = store.objects.put_json({"junk": True})
    store.objects.release()  # not for a commit: a live writer's claim would keep it from gc
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    results = run_all(
        [
            (["--store", str(repo), "log", "--json", "dev"], elsewhere, None),
            (["branch", "--json"], repo, None),
            (["tag", "v1", "main~1"], repo, None),
            (["branch", "-d", "dev"], repo, None),
            (["fsck", "--json"], repo, None),
        ]
    )
    (_, dev_log, _), (_, branches, _), (_, tagged, _) = results[:3]
    assert [r[0] for r in results] == [0, 0, 0, 2, 0], results
    dev_rows = json.loads(dev_log)
    assert [r["task"] for r in dev_rows] == ["t3", "t2", "t1"]
    assert [r["id"] for r in dev_rows[1:]] == [main_head, main_first]
    assert json.loads(branches) == [
        {"name": "dev", "commit": store.resolve("dev"), "current": True, "broken": False},
        {"name": "main", "commit": main_head, "current": False, "broken": False},
    ]
    assert "tagged" in tagged and "HEAD's branch" in results[3][2]
    report = json.loads(results[4][1])
    assert report == {
        "objects": len(list(store.objects.ids())),
        "ok": True,
        "errors": [],
        "notes": [],
    }

    (_, tags, _), (rc, switched, _) = run_all(
        [(["tag", "--json"], repo, None), (["branch", "main", "--switch"], repo, None)]
    )
    v1 = {"name": "v1", "commit": main_first, "current": False, "broken": False}
    assert json.loads(tags) == [v1]
    assert rc == 0 and "HEAD is now on branch main" in switched
    deleted = run_all([(["branch", "-d", "dev"], repo, None), (["tag", "-d", "v1"], repo, None)])
    assert "deleted branch dev" in deleted[0][1] and "deleted tag v1" in deleted[1][1]
    assert store.branches() == {"main": main_head} and store.tags() == {}

    before = snapshot(repo / STORE_DIR)
    dry = json.loads(ok(["gc", "--dry-run", "--grace", "0", "--expire", "never", "--json"], repo))
    assert dry["dry_run"] is True and dry["removed"] == [junk]  # dev's commit: kept by reflog
    assert snapshot(repo / STORE_DIR) == before
    done = json.loads(ok(["gc", "--grace", "0", "--expire", "never", "--json"], repo))
    assert done["removed"] == [junk] and done["bytes_freed"] > 0
    assert not store.objects.exists(junk) and store.fsck().ok


# -- bad input: one line on stderr, non-zero exit, store untouched ----------------------------


def bad_inputs(tmp: Path, a1: Path) -> list[tuple[str, list[str], str]]:
    """(label, argv, word the error must contain) for every kind of bad input."""
    not_peft = tmp / "not_peft"
    not_peft.mkdir()
    (not_peft / "model.bin").write_bytes(b"x")
    config = json.loads((a1 / CONFIG_FILE).read_text())
    weights = (a1 / WEIGHTS_FILE).read_bytes()

    def folder(name: str, data: bytes) -> str:
        path = tmp / name
        path.mkdir()
        (path / CONFIG_FILE).write_text(json.dumps(config))
        (path / WEIGHTS_FILE).write_bytes(data)
        return str(path)

    rng = np.random.default_rng(0)
    # a plausible header length, then garbage: gets past the length check to the JSON parse
    noise = rng.integers(128, 256, 200, np.uint8).tobytes()
    garbage = folder("garbage", struct.pack("<Q", 64) + noise)
    cut_header = folder("cut_header", weights[:100])
    cut_data = folder("cut_data", weights[:-10])
    nonfinite = {}
    for name, dtype, value in (("nan", "F32", np.nan), ("inf", "BF16", np.inf)):
        tensors = lora_tensors(3, dtype)
        values = np.zeros((2, 6), np.float32)
        values[1, 4] = value
        tensors["base_model.model.lin.lora_A.weight"] = to_raw(values, dtype)
        nonfinite[name] = str(write_peft_raw(tmp / name, peft_config(), tensors))
    empty_dir = tmp / "empty_store"
    empty_dir.mkdir()
    random_file = tmp / "random_file"
    random_file.write_bytes(rng.integers(0, 256, 100, dtype=np.uint8).tobytes())
    good = str(a1)
    return [
        ("not a PEFT folder", ["import", str(not_peft)], CONFIG_FILE),
        ("markup in path", ["import", str(tmp / "[/x]")], "[/x]"),
        ("garbage safetensors", ["import", garbage], "safetensors"),
        ("truncated header", ["import", cut_header], "safetensors"),
        ("truncated data", ["import", cut_data], "safetensors"),
        ("NaN tensor", ["import", nonfinite["nan"]], "nan or inf"),
        ("inf tensor", ["import", nonfinite["inf"]], "nan or inf"),
        ("task with /", ["import", good, "--task", "a/b"], "task name"),
        ("task ..", ["import", good, "--task", ".."], "task name"),
        ("task with newline", ["import", good, "--task", "a\nb"], "task name"),
        ("task with \\x01", ["import", good, "--task", "a\x01b"], "task name"),
        ("bad branch", ["import", good, "-b", "x..y"], "not a valid branch"),
        ("branch with newline", ["branch", "new\nline"], "not a valid branch"),
        ("unknown ref: checkout", ["checkout", "nope", "-o", str(tmp / "o")], "unknown revision"),
        ("past the root", ["show", "HEAD~5"], "past the start"),
        ("store: empty folder", ["--store", str(empty_dir), "log"], "not an adb store"),
        ("store: random file", ["--store", str(random_file), "import", good], "not an adb store"),
    ]


FIX_WORDS = (
    "use ",
    "run ",
    "pass ",
    "re-save",
    "fix ",
    "see ",
    "create ",
    "save ",
    "give ",
    "lists",
)


def test_bad_input_gives_one_line_and_changes_nothing(
    cli_repo: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    repo, a1, _ = cli_repo
    cases = bad_inputs(tmp_path, a1)
    copies = [copy_repo(cli_repo, tmp_path / f"repo{i}") for i in range(len(cases))]
    outside = snapshot(tmp_path)  # the --store targets that are not stores, among others
    before = snapshot(repo / STORE_DIR)
    calls = [(args, copy, None) for (_, args, _), copy in zip(cases, copies, strict=True)]
    results = run_all(calls)
    problems = []
    for (label, args, word), copy, (rc, out, err) in zip(cases, copies, results, strict=True):
        line = err.rstrip("\n")
        checks = {
            "exit code": rc != 0,
            "one line": bool(line) and "\n" not in line,
            "no traceback": "Traceback" not in err,
            "names problem": word.lower() in line.lower(),
            "says fix": any(w in line for w in FIX_WORDS),
            "store unchanged": snapshot(copy / STORE_DIR) == before,
            "nothing on stdout": out == "",
        }
        failed = [k for k, good in checks.items() if not good]
        if failed:
            problems.append(f"{label} {args!r}: {failed}: rc={rc} stderr={err!r}")
    assert not problems, "\n".join(problems)
    assert snapshot(tmp_path) == outside


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]},  # negative dims, numel 1
        {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
        {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
    ],
)
def test_malformed_safetensors_header_is_an_adb_error(
    tmp_path: Path, entry: dict[str, object]
) -> None:
    """Headers the CLI must refuse with its one-line error rather than a traceback."""
    header = json.dumps({"x": entry}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(AdbError, match="not a readable safetensors file"):
        read_safetensors(path)
