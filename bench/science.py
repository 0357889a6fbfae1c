"""Summarise bench/science.sh: the paper's table, the science checks, ConDU's cost.

Usage: python bench/science.py bench/out/science   (writes science.json beside the runs)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from adapterdb.storage.store import Store
from adapterdb.trainers.evaluate import EVALS, eval_chain, merge_steps
from adapterdb.trainers.report import pm

COLUMNS = ("ACC", "BWT", "FWT", "A_t", "A_m", "forgetting")


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
    return {
        "unify_s": unify,
        "decouple_s": decouple,
        "train_s": train,
        "fraction": (unify + decouple) / train,
    }


def main(out: Path) -> None:
    main_run = json.loads((out / "main.json").read_text())
    sweep = {p: json.loads((out / f"p{p}.json").read_text())["table"]["pam"] for p in (30, 70)}
    sweep[50] = main_run["table"]["pam"]
    table = main_run["table"]
    acc_std = {
        m: statistics.pstdev([x["metrics"]["ACC"] for x in main_run["matrices"][m]]) for m in table
    }
    bwt = {m: table[m]["BWT"][0] for m in table}
    checks = {
        "merging forgets less than fine-tuning (BWT)": all(
            bwt[m] > bwt["finetune"] for m in ("average", "pam", "condu")
        ),
        "PAM forgets no more than averaging (BWT)": bwt["pam"] >= bwt["average"],
        "larger p: higher stability (BWT rises 30->50->70)": sweep[30]["BWT"][0]
        <= sweep[50]["BWT"][0]
        <= sweep[70]["BWT"][0],
        "larger p: lower plasticity (A_t falls 30->50->70)": sweep[30]["A_t"][0]
        >= sweep[50]["A_t"][0]
        >= sweep[70]["A_t"][0],
        "ConDU (routing) ACC >= averaging ACC": table["condu"]["ACC"][0]
        >= table["average"]["ACC"][0],
        "fine-tuning forgets (BWT <= -5 points)": bwt["finetune"] <= -0.05,
        "merging is less order-sensitive (ACC std over orders)": all(
            acc_std[m] <= acc_std["finetune"] for m in ("average", "pam")
        ),
    }
    cost = condu_cost(Store.open(out / "main"))
    doc = {
        "table": table,
        "sweep": sweep,
        "acc_std_over_orders": acc_std,
        "checks": checks,
        "condu_cost": cost,
        "zero_shot": main_run["zero_shot"],
        "independent": main_run["independent"],
        "orders": main_run["orders"],
    }
    (out / "science.json").write_text(json.dumps(doc, indent=2))

    print(f"Orders: {main_run['orders']}\n")
    print("| method | " + " | ".join(COLUMNS) + " | ACC std over orders |")
    print("|" + " --- |" * (len(COLUMNS) + 2))
    for m, row in table.items():
        print(
            f"| {m} | " + " | ".join(pm(*row[c]) for c in COLUMNS) + f" | {100 * acc_std[m]:.1f} |"
        )
    zs = statistics.fmean(main_run["zero_shot"].values())
    ind = statistics.fmean(main_run["independent"].values())
    print(f"| zero-shot (base) | {100 * zs:.1f} | | | | | | |")
    print(f"| independent experts | {100 * ind:.1f} | | | {100 * ind:.1f} | | | |")
    print("\nPAM alignment percentage p (same orders):\n")
    print("| p | " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * (len(COLUMNS) + 1))
    for p in (30, 50, 70):
        print(f"| {p} | " + " | ".join(pm(*sweep[p][c]) for c in COLUMNS) + " |")
    print("\nChecks:\n")
    for name, ok in checks.items():
        print(f"- {'yes' if ok else 'NO'}: {name}")
    unify, decouple, train = cost["unify_s"], cost["decouple_s"], cost["train_s"]
    print(
        f"\nConDU unify {unify:.1f} s + decouple {decouple:.1f} s vs fine-tuning {train:.1f} s: "
        f"{100 * cost['fraction']:.1f}% (paper: ~1%)"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
