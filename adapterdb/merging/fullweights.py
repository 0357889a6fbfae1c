"""How every merge method treats the tensors that are not task vectors.

`adapterdb.tensorkinds` sorts an adapter's tensors into LoRA factors (task-vector parts) and
values: full weights (`modules_to_save` copies such as a classifier head, saved biases,
trainable-token rows) and DoRA magnitudes. Methods are defined on task vectors only; applied
to a value they produce garbage (TIES zeroes 80% of a head, a 0 magnitude switches a layer
off, λ·W scales a weight instead of a change). The rule, per method:

- LoRA factors: the method as defined (unchanged).
- Full weights and DoRA magnitudes: merged as weights, the weighted mean Σ_t w_t x_t / Σ_t w_t
  with the method's own task weights (`weights=`, equal when not given; `average` with
  `running=true`: its (t−1, 1)), for every method except `finetune`, whose result is the last
  source's value as for every other tensor (sequential fine-tuning keeps the last head).
  λ, density, seed, elect, trim, k, mask_lambda and scale shape task vectors only and do not
  apply. Weights must be non-negative with a positive sum for a mean; otherwise the merge is
  refused (a negative weight, task negation, has no meaning for a weight). ConDU (`emr`) stores
  no trigger mask for these tensors: the unified tensor is the mean and `adb decouple` gives
  every task that mean (ConDU's continual step then makes it the running mean over tasks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from adapterdb.errors import AdbError
from adapterdb.merging.basic import weight_list, weighted_sum
from adapterdb.merging.registry import NO_CONTEXT, Context, Params, check_tensors
from adapterdb.tensorkinds import Kind

LAST_SOURCE = frozenset({"finetune"})


def value_weights(method: str, p: Params, count: int, name: str = "") -> list[float]:
    """The normalised mean weights a method gives `count` sources of a full weight (see the
    module doc); AdbError where they cannot make a mean."""
    if method in LAST_SOURCE:
        return [0.0] * (count - 1) + [1.0]
    if getattr(p, "running", False):
        w = [getattr(p, "step", 2) - 1.0, 1.0]
    else:
        w = weight_list(getattr(p, "weights", None), count, name)
    total = math.fsum(w)
    if any(v < 0 for v in w) or not total > 0:
        raise AdbError(
            f"{method}: tensor {name!r} is a weight, not a task vector, so it is merged as the "
            f"weights' mean; weights={w} cannot make one: pass non-negative weights with a "
            "positive sum"
        )
    return [v / total for v in w]


def merge_values(
    method: str,
    tensors: Sequence[torch.Tensor],
    p: Params,
    kind: Kind = Kind.FULL,
    ctx: Context = NO_CONTEXT,
) -> torch.Tensor:
    """Merge the T sources of one full weight or DoRA magnitude by the rule of the module doc."""
    if kind.is_delta:
        raise ValueError(f"tensor {ctx.name!r} is a {kind.value}; merge it with the method")
    check_tensors(tensors, ctx.name)
    w = value_weights(method, p, len(tensors), ctx.name)
    if w[-1] == 1.0 and not any(w[:-1]):
        return tensors[-1].clone() if ctx.out is None else ctx.out.copy_(tensors[-1])
    return weighted_sum(tensors, w, ctx.out)
