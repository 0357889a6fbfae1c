"""Summarise bench/science.sh: per bundled sequence, the table with 95% intervals over task
orders, paired differences, the papers' claims judged on them, the learning rate chosen, the
wall time and ConDU's cost.

Usage: python bench/science.py bench/out/science   (writes science.json there, prints markdown)

A claim "A ≥ B" is judged on the paired difference A − B over orders with its 95% interval:
**held** when the whole interval is above 0, **not contradicted** when it contains 0 (the
data cannot tell A and B apart), **not held** when it lies below 0.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from adapterdb.stats import Paired, interval, paired
from adapterdb.storage.store import Store
from adapterdb.trainers.evaluate import EVALS, eval_chain, merge_steps

COLUMNS = ("ACC", "BWT", "FWT", "A_t", "forgetting")
MERGERS = ("average", "pam", "ties", "magmax", "condu")
# issue 15's whole-layer methods, run second on the same stores (<seq>.layer.json)
LAYER = ("opcm", "continual_ta", "continual_ties", "tsv", "iso_c", "iso_cts", "knots", "dop")
ROWS = ("finetune", *MERGERS, *LAYER)


def metric(run: dict, method: str, key: str) -> list[float]:
    return [m["metrics"][key] for m in run["matrices"][method]]


def diff(run: dict, a: str, b: str, key: str) -> Paired:
    """a − b on `key`, order by order (both ran the same orders)."""
    p = paired(metric(run, a, key), metric(run, b, key))
    assert p is not None, f"{a} or {b} lacks {key} on some order"
    return p


def verdict(p: Paired) -> str:
    iv = p.interval
    if iv.low is not None and iv.low > 0:
        return "held"
    if iv.high is not None and iv.high < 0:
        return "not held"
    return "not contradicted"


def pts(p: Paired) -> str:
    iv = p.interval
    if iv.low is None or iv.high is None:
        return f"{100 * iv.mean:+.1f}"
    return f"{100 * iv.mean:+.1f} [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}]"


def cell(values: list[float]) -> str:
    iv = interval(values)
    if iv is None:
        return "-"
    half = "" if iv.half_width is None else f" ± {100 * iv.half_width:.1f}"
    return f"{100 * iv.mean:.1f}{half}"


def claims(run: dict) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for the papers' claims that this run can test."""
    methods = run["matrices"]
    out = []
    for m in (x for x in (*MERGERS, *LAYER) if x in methods):
        p = diff(run, m, "finetune", "BWT")
        out.append((f"{m} forgets less than fine-tuning (BWT {m} − finetune)", verdict(p), pts(p)))
    p = diff(run, "pam", "average", "BWT")
    out.append(("PAM forgets no more than averaging (BWT pam − average)", verdict(p), pts(p)))
    sd = {m: statistics.stdev(metric(run, m, "ACC")) for m in ("pam", "average")}
    out.append(
        (
            "PAM is less order-sensitive than averaging (sd of ACC over orders)",
            "held" if sd["pam"] < sd["average"] else "not held",
            f"pam {100 * sd['pam']:.1f} vs average {100 * sd['average']:.1f} points "
            "(point estimates over 5 orders, no interval)",
        )
    )
    p = diff(run, "condu", "average", "ACC")
    out.append(("ConDU with routing ≥ averaging (ACC condu − average)", verdict(p), pts(p)))
    ind = statistics.fmean(run["independent"].values())
    best = max(methods, key=lambda m: statistics.fmean(metric(run, m, "ACC")))
    gap = ind - statistics.fmean(metric(run, best, "ACC"))
    out.append(
        (
            "the best method is near the independent-experts bound",
            "held" if gap <= 0.05 else "not held",
            f"{best} is {100 * abs(gap):.1f} points {'under' if gap >= 0 else 'above'} it "
            "(near: ≤ 5 points under)",
        )
    )
    return out


def condu_cost(store: Store) -> dict[str, float]:
    """Unify (merge) + decouple (routing eval) seconds against fine-tuning seconds, ConDU runs."""
    unify = decouple = train = 0.0
    for branch in store.branches():
        if not branch.startswith("run/condu/"):
            continue
        for oid, c in merge_steps(store, branch):
            unify += c.stats.get("seconds", 0.0)
            for src in c.sources:
                train += store.read_commit(src).stats.get("train_seconds", 0.0)
            for record in eval_chain(store, store.refs.read(f"{EVALS}{oid}")):
                decouple += record.eval.get("decouple_seconds", 0.0)
    return {"unify_s": unify, "decouple_s": decouple, "train_s": train}


def load_run(folder: Path, name: str) -> dict[str, Any]:
    """<name>.json, with the whole-layer methods' matrices of <name>.layer.json (same store,
    same orders) merged in where that run exists."""
    run = json.loads((folder / f"{name}.json").read_text())
    layer_file = folder / f"{name}.layer.json"
    if layer_file.is_file():
        layer = json.loads(layer_file.read_text())
        assert layer["orders"] == run["orders"], f"{layer_file} ran other task orders"
        run["matrices"].update(layer["matrices"])
        run["flagged"].update(layer["flagged"])
    return run


def wall_seconds(folder: Path, name: str) -> float:
    """Both runs' wall time (the second only merges and evaluates)."""
    files = (folder / f"{name}.time", folder / f"{name}.layer.time")
    return sum(float(f.read_text().split()[0]) for f in files if f.is_file())


def summarise(folder: Path, name: str) -> dict[str, Any]:
    run = load_run(folder, name)
    doc = {
        "lr": run["lr"],
        "orders": run["orders"],
        "table": {
            m: {k: cell(metric(run, m, k)) for k in COLUMNS} for m in ROWS if m in run["matrices"]
        },
        "flagged": run["flagged"],
        "differences_vs_average": {
            m: {k: pts(diff(run, m, "average", k)) for k in ("ACC", "BWT")}
            for m in ROWS
            if m in run["matrices"] and m != "average"
        },
        "claims": claims(run),
        "wall_seconds": wall_seconds(folder, name),
        "condu_cost": condu_cost(Store.open(folder / name)),
        "zero_shot": statistics.fmean(run["zero_shot"].values()),
        "independent": statistics.fmean(run["independent"].values()),
    }
    return doc


def markdown(name: str, doc: dict[str, Any]) -> str:
    lr = doc["lr"]
    lines = [f"### {name}", ""]
    scores = ", ".join(
        f"{k}: {100 * v['accuracy']:.1f} ± {100 * v['standard_error']:.1f}"
        for k, v in lr["validation"].items()
    )
    lines += [
        f"Learning rate: {lr['chosen']:g} chosen from {lr['candidates']} ({lr['rule']}; "
        f"validation accuracy of the independent experts on {lr['split']}: {scores}). "
        f"Wall time {doc['wall_seconds'] / 60:.1f} min. Orders: "
        + "; ".join(f"{i}: {' → '.join(o)}" for i, o in enumerate(doc["orders"])),
        "",
        "| method | " + " | ".join(COLUMNS) + " | flagged steps |",
        "|" + " --- |" * (len(COLUMNS) + 2),
    ]
    for m, row in doc["table"].items():
        flagged = len(doc["flagged"].get(m, []))
        lines.append(f"| {m} | " + " | ".join(row[k] for k in COLUMNS) + f" | {flagged} |")
    lines.append(f"| zero-shot (base) | {100 * doc['zero_shot']:.1f} | | | | | |")
    ind = 100 * doc["independent"]
    lines.append(f"| independent experts | {ind:.1f} | | | {ind:.1f} | | |")
    lines += ["", "| method − average | ACC | BWT |", "| --- | --- | --- |"]
    for m, row in doc["differences_vs_average"].items():
        lines.append(f"| {m} | {row['ACC']} | {row['BWT']} |")
    lines += ["", "| claim | verdict | evidence (points, mean [95% CI]) |", "| --- | --- | --- |"]
    lines += [f"| {c} | {v} | {e} |" for c, v, e in doc["claims"]]
    cost = doc["condu_cost"]
    lines += [
        "",
        f"ConDU unify {cost['unify_s']:.1f} s + decouple {cost['decouple_s']:.1f} s against "
        f"{cost['train_s']:.1f} s of fine-tuning steps: "
        f"{100 * (cost['unify_s'] + cost['decouple_s']) / cost['train_s']:.1f}% (paper: ~1%).",
        "",
    ]
    return "\n".join(lines)


def main(folder: Path) -> None:
    names = sorted(
        p.stem for p in folder.glob("*.json") if p.stem != "science" and "." not in p.stem
    )
    docs = {name: summarise(folder, name) for name in names}
    (folder / "science.json").write_text(json.dumps(docs, indent=2))
    print("\n".join(markdown(name, doc) for name, doc in docs.items()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
