"""OPCM on LoRA factors against a dense float64 transcription of FusionBench's loop
(`subspace_reference.opcm`), a hand-computed 2×2 case, and its parameter checks."""

from __future__ import annotations

import math

import pytest
import subspace_reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_strategies import fold_all, layer_terms

from adapterdb.errors import AdbError
from adapterdb.merging import registry
from adapterdb.merging.layers import Term
from adapterdb.merging.opcm import OpcmParams, term_norm

# Both sides are float64 on the same rounded factors; they differ only by QR/SVD rounding
# (~1e-15 relative), amplified by how close two singular values are. 1e-9 of the largest
# norm involved leaves that room, while a wrong projection or scale is off by O(1).
TOL = 1e-9


@settings(max_examples=40, deadline=None)
@given(terms=layer_terms(), alpha=st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]))
def test_opcm_matches_dense_fusionbench_loop(terms: list[Term], alpha: float) -> None:
    got = fold_all("opcm", OpcmParams(alpha=alpha), terms).dense()
    want = ref.opcm([t.dense() for t in terms], alpha)
    scale = max(1.0, *(float(t.dense().norm()) for t in terms))
    assert torch.allclose(got, want, rtol=0, atol=TOL * scale), float((got - want).abs().max())


def test_opcm_two_by_two_by_hand() -> None:
    """τ_1 = diag(3, 1), τ_2 = [[1, 2], [3, 4]]: split is 0 (3/4 > 0.5 at once), so only the
    diagonal of τ_2 goes: S_2 = [[3, 2], [3, 1]], rescaled to (√10 + √30)/2 over ‖S_2‖ = √23."""
    eye = torch.eye(2)
    t1 = Term(eye, torch.diag(torch.tensor([3.0, 1.0])), 1.0)
    t2 = Term(eye, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 1.0)
    got = fold_all("opcm", OpcmParams(), [t1, t2]).dense()
    want = torch.tensor([[3.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    want *= (math.sqrt(10) + math.sqrt(30)) / 2 / math.sqrt(23)
    assert torch.allclose(got, want, atol=1e-12)


def test_opcm_keeps_first_task_and_drops_a_repeated_one() -> None:
    """Task 1 is the merge as it is; the same update again lies wholly on the merge's
    diagonal, so it adds nothing and the rescale (mean norm = its norm) keeps the merge."""
    gen = torch.Generator().manual_seed(0)
    t = Term(torch.randn(2, 5, generator=gen), torch.randn(4, 2, generator=gen), 2.0)
    assert torch.allclose(fold_all("opcm", OpcmParams(), [t]).dense(), t.dense(), atol=1e-12)
    assert torch.allclose(fold_all("opcm", OpcmParams(), [t, t]).dense(), t.dense(), atol=1e-12)


def test_term_norm_from_factors() -> None:
    gen = torch.Generator().manual_seed(1)
    t = Term(torch.randn(3, 7, generator=gen), torch.randn(5, 3, generator=gen), 0.5)
    assert term_norm(t) == pytest.approx(float(t.dense().norm()), rel=1e-12)


def test_opcm_is_registered_with_checked_params() -> None:
    assert "opcm" in registry.methods()
    assert registry.parse_params("opcm", ["alpha=0.25"]) == OpcmParams(alpha=0.25)
    with pytest.raises(AdbError, match=r"^opcm: alpha=1.5 must be in \[0, 1\]"):
        registry.parse_params("opcm", ["alpha=1.5"])
    with pytest.raises(AdbError, match="merges whole LoRA layers"):
        registry.merge_adapters("opcm", [{"x": torch.zeros(2)}])
