"""Remote benchmark (issue 14): adb push/clone through S3 against uploading safetensors files.

Against a local S3 server (moto's standalone server in its own process on 127.0.0.1), on the
Gemma-shaped LoRA (bench/shapes.py, `--layers` of its 18, fp32):
- a PAM history of `--steps` merges (each: an expert that starts as a copy of the global
  adapter plus a training-like update, committed, then `merge --method pam` into main), so
  the store holds 2 x steps adapter versions (experts and globals);
- a ConDU store of `--steps` tasks (one `merge --method condu` per task).
Each adb figure sits next to what a user does today, in the same run: boto3 `upload_file` of
each version's safetensors file, and `download_file` of one. Reported: bytes sent and
seconds for the initial push, the incremental push after one more merge, a full clone, a lazy
clone + checkout of one past expert, and `decouple` of one task from a lazy clone. Each time is
the median of `--repeat` runs, adb and boto3 alternating, in one warm process (client
start-up is counted on neither side); each adb push goes to a fresh prefix.

    python bench/remote_bench.py [--layers N] [--steps N] [--markdown]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from common import CHECK_HEADERS, Check, describe_machine, format_table, machine_info, write_json
from shapes import gemma_like_config, gemma_like_lora

from adapterdb.adapter import from_torch, to_torch, write_peft_raw
from adapterdb.storage import remote as rm
from adapterdb.storage.commits import Commit
from adapterdb.storage.store import Store
from adapterdb.trainers import merge as wf

PUSH_BYTES, PUSH_TIME, LAZY_TIME = 0.85, 1.5, 1.2  # the targets
INFO_ROWS = ("incremental push", "full clone", "lazy decouple of one task")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in its own process: the client's threads do not share its GIL."""
    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def raw(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: from_torch(v) for k, v in tensors.items()}


def trained_from(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """An expert that started as `base` and trained: every weight moved a little."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=gen) * 1e-3 for k, v in base.items()}


def commit_expert(store: Store, tensors: dict[str, torch.Tensor], task: str) -> str:
    manifest = store.put_adapter(raw(tensors), gemma_like_config())
    commit = Commit(manifest, "import", task=task, message=f"expert {task}")
    return store.commit(commit, ref=f"refs/experts/main/{task}")


def pam_step(store: Store, branch: str, task: str, seed: int, layers: int) -> None:
    """One continual step: an expert trained from the global adapter, merged with PAM."""
    if store.refs.read(f"refs/heads/{branch}") is None:
        base = gemma_like_lora(torch.float32, seed, layers)
    else:
        m = store.manifest_of(branch)
        base = {n: to_torch(r).clone() for n, r in store.iter_tensors(m)}
    expert = commit_expert(store, trained_from(base, seed), task)
    params = wf.parse_params("pam", [])
    wf.merge_into(store, branch, "pam", params, [expert], force=True)


def condu_step(store: Store, branch: str, task: str, seed: int, layers: int) -> None:
    expert = commit_expert(store, gemma_like_lora(torch.float32, seed, layers), task)
    wf.merge_into(store, branch, "condu", wf.parse_params("condu", []), [expert])


def version_files(store: Store, folder: Path) -> list[Path]:
    """Every adapter version main's history holds (experts and merged globals), as the
    safetensors file a user keeps of each."""
    files = []
    for oid, c in store.log("main"):
        out = folder / oid[:12]
        m = store.read_manifest(c.manifest)
        write_peft_raw(out, m.config, store.load_tensors(m))
        files.append(out / "adapter_model.safetensors")
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    info = machine_info()
    print(describe_machine(info))
    work = Path(tempfile.mkdtemp(prefix="adb-remote-bench-", dir=args.workdir))
    server, endpoint = start_moto()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        rows, doc = run(work, args.layers, args.steps, args.repeat)
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_table(CHECK_HEADERS, [r.row() for r in rows], args.markdown))
    print()
    print(format_table(["figure", "adb", "boto3 safetensors"], doc["table"], args.markdown))
    print()
    parts = [[k, f"{v:.3f}"] for k, v in doc["parts_s"].items()]
    print(format_table(["part", "s"], parts, args.markdown))
    doc["checks"] = [r.to_json() for r in rows]
    doc["machine"] = info
    print(f"\nwrote {write_json('remote_bench', doc)}")
    return 0


def paired(
    repeat: int, ours: Callable[[int], Any], theirs: Callable[[int], Any]
) -> tuple[float, float, Any]:
    """Median seconds of `ours(i)` and `theirs(i)`, run alternately (a load spike on this
    shared machine hits both sides), and the last result of ours."""
    a, b, out = [], [], None
    for i in range(repeat):
        t, out = timed(partial(ours, i))
        a.append(t)
        b.append(timed(partial(theirs, i))[0])
    return statistics.median(a), statistics.median(b), out


def run(work: Path, layers: int, steps: int, repeat: int) -> tuple[list[Check], dict[str, Any]]:
    import boto3

    s3 = boto3.client("s3")
    for bucket in ("adb", "files"):
        s3.create_bucket(Bucket=bucket)
    print(f"building a {steps}-merge PAM history and a {steps}-task ConDU store ...", flush=True)
    pam = Store.init(work / "pam")
    for t in range(steps):
        pam_step(pam, "main", f"t{t}", t, layers)
    condu = Store.init(work / "condu")
    for t in range(steps):
        condu_step(condu, "main", f"t{t}", 100 + t, layers)
    files = version_files(pam, work / "files")
    remotes = [rm.add_remote(pam, f"r{i}", f"s3://adb/pam{i}", None) for i in range(repeat)]
    main = ["refs/heads/main"]

    def upload(fs: list[Path], i: int) -> None:
        for f in fs:
            s3.upload_file(str(f), "files", f"v{i}/{f.parent.name}")

    print("pushing ...", flush=True)
    push_s, ref_up, push = paired(
        repeat, lambda i: rm.push(pam, remotes[i], main), lambda i: upload(files, i)
    )
    pam_step(pam, "main", f"t{steps}", steps, layers)
    old = {f.parent.name for f in files}
    new_files = [f for f in version_files(pam, work / "files2") if f.parent.name not in old]
    inc_s, ref_inc, inc = paired(
        repeat, lambda i: rm.push(pam, remotes[i], main), lambda i: upload(new_files, i)
    )

    print("cloning ...", flush=True)
    url = remotes[0].url

    def download_all(i: int) -> None:
        (work / f"dl{i}").mkdir()
        for f in [*files, *new_files]:
            s3.download_file("files", f"v{i}/{f.parent.name}", str(work / f"dl{i}" / f.name))

    clone_s, ref_all, (full_store, full, _) = paired(
        repeat, lambda i: rm.clone(url, work / f"full{i}", None, False), download_all
    )
    expert = pam.read_commit(pam.resolve("main~2")).parents[1]  # a PAM merge's expert
    one = work / "files" / expert[:12] / "adapter_model.safetensors"
    split: dict[str, list[float]] = {"lazy clone": [], "lazy clone (ConDU)": []}

    def lazy_checkout(i: int) -> int:
        t, (store, transfer, _) = timed(lambda: rm.clone(url, work / f"lazy{i}", None, True))
        split["lazy clone"].append(t)
        before = set(store.objects.ids())
        tensors = store.load_tensors(store.read_manifest(store.read_commit(expert).manifest))
        write_peft_raw(work / f"lazy-out{i}", {}, tensors)
        return transfer.bytes + sum(
            store.objects.size(o) for o in set(store.objects.ids()) - before
        )

    lazy_s, ref_one, lazy_bytes = paired(
        repeat,
        lazy_checkout,
        lambda i: s3.download_file("files", f"v{i}/{expert[:12]}", str(work / f"one{i}")),
    )
    local_checkout, _ = timed(
        lambda: full_store.load_tensors(
            full_store.read_manifest(full_store.read_commit(expert).manifest)
        )
    )

    print("ConDU decouple from a lazy clone ...", flush=True)
    curl = "s3://adb/condu"
    rm.push(condu, rm.add_remote(condu, "origin", curl, None), main)
    task_file = work / "task" / "adapter_model.safetensors"
    raw_task, cfg = wf.decouple_task(condu, "main", "t1")
    write_peft_raw(task_file.parent, cfg, raw_task)
    s3.upload_file(str(task_file), "files", "condu-t1")

    def lazy_decouple(i: int) -> int:
        t, (store, transfer, _) = timed(lambda: rm.clone(curl, work / f"lc{i}", None, True))
        split["lazy clone (ConDU)"].append(t)
        before = set(store.objects.ids())
        tensors, config = wf.decouple_task(store, "main", "t1")
        write_peft_raw(work / f"decoupled{i}", config, tensors)
        return transfer.bytes + sum(
            store.objects.size(o) for o in set(store.objects.ids()) - before
        )

    dec_s, ref_task, dec_bytes = paired(
        repeat,
        lazy_decouple,
        lambda i: s3.download_file("files", "condu-t1", str(work / f"task-dl{i}")),
    )
    local_decouple, _ = timed(lambda: wf.decouple_task(condu, "main", "t1"))
    parts = {k: statistics.median(v) for k, v in split.items()}
    parts["decode that expert from a full local store"] = local_checkout
    parts["decouple from the full ConDU store"] = local_decouple

    mib = 2**20
    up_bytes = sum(f.stat().st_size for f in files)
    new_bytes = sum(f.stat().st_size for f in new_files)
    rows = [
        Check("initial push bytes", push.bytes / mib, up_bytes / mib, PUSH_BYTES, "MiB"),
        Check("initial push time", push_s, ref_up, PUSH_TIME),
        Check("lazy clone + checkout one past expert", lazy_s, ref_one, LAZY_TIME),
        Check("incremental push time", inc_s, ref_inc, None),
        Check("full clone time", clone_s, ref_all, None),
        Check("lazy clone + decouple one task", dec_s, ref_task, None),
    ]
    table = [
        [
            "initial push",
            f"{push.bytes / mib:.1f} MiB, {push_s:.2f} s ({push.objects} objects)",
            f"{up_bytes / mib:.1f} MiB, {ref_up:.2f} s ({len(files)} files)",
        ],
        [
            "incremental push (one more merge)",
            f"{inc.bytes / mib:.1f} MiB, {inc_s:.2f} s ({inc.objects} objects)",
            f"{new_bytes / mib:.1f} MiB, {ref_inc:.2f} s ({len(new_files)} files)",
        ],
        [
            "full clone",
            f"{full.bytes / mib:.1f} MiB, {clone_s:.2f} s",
            f"{(up_bytes + new_bytes) / mib:.1f} MiB, {ref_all:.2f} s (all files)",
        ],
        [
            "lazy clone + checkout one past expert",
            f"{lazy_bytes / mib:.1f} MiB, {lazy_s:.2f} s",
            f"{one.stat().st_size / mib:.1f} MiB, {ref_one:.2f} s (one file)",
        ],
        [
            "lazy clone + decouple one ConDU task",
            f"{dec_bytes / mib:.1f} MiB, {dec_s:.2f} s",
            f"{task_file.stat().st_size / mib:.1f} MiB, {ref_task:.2f} s (that expert's file)",
        ],
    ]
    doc = {"layers": layers, "steps": steps, "repeat": repeat, "versions": len(files)}
    return rows, {**doc, "table": table, "parts_s": parts}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="Gemma layers of 18 (2)")
    parser.add_argument("--steps", type=int, default=10, help="PAM merges / ConDU tasks (10)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, median (3)")
    parser.add_argument("--markdown", action="store_true", help="print tables as markdown")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (a temp dir)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
