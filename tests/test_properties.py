"""Hypothesis properties of OMP on Gram matrices of random per-example gradients."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hf_sbp.selection import gradient_match_error, omp_gram

finite = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def gradient_problems(draw):
    n = draw(st.integers(1, 12))
    dim = draw(st.integers(1, 15))
    G = draw(arrays(np.float64, (n, dim), elements=finite))
    k = draw(st.integers(1, n + 2))
    ridge = draw(st.sampled_from([0.0, 1e-6, 0.1]))
    return G, k, ridge


@settings(max_examples=300, deadline=None)
@given(gradient_problems(), st.booleans())
def test_omp_invariants(problem, nonnegative):
    G, k, ridge = problem
    result = omp_gram(torch.from_numpy(G @ G.T), k, ridge=ridge, nonnegative=nonnegative, tol=None)
    idx = result.indices.tolist()
    assert len(idx) == len(set(idx)), "indices are distinct"
    assert len(idx) <= k, "at most k atoms"
    assert all(0 <= i < G.shape[0] for i in idx)
    assert result.weights.shape == result.indices.shape
    assert torch.isfinite(result.weights).all()
    if nonnegative:
        assert (result.weights >= 0).all(), "weights are non-negative"
    scale = 1e-9 * max(1.0, result.residuals[0])
    assert all(b <= a + scale for a, b in zip(result.residuals, result.residuals[1:], strict=False)), (
        "the residual never increases"
    )


@settings(max_examples=200, deadline=None)
@given(gradient_problems())
def test_match_error_of_the_omp_subset_never_exceeds_the_empty_start(problem):
    G, k, _ = problem
    K = torch.from_numpy(G @ G.T)
    result = omp_gram(K, k, tol=None)
    if result.indices.numel() == 0:
        return
    # The relative error of the (unnormalised) OMP fit is the last residual over ||gbar||; the
    # normalised match error is finite and non-negative whenever the weights are positive.
    error = gradient_match_error(K, result.indices, result.weights)
    assert torch.isnan(error) or error >= 0
    mean = G.mean(0)
    explicit = np.linalg.norm(G[result.indices.numpy()].T @ result.weights.numpy() - mean)
    assert explicit <= np.linalg.norm(mean) * (1 + 1e-9) + 1e-9
