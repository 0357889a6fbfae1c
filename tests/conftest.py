"""Shared fixtures: tiny PEFT folders (torch-free), the real `adb` console script, a store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from adapterdb.adapter import write_peft_raw
from adapterdb.storage.store import STORE_DIR, Store
from adapterdb.tensorfile import RawTensor


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread per test: tiny models gain nothing from a second thread, and on a busy
    2-core machine it costs up to 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def adb_executable() -> str:
    """The installed `adb` console script: next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "adb"
    found = str(beside) if beside.is_file() else shutil.which("adb")
    if not found:
        raise RuntimeError("the `adb` console script is not installed; run `pip install -e .`")
    return found


ADB = adb_executable()


def adb_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an `adb` subprocess.

    ADB_STORE from the caller's environment is dropped so that a test only ever sees the store
    it names; a wide COLUMNS keeps rich from wrapping table rows.
    """
    full = {k: v for k, v in os.environ.items() if k != "ADB_STORE"}
    full.update({"COLUMNS": "200", "ADB_AUTHOR": "tester", **(env or {})})
    return full


def run_adb(
    args: Sequence[str], cwd: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    """Run the real `adb` script as a subprocess; (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [ADB, *args], cwd=cwd, env=adb_env(env), capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stdout, proc.stderr


def to_raw(values: np.ndarray, dtype: str) -> RawTensor:
    """float32 values as a RawTensor of safetensors dtype F32, F16 or BF16 (truncated)."""
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F32":
        bits = f32.view(np.uint8)
    elif dtype == "F16":
        bits = f32.astype(np.float16).view(np.uint8)
    elif dtype == "BF16":
        bits = (f32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raise ValueError(dtype)
    return RawTensor(dtype, tuple(f32.shape), bits.reshape(-1))


def lora_tensors(
    seed: int = 0,
    dtype: str = "F32",
    rank: int = 2,
    linear: Sequence[tuple[str, int, int]] = (("lin", 6, 5),),
    conv: Sequence[tuple[str, int, int]] = (("conv", 3, 4),),
) -> dict[str, RawTensor]:
    """LoRA factors: Linear A (r, in) / B (out, r), Conv A (r, in, 3, 3) / B (out, r, 1, 1)."""
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, d_in, d_out in linear:
        shapes[f"base_model.model.{name}.lora_A.weight"] = (rank, d_in)
        shapes[f"base_model.model.{name}.lora_B.weight"] = (d_out, rank)
    for name, c_in, c_out in conv:
        shapes[f"base_model.model.{name}.lora_A.weight"] = (rank, c_in, 3, 3)
        shapes[f"base_model.model.{name}.lora_B.weight"] = (c_out, rank, 1, 1)
    return {k: to_raw(rng.standard_normal(s) * 0.1, dtype) for k, s in shapes.items()}


def peft_config(rank: int = 2, modules: Sequence[str] = ("lin", "conv")) -> dict[str, object]:
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(modules),
        "base_model_name_or_path": "tiny-test-model",
    }


def make_peft(path: Path, seed: int = 0, dtype: str = "F32", **shape_kw: object) -> Path:
    """Write a tiny PEFT folder (Linear + Conv LoRA) and return it."""
    tensors = lora_tensors(seed, dtype, **shape_kw)  # type: ignore[arg-type]
    modules = sorted({k.split(".")[2] for k in tensors})
    return write_peft_raw(path, peft_config(int(shape_kw.get("rank", 2)), modules), tensors)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: compare before/after to prove nothing changed."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def one_error_line(rc: int, err: str) -> str:
    """The CLI's answer to bad input: exit != 0, no traceback, exactly one `error:` line."""
    assert rc != 0 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def peft_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: peft_dir(name, seed=0, dtype="F32", rank=2, linear=..., conv=...) -> folder."""

    def factory(name: str = "adapter", seed: int = 0, dtype: str = "F32", **kw: object) -> Path:
        return make_peft(tmp_path / name, seed, dtype, **kw)

    return factory


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A folder holding an initialised (empty) store in `.adb`."""
    folder = tmp_path / "repo"
    folder.mkdir()
    Store.init(folder)
    return folder


@pytest.fixture
def store(repo: Path) -> Store:
    return Store.open(repo / STORE_DIR)
