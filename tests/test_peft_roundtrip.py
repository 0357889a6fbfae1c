"""PEFT -> `adb import` -> `adb checkout` -> PEFT: bit-identical LoRA factors, equal outputs."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from conftest import run_adb

from adapterdb.adapter import WEIGHTS_FILE
from adapterdb.storage.store import Store
from adapterdb.tensorfile import read_safetensors


class TinyNet(torch.nn.Module):
    """A Conv2d feeding a Linear: LoRA on both gives 4-D and 2-D factors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.lin = torch.nn.Linear(4 * 5 * 5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.conv(x)).flatten(1))


def base_model(dtype: torch.dtype) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().to(dtype).eval()


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peft_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    config = peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["conv", "lin"], init_lora_weights=False
    )
    torch.manual_seed(1)
    original = peft.get_peft_model(base_model(dtype), config, autocast_adapter_dtype=False)
    original.eval()
    source, out = tmp_path / "source", tmp_path / "out"
    original.save_pretrained(source)
    Store.init(tmp_path)

    rc, _, err = run_adb(["import", str(source), "--task", "tiny"], tmp_path)
    assert rc == 0, err
    rc, _, err = run_adb(["checkout", "HEAD", "-o", str(out)], tmp_path)
    assert rc == 0, err

    saved, _ = read_safetensors(source / WEIGHTS_FILE)
    written, _ = read_safetensors(out / WEIGHTS_FILE)
    assert {k: (v.dtype, v.shape, v.data.tobytes()) for k, v in written.items()} == {
        k: (v.dtype, v.shape, v.data.tobytes()) for k, v in saved.items()
    }
    shapes = {len(v.shape) for v in saved.values()}
    assert shapes == {2, 4}  # Linear and Conv LoRA both went through

    loaded = peft.PeftModel.from_pretrained(
        base_model(dtype), out, autocast_adapter_dtype=False
    ).eval()
    want, got = lora_state(original), lora_state(loaded)
    assert sorted(got) == sorted(want) and len(want) == 4
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype == dtype, name
        assert torch.equal(got[name], tensor), name
    assert any(bool(t.abs().sum()) for k, t in want.items() if "lora_B" in k)  # B != 0
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        y_original, y_loaded, y_base = original(x), loaded(x), base_model(dtype)(x)
    assert torch.equal(y_loaded, y_original)
    assert not torch.equal(y_loaded, y_base)  # the adapter really changes the output
