"""Store benchmark (issue 3): the adb store against safetensors on a Gemma-2B-shaped LoRA.

Measured in one run, fp32 and bf16, each figure the median of `--repeat` runs after one
untimed warm-up:

- commit: `adb import PEFT_DIR` against a fresh Python process that loads the folder's
  safetensors and saves it elsewhere (target <= 3x); in-process `Store.put_adapter` + `commit`
  against `save_file` beside it;
- checkout: `adb checkout main -o DIR` against a fresh Python process that runs `load_file`
  (target <= 2x); in-process `Store.load_tensors` + write against `load_file` beside it;
- bytes on disk: the object files one import adds against the safetensors file
  (<= 0.85x fp32, <= 0.72x bf16);
- masks through `ObjectStore.put_mask`: 50% density <= 1.02 bits per parameter, 1% density
  within 1.2x of its entropy bound;
- memcpy of the same bytes as the physical reference, and a serial stage breakdown (read,
  hash, encode/decode, fsync, imports) that says where the time goes.

All files are written just before they are read, so every read hits the page cache (the cache
cannot be dropped without root); adb and safetensors see the same warm cache.

    python bench/store_bench.py [--quick] [--repeat N] [--markdown]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    CHECK_HEADERS,
    Check,
    describe_machine,
    fmt,
    format_table,
    machine_info,
    memcpy_timing,
    time_call,
    time_command,
    write_json,
)
from safetensors.torch import load_file, save_file
from shapes import LAYERS, gemma_like_config, gemma_like_lora

from adapterdb.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_finite,
    from_torch,
    read_peft_raw,
    write_peft_raw,
)
from adapterdb.storage import codec
from adapterdb.storage.commits import Commit
from adapterdb.storage.objects import ObjectStore
from adapterdb.storage.provenance import code_provenance
from adapterdb.storage.store import Store
from adapterdb.tensorfile import DTYPES as TENSOR_DTYPES
from adapterdb.tensorfile import RawTensor, write_safetensors

DTYPES: dict[str, tuple[torch.dtype, float]] = {  # name -> (dtype, bytes-on-disk target)
    "fp32": (torch.float32, 0.85),
    "bf16": (torch.bfloat16, 0.72),
}
COMMIT_LIMIT = 3.0
CHECKOUT_LIMIT = 2.0
DENSE_MASK_BITS = 1.02
SPARSE_MASK_FACTOR = 1.2
QUICK_LAYERS = 2
MASK_HEADERS = ["density", "n", "object bytes", "bits/param", "entropy", "put s", "get s"]
META = {"format": "pt"}

PY = sys.executable
SAVE_REF = (
    "import sys; from safetensors.torch import load_file, save_file; "
    "save_file(load_file(sys.argv[1]), sys.argv[2], metadata={'format': 'pt'})"
)
LOAD_REF = "import sys; from safetensors.torch import load_file; load_file(sys.argv[1])"


def adb_argv() -> list[str]:
    """The `adb` console script of this interpreter's environment (what a user runs)."""
    script = Path(PY).parent / "adb"
    return [str(script)] if script.is_file() else [PY, "-m", "adapterdb.cli.app"]


def reset(path: Path) -> Path:
    """Remove `path` (file or folder) so the next timed run starts from nothing."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    return path


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fresh_store(path: Path) -> Store:
    reset(path)
    return Store.init(path)


# -- commit -----------------------------------------------------------------------------------


def save_durably(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`save_file` plus the fsync adb does for every object, for a like-for-like reference."""
    save_file(tensors, path, metadata=META)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bench_commit(
    work: Path, tensors: dict[str, torch.Tensor], peft: Path, repeat: int
) -> dict[str, Any]:
    """`adb import` vs a load+save process; put_adapter+commit vs save_file; bytes on disk."""
    src = peft / WEIGHTS_FILE
    store_dir, ref_out = work / "import-store", work / "ref.safetensors"
    env = {"ADB_STORE": str(store_dir / ".adb")}
    cli = time_command(
        [*adb_argv(), "import", str(peft)],
        repeat,
        setup=lambda: fresh_store(store_dir),
        warmup=1,
        env=env,
        cwd=work,
    )
    store_bytes = dir_bytes(store_dir / ".adb" / "objects")
    imported = Store.open(store_dir)
    tensor_bytes = imported.stored_bytes(imported.manifest_of("main"))
    cli_ref = time_command(
        [PY, "-c", SAVE_REF, str(src), str(ref_out)],
        repeat,
        setup=lambda: reset(ref_out),
        warmup=1,
        cwd=work,
    )

    raw = {k: from_torch(v) for k, v in tensors.items()}
    config = json.loads((peft / CONFIG_FILE).read_text())
    state: dict[str, Store] = {}
    inproc_dir = work / "inproc-store"

    def setup_store() -> None:
        state["store"] = fresh_store(inproc_dir)

    def commit() -> None:
        store = state["store"]
        manifest_id = store.put_adapter(raw, config, META)
        store.commit(Commit(manifest=manifest_id, kind="import", message="bench"), "main")

    inproc = time_call(commit, repeat, setup=setup_store, warmup=1)
    inproc_ref = time_call(
        lambda: save_file(tensors, ref_out, metadata=META),
        repeat,
        setup=lambda: reset(ref_out),
        warmup=1,
    )
    inproc_ref_fsync = time_call(
        lambda: save_durably(tensors, ref_out), repeat, setup=lambda: reset(ref_out), warmup=1
    )
    return {
        "cli": cli.to_json(),
        "cli_reference": cli_ref.to_json(),
        "inprocess": inproc.to_json(),
        "inprocess_reference": inproc_ref.to_json(),
        "inprocess_reference_fsync": inproc_ref_fsync.to_json(),
        "store_bytes": store_bytes,
        "tensor_object_bytes": tensor_bytes,
        "safetensors_bytes": src.stat().st_size,
    }


# -- checkout ---------------------------------------------------------------------------------


def bench_checkout(
    work: Path, tensors: dict[str, torch.Tensor], peft: Path, repeat: int
) -> dict[str, Any]:
    """`adb checkout` vs a `load_file` process; load_tensors+write vs `load_file` in-process.

    `load_file` memory-maps lazily (it returns before reading a byte), so the eager
    `backend="pread"` load is reported beside it as the figure that actually reads the data.
    """
    src = peft / WEIGHTS_FILE
    store_dir, out = work / "import-store", work / "checkout"
    env = {"ADB_STORE": str(store_dir / ".adb")}
    cli = time_command(
        [*adb_argv(), "checkout", "main", "-o", str(out)],
        repeat,
        setup=lambda: reset(out),
        warmup=1,
        env=env,
        cwd=work,
    )
    roundtrip_ok = all(torch.equal(load_file(out / WEIGHTS_FILE)[k], v) for k, v in tensors.items())
    cli_ref = time_command([PY, "-c", LOAD_REF, str(src)], repeat, warmup=1, cwd=work)

    def checkout() -> None:
        store = Store.open(store_dir)
        manifest = store.manifest_of("main")
        write_peft_raw(out, manifest.config, store.load_tensors(manifest), manifest.metadata)

    inproc = time_call(checkout, repeat, setup=lambda: reset(out), warmup=1)
    inproc_ref = time_call(lambda: load_file(src), repeat, warmup=1)
    eager_ref = time_call(lambda: load_file(src, backend="pread"), repeat, warmup=1)
    return {
        "cli": cli.to_json(),
        "cli_reference": cli_ref.to_json(),
        "inprocess": inproc.to_json(),
        "inprocess_reference": inproc_ref.to_json(),
        "inprocess_reference_eager": eager_ref.to_json(),
        "roundtrip_bit_exact": roundtrip_ok,
    }


# -- where the time goes ----------------------------------------------------------------------


def _write_files(folder: Path, blobs: list[bytes], fsync: bool) -> None:
    """Write one file per blob, as the object store does (with or without its fsync)."""
    reset(folder).mkdir(parents=True)
    for i, blob in enumerate(blobs):
        with open(folder / str(i), "wb") as f:
            f.write(blob)
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def _stage(fn: Callable[[], object], repeat: int) -> float:
    return time_call(fn, repeat, warmup=1).median


def commit_stages(work: Path, peft: Path, repeat: int) -> dict[str, float]:
    """Serial (one thread) seconds of each step `adb import` takes on the whole adapter."""
    _, raw, _ = read_peft_raw(peft)
    encoded = [codec.encode_tensor(t.data, t.dtype, t.itemsize)[1] for t in raw.values()]
    blobs = [b"".join(bytes(f) for f in fs) for fs in encoded]
    folder = work / "stage-files"
    stages = {
        "read_peft_raw (header, mmap)": _stage(lambda: read_peft_raw(peft), repeat),
        "finite check": _stage(lambda: check_finite(raw, "bench"), repeat),
        "sha256": _stage(lambda: [hashlib.sha256(t.data).digest() for t in raw.values()], repeat),
        "encode (codec 2: plane split + zstd)": _stage(
            lambda: [codec.encode_tensor(t.data, t.dtype, t.itemsize) for t in raw.values()],
            repeat,
        ),
        "write files (no fsync)": _stage(lambda: _write_files(folder, blobs, False), repeat),
        "write files + fsync each": _stage(lambda: _write_files(folder, blobs, True), repeat),
        "provenance (cwd not in git)": _stage(lambda: code_provenance(work), repeat),
        "provenance (cwd in a git repo)": _stage(
            lambda: code_provenance(Path(__file__).resolve().parent), repeat
        ),
    }
    reset(folder)
    return stages


def checkout_stages(work: Path, repeat: int) -> dict[str, float]:
    """Serial seconds of each step `adb checkout` takes on the whole adapter."""
    store = Store.open(work / "import-store")
    manifest = store.manifest_of("main")
    entries = list(manifest.tensors.values())
    paths = [store.objects.path(e.id) for e in entries]
    objects = [store.objects._read(e.id)[1:] for e in entries]  # the store's own framing
    sizes = [int(np.prod(e.shape, dtype=np.int64)) for e in entries]
    width = {e.dtype: TENSOR_DTYPES[e.dtype][0] for e in entries}

    def decode() -> list[np.ndarray]:
        return [
            codec.decode_tensor(h["planes"], fs, e.dtype, width[e.dtype], n)
            for (h, fs), e, n in zip(objects, entries, sizes, strict=True)
        ]

    joined = decode()
    raws = {
        str(i): RawTensor(e.dtype, (n,), d)
        for i, (e, n, d) in enumerate(zip(entries, sizes, joined, strict=True))
    }
    out = work / "stage-out.safetensors"
    stages = {
        "read object files": _stage(lambda: [p.read_bytes() for p in paths], repeat),
        "decode (codec 2: zstd + plane join)": _stage(decode, repeat),
        "sha256 verify": _stage(lambda: [hashlib.sha256(d).digest() for d in joined], repeat),
        "write safetensors (+ fsync)": _stage(lambda: write_safetensors(out, raws), repeat),
    }
    reset(out)
    return stages


def import_costs(repeat: int) -> dict[str, float]:
    """Fresh-process start-up: what every CLI call pays before touching a byte."""
    programs = {
        "python -c pass": "pass",
        "import adb CLI (app + verbs)": "import adapterdb.cli.app as a; a._register()",
        "import safetensors.torch (torch)": "import safetensors.torch",
    }
    return {
        label: time_command([PY, "-c", code], repeat, warmup=1).median
        for label, code in programs.items()
    }


# -- masks ------------------------------------------------------------------------------------


def entropy_bits(p: float) -> float:
    """Shannon entropy of a Bernoulli(p) bit: the lower bound on bits per mask element."""
    if p in (0.0, 1.0):
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def bench_mask(work: Path, n: int, density: float, repeat: int) -> dict[str, Any]:
    """Bits per parameter of one `put_mask` object, and its put/get times."""
    mask = np.random.default_rng(1).random(n) < density
    folder = work / f"mask-{density}"
    state: dict[str, ObjectStore] = {}

    def setup() -> None:
        state["objects"] = ObjectStore(reset(folder))

    put = time_call(lambda: state["objects"].put_mask(mask), repeat, setup=setup, warmup=1)
    objects = ObjectStore(reset(folder))
    oid = objects.put_mask(mask)
    get = time_call(lambda: objects.get_mask(oid), repeat, warmup=1)
    exact = bool(np.array_equal(objects.get_mask(oid), mask))
    nbytes = objects.size(oid)
    actual = float(mask.mean())
    reset(folder)
    return {
        "n": n,
        "density": actual,
        "object_bytes": nbytes,
        "bits_per_param": 8 * nbytes / n,
        "entropy_bits": entropy_bits(actual),
        "put": put.to_json(),
        "get": get.to_json(),
        "roundtrip_exact": exact,
    }


# -- report -----------------------------------------------------------------------------------


def checks(results: Mapping[str, Any], masks: Mapping[str, Any]) -> list[Check]:
    """The table: every target, CLI figures first, in-process figures beside them."""
    rows: list[Check] = []
    for name, (_, bytes_limit) in DTYPES.items():
        c, k = results[name]["commit"], results[name]["checkout"]
        rows += [
            Check(
                f"{name} commit: adb import (CLI)",
                c["cli"]["median"],
                c["cli_reference"]["median"],
                COMMIT_LIMIT,
            ),
            Check(
                f"{name} commit: put_adapter+commit / save_file",
                c["inprocess"]["median"],
                c["inprocess_reference"]["median"],
                COMMIT_LIMIT,
            ),
            Check(
                f"{name} commit: put_adapter+commit / save_file+fsync",
                c["inprocess"]["median"],
                c["inprocess_reference_fsync"]["median"],
                None,
            ),
            Check(
                f"{name} checkout: adb checkout (CLI)",
                k["cli"]["median"],
                k["cli_reference"]["median"],
                CHECKOUT_LIMIT,
            ),
            Check(
                f"{name} checkout: load_tensors+write / load_file",
                k["inprocess"]["median"],
                k["inprocess_reference"]["median"],
                CHECKOUT_LIMIT,
            ),
            Check(
                f"{name} checkout: load_tensors+write / load_file(pread)",
                k["inprocess"]["median"],
                k["inprocess_reference_eager"]["median"],
                None,
            ),
            Check(
                f"{name} bytes on disk",
                c["store_bytes"] / 1e6,
                c["safetensors_bytes"] / 1e6,
                bytes_limit,
                "MB",
            ),
        ]
    dense, sparse = masks["0.5"], masks["0.01"]
    rows += [
        Check(
            "mask 50%: bits/param (ref: 1 bit)",
            dense["bits_per_param"],
            1.0,
            DENSE_MASK_BITS,
            "bit",
        ),
        Check(
            "mask 1%: bits/param (ref: entropy)",
            sparse["bits_per_param"],
            sparse["entropy_bits"],
            SPARSE_MASK_FACTOR,
            "bit",
        ),
    ]
    return rows


def throughput_rows(results: Mapping[str, Any], memcpy: Mapping[str, Any]) -> list[list[str]]:
    """Each operation as MB/s and as a multiple of memcpy (pre-touched) of the same bytes."""
    rows = []
    for name in DTYPES:
        nbytes = results[name]["raw_bytes"]
        floor = memcpy[name]["warm"]["median"]
        timings = {
            "memcpy (destination pre-touched)": memcpy[name]["warm"],
            "memcpy (fresh destination: page faults)": memcpy[name]["fresh"],
            **{
                f"{step} {key}": timing
                for step in ("commit", "checkout")
                for key, timing in results[name][step].items()
                if isinstance(timing, dict) and "median" in timing
            },
        }
        for label, timing in timings.items():
            s = timing["median"]
            rows.append([f"{name} {label}", fmt(s), fmt(nbytes / s / 1e6), fmt(s / floor)])
    return rows


def mask_rows(masks: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            f"{m['density']:.4f}",
            f"{m['n']:,}",
            f"{m['object_bytes']:,}",
            fmt(m["bits_per_param"]),
            fmt(m["entropy_bits"]),
            fmt(m["put"]["median"]),
            fmt(m["get"]["median"]),
        ]
        for m in masks.values()
    ]


def breakdown_rows(breakdown: Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    return [
        [group, stage, fmt(seconds)]
        for group, stages in breakdown.items()
        for stage, seconds in stages.items()
    ]


def write_peft(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """The source PEFT folder, saved the way PEFT saves it (safetensors + config)."""
    folder.mkdir(parents=True)
    save_file(tensors, folder / WEIGHTS_FILE, metadata=META)
    (folder / CONFIG_FILE).write_text(json.dumps(gemma_like_config(), indent=2))
    return folder


def bench_dtype(work: Path, dtype: torch.dtype, layers: int, repeat: int) -> dict[str, Any]:
    tensors = gemma_like_lora(dtype, seed=0, layers=layers)
    peft = write_peft(work / "peft", tensors)
    result: dict[str, Any] = {
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "raw_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    result["commit"] = bench_commit(work, tensors, peft, repeat)
    result["checkout"] = bench_checkout(work, tensors, peft, repeat)
    result["breakdown"] = {
        "commit (serial)": commit_stages(work, peft, repeat),
        "checkout (serial)": checkout_stages(work, repeat),
    }
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-layer adapter, 1 repeat (smoke)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per figure (5)")
    parser.add_argument("--markdown", action="store_true", help="print tables as markdown")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (a temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 5)
    layers = QUICK_LAYERS if args.quick else LAYERS
    info = machine_info()
    print(describe_machine(info))
    print(f"load average at start: {info['loadavg_start']}")
    scratch = Path(tempfile.mkdtemp(prefix="adb-store-bench-", dir=args.workdir))
    try:
        results = {}
        for name, (dtype, _) in DTYPES.items():
            print(f"benchmarking {name} ...", flush=True)
            results[name] = bench_dtype(scratch / name, dtype, layers, repeat)
        n = results["fp32"]["parameters"]
        masks = {str(d): bench_mask(scratch, n, d, repeat) for d in (0.5, 0.01)}
        memcpy = {
            name: {
                "warm": memcpy_timing(results[name]["raw_bytes"], repeat).to_json(),
                "fresh": memcpy_timing(results[name]["raw_bytes"], repeat, fresh=True).to_json(),
            }
            for name in DTYPES
        }
        startup = import_costs(repeat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = checks(results, masks)
    breakdown = {f"{name} {k}": v for name in DTYPES for k, v in results[name]["breakdown"].items()}
    breakdown["process start-up"] = startup
    md = args.markdown
    print()
    print(format_table(CHECK_HEADERS, [r.row() for r in rows], md))
    print()
    print(
        format_table(
            ["operation", "median s", "MB/s", "x memcpy"], throughput_rows(results, memcpy), md
        )
    )
    print()
    print(format_table(MASK_HEADERS, mask_rows(masks), md))
    print()
    print(format_table(["where", "stage", "s"], breakdown_rows(breakdown), md))
    exact = {
        **{f"{n} checkout": results[n]["checkout"]["roundtrip_bit_exact"] for n in DTYPES},
        **{f"mask {d}": m["roundtrip_exact"] for d, m in masks.items()},
    }
    print(f"\nround trips bit-exact: {exact}")
    load_end = list(os.getloadavg())
    print(f"\nload average at end: {load_end}")
    doc = {
        "command": " ".join(["python", "bench/store_bench.py", *(argv or sys.argv[1:])]),
        "machine": {**info, "loadavg_end": load_end},
        "quick": args.quick,
        "repeat": repeat,
        "warmup": 1,
        "layers": layers,
        "page_cache": "warm: every file is read right after it is written; caches not dropped",
        "results": results,
        "masks": masks,
        "memcpy": memcpy,
        "startup": startup,
        "checks": [r.to_json() for r in rows],
        "roundtrip_exact": exact,
    }
    print(f"wrote {write_json('store_bench', doc)}")
    return 0 if all(exact.values()) and all(r.passed is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
