"""Hypothesis inputs for the whole-layer methods (opcm, continual TA/TIES): T LoRA terms of one
layer with several ranks, out ≠ in, fp32/bf16 factors, zero and repeated updates."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from adapterdb.merging.layers import LAYER_METHODS, LowRank, Term
from adapterdb.merging.registry import Params
from adapterdb.trainers.continual import fold


@st.composite
def layer_terms(draw: st.DrawFn, max_tasks: int = 6) -> list[Term]:
    """1…max_tasks terms of one (out × in) layer: each random, zero, or the previous one
    again; factors rounded to fp32 or bf16 (the methods read them in float64)."""
    out, inp = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    rank = draw(st.sampled_from([1, 2, 4]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    terms: list[Term] = []
    for _ in range(draw(st.integers(1, max_tasks))):
        kind = draw(st.sampled_from(["random", "random", "zero", "repeat"]))
        if kind == "repeat" and terms:
            terms.append(terms[-1])
            continue
        a = torch.randn(rank, inp, generator=gen).to(dtype)
        b = torch.randn(out, rank, generator=gen).to(dtype)
        if kind == "zero":
            b = torch.zeros_like(b)
        terms.append(Term(a, b, draw(st.sampled_from([0.5, 1.0, 2.0]))))
    return terms


def fold_all(name: str, params: Params, terms: list[Term]) -> LowRank:
    """The method's merge of all terms, folded in order as the workflow does."""
    return fold(LAYER_METHODS[name], params, None, 0, terms)[0]
