"""Why sequential fine-tuning collapsed, measured: the demo sequence fine-tuned task after task
(one LoRA carried over, as `adb run`'s finetune does) under a learning-rate schedule / clipping
setting and several seeds, with the health figures `adb train` records for every expert plus
how many of EfficientNet's last ReLU6 units still pass a gradient.

    python bench/collapse.py --schedule constant --seeds 0-7   (the old defaults)
    python bench/collapse.py --schedule cosine --seeds 0-7     (the new ones)
    python bench/collapse.py --schedule cosine --clip --seeds 0-7   (plus clipping at 1.0)

Prints one JSON line per (seed, task) and a summary line; bench/RESULTS.md ("Collapse") quotes
them. A run counts as collapsed when its expert is flagged by the health checks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from adapterdb.cli.run import sequence_path
from adapterdb.storage.store import Store
from adapterdb.trainers import runtime
from adapterdb.trainers.config import TaskConfig, load_sequence
from adapterdb.trainers.loop import train


def seeds(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def variant(task: TaskConfig, args: argparse.Namespace, seed: int) -> TaskConfig:
    optim = task.optim.model_copy(
        update={
            "lr": args.lr,
            "schedule": args.schedule,
            "warmup": args.warmup,
            "max_grad_norm": 1.0 if args.clip else None,
            "seed": seed,
        }
    )
    align = task.align.model_copy(update={"enabled": False})
    return task.model_copy(update={"optim": optim, "align": align, "init": "global"})


def live_relu6(rt: runtime.Runtime) -> float:
    """Fraction of the head conv's ReLU6 inputs inside (0, 6) on the probe batch: the units
    that pass a gradient. At 0 no gradient reaches the LoRA and training cannot recover."""
    seen: list[torch.Tensor] = []
    bn = rt.peft.base_model.model._bn1
    handle = bn.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    size = min(64, len(rt.data.train))
    batch = rt.loaded.collate([rt.data.train[i] for i in range(size)])
    rt.peft.eval()
    with torch.no_grad():
        rt.loaded.forward_features(runtime.on_device(batch, rt.loaded.device))
    handle.remove()
    x = seen[0]
    return float(((x > 0) & (x < 6)).float().mean())


def run(args: argparse.Namespace, seed: int, cache: runtime.RuntimeCache) -> list[dict]:
    tasks = load_sequence(sequence_path("split-fashion-mnist")).tasks
    rows, carried = [], None
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.init(Path(tmp))
        for task in tasks:
            t = variant(task, args, seed)
            result = train(t, store, "collapse", init=carried, cache=cache)
            rt = cache.get(t)
            carried = runtime.get_lora(rt)
            h = result.health
            rows.append(
                {
                    "seed": seed,
                    "task": task.name,
                    "A_t": round(result.accuracy, 4),
                    "loss_last_quarter": round(h["loss_last_quarter"], 4),
                    "grad_norm_max": round(h["grad_norm_max"], 3),
                    "probe_cosine_max": round(max(c for _, c in h["probe_cosine"][1:]), 4),
                    "delta_norm_sum": round(h["delta_norm_sum"], 1),
                    "live_relu6": round(live_relu6(rt), 4),
                    "flags": [f.check for f in result.flags],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    parser.add_argument("--warmup", type=float, default=None)
    parser.add_argument("--clip", action="store_true", help="clip gradients at norm 1.0")
    parser.add_argument("--seeds", default="0-3")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 0.0 if args.schedule == "constant" else 0.1
    torch.set_num_threads(1)
    cache = runtime.RuntimeCache()
    rows = [row for seed in seeds(args.seeds) for row in run(args, seed, cache)]
    collapsed = [r for r in rows if r["flags"]]
    summary = {
        "lr": args.lr,
        "schedule": args.schedule,
        "warmup": args.warmup,
        "clip": args.clip,
        "runs": len(seeds(args.seeds)),
        "collapsed_experts": len(collapsed),
        "runs_with_a_collapse": len({r["seed"] for r in collapsed}),
        "mean_A_t": round(statistics.fmean(r["A_t"] for r in rows), 4),
        "mean_A_t_unflagged": round(
            statistics.fmean([r["A_t"] for r in rows if not r["flags"]] or [0.0]), 4
        ),
    }
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
