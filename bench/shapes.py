"""Realistic adapter shapes for benchmarks: a Gemma-2B-like LoRA (r=32, all linear modules).

Gemma-2B: 18 layers, hidden 2048, 8 query heads x 256, one KV head (k/v out 256),
MLP intermediate 16384. LoRA r=32 on q,k,v,o,gate,up,down is 39,223,296 parameters,
the size the PAM paper trains (PaliGemma's language model).
"""

from __future__ import annotations

import math
from typing import Any

import torch

HIDDEN, INTERMEDIATE, KV_OUT, LAYERS, RANK = 2048, 16384, 256, 18, 32
MODULES: dict[str, tuple[str, int, int]] = {  # module -> (parent, in_features, out_features)
    "q_proj": ("self_attn", HIDDEN, HIDDEN),
    "k_proj": ("self_attn", HIDDEN, KV_OUT),
    "v_proj": ("self_attn", HIDDEN, KV_OUT),
    "o_proj": ("self_attn", HIDDEN, HIDDEN),
    "gate_proj": ("mlp", HIDDEN, INTERMEDIATE),
    "up_proj": ("mlp", HIDDEN, INTERMEDIATE),
    "down_proj": ("mlp", INTERMEDIATE, HIDDEN),
}


def gemma_like_lora(
    dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = LAYERS
) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA factors: A kaiming-uniform (PEFT's init), B small normal (as if trained)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for module, (parent, fan_in, fan_out) in MODULES.items():
            prefix = f"base_model.model.model.layers.{i}.{parent}.{module}"
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) as PEFT uses
            a = torch.rand(RANK, fan_in, generator=gen) * (2 * bound) - bound
            b = torch.randn(fan_out, RANK, generator=gen) * 1e-3
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = b.to(dtype)
    return tensors


def gemma_like_config() -> dict[str, Any]:
    """The PEFT `adapter_config.json` content matching `gemma_like_lora`."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "google/gemma-2b",
        "r": RANK,
        "lora_alpha": RANK,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(MODULES),
    }
