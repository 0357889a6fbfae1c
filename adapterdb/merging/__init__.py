"""Merge methods as pure functions on tensors, behind a registry (see `registry`).

Importing this package registers every method: average, finetune, task_arithmetic, ties,
dare, dare_ties, magmax, tall, emr. ConDU's streaming unify/decouple lives in `condu`; how
every method treats tensors that are not task vectors (full weights, DoRA magnitudes) in
`fullweights`.
"""

from adapterdb.merging import (  # continual, dop, iso, knots, opcm, tsv: whole-layer (`layers`)
    basic,
    condu,
    continual,
    dare,
    dop,
    iso,
    knots,
    magmax,
    opcm,
    tall,
    ties,
    tsv,
)
from adapterdb.merging.condu import Unifier, continual_unify, decouple
from adapterdb.merging.registry import (
    Context,
    Method,
    Params,
    check_sources,
    check_tensors,
    get,
    merge_adapters,
    methods,
    parse_params,
    register,
)
from adapterdb.merging.tall import tall_experts, tall_masks

__all__ = [
    "Context",
    "Method",
    "Params",
    "Unifier",
    "basic",
    "check_sources",
    "check_tensors",
    "condu",
    "continual",
    "continual_unify",
    "dare",
    "decouple",
    "dop",
    "get",
    "iso",
    "knots",
    "magmax",
    "merge_adapters",
    "methods",
    "opcm",
    "parse_params",
    "register",
    "tall",
    "tall_experts",
    "tall_masks",
    "ties",
    "tsv",
]
