"""The merge verbs of the CLI: `adb merge` (-o on PEFT folders, --into a branch, --space
product), `adb align` (--report, -o), `adb decouple` (--task, --all), and bad input for each.

Calls go through the console script's entry point in-process (tiny_models.adb_in_process);
`test_the_installed_script` runs the real `adb` executable for a good and a bad merge.
"""

from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_peft, one_error_line, run_adb, snapshot
from tiny_models import adb_in_process

from adapterdb.adapter import CONFIG_FILE, read_peft_raw, to_torch
from adapterdb.lora import delta_weight, lora_pairs
from adapterdb.merging import registry
from adapterdb.storage.store import STORE_DIR, Store

A = "base_model.model.lin.lora_A.weight"


def load(folder: Path) -> dict[str, torch.Tensor]:
    _, raw, _ = read_peft_raw(folder)
    return {n: to_torch(r) for n, r in raw.items()}


def config(folder: Path) -> dict[str, object]:
    return json.loads((folder / CONFIG_FILE).read_text())


def ok(args: list[str], cwd: Path) -> str:
    rc, out, err = adb_in_process(args, cwd)
    assert rc == 0, f"adb {' '.join(args)}: {err}"
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEFT folders a, b, c (rank 2), r3 (rank 3), wide (lin takes 7 inputs, not 6), and a
    store in repo/: main = an import of a, cb = ConDU of a and b."""
    root = tmp_path_factory.mktemp("merge")
    for name, seed, kw in (("a", 1, {}), ("b", 2, {}), ("c", 3, {}), ("r3", 4, {"rank": 3}),
                           ("wide", 5, {"linear": (("lin", 7, 5),)})):  # fmt: skip
        make_peft(root / name, seed, **kw)
    (root / "repo").mkdir()
    ok(["init"], root / "repo")
    ok(["import", "../a", "--task", "ta"], root / "repo")
    ok(["merge", "--method", "condu", "--into", "cb", "../a", "../b"], root / "repo")
    return root


STANDALONE = [
    ("average", []),
    ("ties", ["density=0.5", "lambda=0.8"]),
    ("dare", ["density=0.5", "seed=3"]),
    ("magmax", []),
    ("tall", ["mask_lambda=0.3"]),
    ("task_arithmetic", ["lambda=0.5"]),
]


@pytest.mark.parametrize(("method", "params"), STANDALONE, ids=[m for m, _ in STANDALONE])
def test_standalone_merge_of_peft_folders(
    ws: Path, tmp_path: Path, method: str, params: list[str]
) -> None:
    flags = [f for p in params for f in ("--param", p)]
    sources = [ws / n for n in ("a", "b", "c")]
    out = ok(["merge", "--method", method, *flags, *map(str, sources), "-o", "merged"], tmp_path)
    assert "wrote 4 merged tensors" in out
    got = load(tmp_path / "merged")
    loaded = [load(s) for s in sources]
    want = dict(registry.merge_adapters(method, loaded, registry.parse_params(method, params)))
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if method in ("average", "task_arithmetic"):  # closed forms, independent of the registry
        w = 1 / 3 if method == "average" else 0.5
        for name in want:
            torch.testing.assert_close(got[name], w * sum(x[name] for x in loaded))
    assert config(tmp_path / "merged")["r"] == 2


def test_product_space_merges_different_ranks(ws: Path, tmp_path: Path) -> None:
    """a (r=2) + r3 (r=3) averaged on ΔW = B·A·s; rank 5 holds the sum exactly. The conv
    layer (out 4) has full rank 4: capped there and listed in rank_pattern, so its scale is
    α/4 (PEFT reads the same)."""
    out = ok(
        ["merge", "--method", "average", "--space", "product", "--rank", "5",
         str(ws / "a"), str(ws / "r3"), "-o", "p5"], tmp_path,
    )  # fmt: skip
    assert "refactoring error" in out
    merged, cfg = load(tmp_path / "p5"), config(tmp_path / "p5")
    assert cfg["r"] == 5 and merged[A].shape == (5, 6)
    assert cfg["rank_pattern"] == {"conv": 4}
    sources = [(load(ws / n), config(ws / n)) for n in ("a", "r3")]
    pairs, _ = lora_pairs(merged)
    for pair in pairs:
        deltas = [delta_weight(t[pair.a], t[pair.b], c["lora_alpha"] / c["r"]) for t, c in sources]
        rank = merged[pair.a].shape[0]
        got = delta_weight(merged[pair.a], merged[pair.b], cfg["lora_alpha"] / rank)
        torch.testing.assert_close(got, sum(deltas) / 2, rtol=1e-4, atol=1e-5)
    ok(["merge", "--method", "ties", "--space", "product", str(ws / "a"), str(ws / "r3"),
        "-o", "pdefault"], tmp_path)  # fmt: skip
    assert config(tmp_path / "pdefault")["r"] == 3  # default: the largest input rank


def test_merge_into_a_branch(ws: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ws / "repo", repo)
    store = Store.open(repo)
    head = store.resolve("main")
    out = ok(["merge", "--method", "average", "--into", "main", str(ws / "b")], repo)
    assert out.startswith("[main ")
    merge = store.read_commit(store.resolve("main"))
    assert (merge.kind, merge.method, merge.parents) == ("merge", "average", (head,))
    assert merge.sources == (f"folder:{ws / 'b'}",)
    got = {n: to_torch(r) for n, r in store.iter_tensors(store.manifest_of("main"))}
    a, b = load(ws / "a"), load(ws / "b")
    for name in a:
        torch.testing.assert_close(got[name], (a[name] + b[name]) / 2)
    rc, out, err = adb_in_process(
        ["merge", "--method", "ties", "--into", "new", str(ws / "c")], repo
    )
    assert rc == 0 and "the first source becomes the global adapter as is" in err, err
    assert store.read_commit(store.resolve("new")).parents == ()


def _conflicts(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (torch.sign(e) != torch.sign(g)) & (g != 0)


def test_align_report_and_output(ws: Path, tmp_path: Path) -> None:
    e, g = load(ws / "a"), load(ws / "b")
    out = ok(["align", str(ws / "a"), "--against", str(ws / "b"), "-p", "100", "--report",
              "--json"], tmp_path)  # fmt: skip
    doc = json.loads(out)
    assert sorted(doc["tensors"]) == sorted(g)
    for name, row in doc["tensors"].items():
        conflicts = _conflicts(e[name], g[name])
        assert row["numel"] == g[name].numel()
        assert row["sign_conflicts"] == pytest.approx(conflicts.double().mean().item())
        assert row["misaligned_top_p"] == pytest.approx(
            conflicts.sum().item() / g[name].count_nonzero().item()
        )
    assert not (tmp_path / "aligned").exists()
    # p=50, global scope: τ = the ceil(n/2)-th largest |w_G| over all tensors.
    ok(["align", str(ws / "a"), "--against", str(ws / "b"), "-p", "50", "-o", "aligned"], tmp_path)
    aligned = load(tmp_path / "aligned")
    magnitudes = torch.cat([t.abs().flatten() for t in g.values()]).sort(descending=True).values
    tau = magnitudes[math.ceil(magnitudes.numel() / 2) - 1]
    resets = {n: _conflicts(e[n], g[n]) & (g[n].abs() >= tau) for n in g}
    reset = sum(int(r.sum()) for r in resets.values())
    assert 0 < reset < sum(int(_conflicts(e[n], g[n]).sum()) for n in g)  # some, not all
    for name, reset in resets.items():
        assert torch.equal(aligned[name], torch.where(reset, g[name], e[name])), name
    assert config(tmp_path / "aligned") == config(ws / "a")


def test_decouple_task_and_all(ws: Path, tmp_path: Path) -> None:
    repo = ws / "repo"
    out = ok(["decouple", "cb", "--all", "-o", str(tmp_path / "all")], repo)
    assert out.count("rebuilt expert") == 2
    ok(["decouple", "cb", "--task", "b", "-o", str(tmp_path / "b")], repo)
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a", "b"]
    assert load(tmp_path / "b").keys() == load(tmp_path / "all" / "b").keys()
    assert all(
        torch.equal(t, load(tmp_path / "all" / "b")[n]) for n, t in load(tmp_path / "b").items()
    )
    for task in ("a", "b"):
        rebuilt, original = load(tmp_path / "all" / task), load(ws / task)
        for name, t in rebuilt.items():
            kept = t != 0  # M_t keeps the entries whose sign is the elected one: τ_t's own
            assert kept.any() and torch.equal(torch.sign(t[kept]), torch.sign(original[name][kept]))


BAD = [
    (["merge", "--method", "nope", "../a", "../b", "-o", "OUT"], "unknown merge method 'nope'"),
    (["merge", "--method", "ties", "-p", "density=abc", "../a", "../b", "-o", "OUT"],
     "bad value for density"),
    (["merge", "--method", "ties", "-p", "bogus=1", "../a", "../b", "-o", "OUT"],
     "bad parameter 'bogus=1'"),
    (["merge", "--method", "average", "../a", "../b", "-o", "OUT", "--into", "main"], "-o DIR"),
    (["merge", "--method", "average", "../a", "../wide", "-o", "OUT"], f"tensor '{A}'"),
    (["merge", "--method", "average", "../a", "../r3", "-o", "OUT"], "--space product"),
    (["merge", "--method", "average", "--into", "main", "../wide"], f"tensor '{A}'"),
    (["merge", "--method", "average", "--into", "main", "../r3"], "rank/scale 3/"),
    (["merge", "--method", "ties", "--space", "product", "../a", "../wide", "-o", "OUT"],
     f"tensor '{A}'"),
    (["merge", "--method", "average", "--space", "sideways", "../a", "../b", "-o", "OUT"],
     "unknown space"),
    (["merge", "--method", "pam", "--into", "main", "nosuchrev"], "unknown revision"),
    (["merge", "--method", "condu", "../a", "../b", "-o", "OUT"], "use --into BRANCH"),
    (["merge", "--method", "average", "../a", "../b", "-o", "../a"], "already holds an adapter"),
    (["align", "../a", "--against", "../b"], "pass -o DIR"),
    (["align", "../a", "--against", "../r3", "--report"], "tensor 'base_model.model.conv"),
    (["align", "../a", "--against", "../wide", "-o", "OUT"], f"tensor '{A}'"),
    (["align", "../a", "--against", "../b", "--report", "-p", "150"], "p=150"),
    (["decouple", "main", "--task", "ta", "-o", "OUT"], "not a ConDU commit"),
    (["decouple", "main", "--all", "-o", "OUT"], "not a ConDU commit"),
    (["decouple", "cb", "--task", "nope", "-o", "OUT"], "task 'nope'; its tasks: a, b"),
    (["decouple", "cb", "-o", "OUT"], "--task T"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "fragment"), BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_bad_input_is_one_line_and_changes_nothing(
    ws: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    before, folders = snapshot(ws / "repo" / STORE_DIR), snapshot(ws / "a")
    rc, _, err = adb_in_process(args, ws / "repo")
    assert fragment in one_error_line(rc, err)
    assert snapshot(ws / "repo" / STORE_DIR) == before and snapshot(ws / "a") == folders
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["average", "condu"])
def test_mismatch_into_a_branch_is_refused_before_anything_is_written(
    ws: Path, tmp_path: Path, method: str
) -> None:
    """Product-space linear merges and ConDU check every source's layout (names, dtypes,
    shapes) from metadata first, so a bad source is refused before any merged tensor is
    stored: no ref moves and no object is added."""
    repo = tmp_path / "repo"
    shutil.copytree(ws / "repo", repo)
    store = Store.open(repo)
    refs, before = store.refs.list("refs/"), snapshot(repo / STORE_DIR)
    space = ["--space", "product"] if method == "average" else []
    rc, _, err = adb_in_process(
        ["merge", "--method", method, *space, "--into", "cb" if method == "condu" else "main",
         str(ws / "wide")], repo,
    )  # fmt: skip
    assert "tensor 'base_model.model.lin" in one_error_line(rc, err)
    assert store.refs.list("refs/") == refs and snapshot(repo / STORE_DIR) == before


def test_the_installed_script(ws: Path, tmp_path: Path) -> None:
    """The real `adb` executable: a good standalone merge and a bad one (one line, no
    traceback), run side by side."""
    good = ["merge", "--method", "ties", "-p", "density=0.5", str(ws / "a"), str(ws / "b"),
            "-o", "good"]  # fmt: skip
    bad = ["merge", "--method", "average", str(ws / "a"), str(ws / "wide"), "-o", "bad"]
    with ThreadPoolExecutor(2) as pool:
        (rc, out, err), (rc_bad, _, err_bad) = pool.map(
            lambda args: run_adb(args, tmp_path), [good, bad]
        )
    assert rc == 0 and "wrote 4 merged tensors" in out, err
    want = registry.merge_adapters(
        "ties", [load(ws / "a"), load(ws / "b")], registry.parse_params("ties", ["density=0.5"])
    )
    got = load(tmp_path / "good")
    assert all(torch.equal(got[n], t) for n, t in want)
    assert f"tensor '{A}'" in one_error_line(rc_bad, err_bad)
    assert not (tmp_path / "bad").exists()
