"""What re-verifying objects on reuse costs (issue 12, item 3), on the Gemma-2B-shaped LoRA.

A commit that needs an object already in the store used to take it on trust (a stat and a
touch); now it decodes and re-hashes it, so a corrupt object is written again instead of
being reused into a commit nobody can check out. The cost falls on reuse only: re-importing
an adapter, or tensors shared between versions (frozen factors, zero-initialised B).

Measured in process, each figure the median of `--repeat` runs after one untimed warm-up:

- write: `put_adapter` into an empty store (every object new: encode, fsync, rename);
- reuse, verified: `put_adapter` of the same tensors again (every object reused, re-hashed);
- reuse, trusted: the same with verification switched off (the old behaviour).

    python bench/reuse_bench.py [--repeat N] [--layers N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from common import time_call
from shapes import LAYERS, gemma_like_config, gemma_like_lora

from adapterdb.adapter import from_torch
from adapterdb.storage.objects import ObjectStore
from adapterdb.storage.store import Store


def measure(dtype: torch.dtype, repeat: int, layers: int) -> dict[str, float]:
    raws = {k: from_torch(v) for k, v in gemma_like_lora(dtype, layers=layers).items()}
    nbytes = sum(t.data.size for t in raws.values())
    tmp = Path(tempfile.mkdtemp(prefix="reuse-bench-"))
    try:
        counter = iter(range(10**6))
        stores: list[Store] = []

        def fresh() -> None:
            stores.append(Store.init(tmp / f"s{next(counter)}"))

        def put() -> None:
            stores[-1].put_adapter(raws, gemma_like_config())

        write = time_call(put, repeat, setup=fresh, warmup=1)
        reused = Store.init(tmp / "reused")
        reused.put_adapter(raws, gemma_like_config())
        verified = time_call(
            lambda: reused.put_adapter(raws, gemma_like_config()), repeat, warmup=1
        )
        real_verify = ObjectStore.verify
        ObjectStore.verify = lambda self, oid: None  # type: ignore[method-assign]
        try:
            trusted = time_call(
                lambda: reused.put_adapter(raws, gemma_like_config()), repeat, warmup=1
            )
        finally:
            ObjectStore.verify = real_verify  # type: ignore[method-assign]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "MB": nbytes / 1e6,
        "tensors": len(raws),
        "write": write.median,
        "verified": verified.median,
        "trusted": trusted.median,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=LAYERS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| dtype | MB | write | reuse, verified | reuse, trusted | verify cost | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        r = measure(dtype, args.repeat, args.layers)
        cost = r["verified"] - r["trusted"]
        print(
            f"| {name} | {r['MB']:.1f} | {r['write']:.3f} s | {r['verified']:.3f} s | "
            f"{r['trusted']:.3f} s | +{cost:.3f} s ({cost / r['write']:.0%} of a write) | "
            f"{r['MB'] / 1e3 / r['verified']:.2f} |"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
