"""Hypothesis over the numerical core with adversarial inputs: rank-deficient Gram matrices, scales from
1e-30 to 1e30, duplicated rows, zero rows, an all-zero matrix.

For any valid positive semi-definite input the core must not raise, and must never return NaN, negative
weights (non-negative OMP) or a repeated index. Where a reference exists it is computed independently
from explicit per-example gradient vectors in float64, not from the Gram matrix the code uses.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_sbp.core.omp import normalize_weights, omp_gram
from hf_sbp.core.selection import gradient_match_error, last_layer_gram

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def gradient_sets(draw, max_n: int = 12):
    """Explicit per-example gradient vectors ``G`` (n, p) in float64 with adversarial structure."""
    n = draw(st.integers(1, max_n))
    rank = draw(st.integers(0, min(n, 6)))  # rank 0: every gradient is zero
    p = draw(st.integers(max(rank, 1), 8))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((max(rank, 1), p)) if rank else np.zeros((1, p))
    coefficients = rng.standard_normal((n, max(rank, 1)))
    if draw(st.booleans()):
        coefficients = np.abs(coefficients)  # all gradients in one cone: the mean is large
    G = coefficients @ basis
    structure = draw(st.sampled_from(["plain", "duplicates", "zero rows", "row scales", "one outlier"]))
    if structure == "duplicates" and n > 1:
        source = rng.integers(0, n, size=n)
        copy = rng.random(n) < 0.5
        G[copy] = G[source[copy]]
    elif structure == "zero rows":
        G[rng.random(n) < 0.4] = 0.0
    elif structure == "row scales":
        G *= 10.0 ** rng.uniform(-6, 6, size=(n, 1))
    elif structure == "one outlier":
        G[rng.integers(0, n)] *= 1e8
    exponent = draw(st.integers(-15, 15))  # the Gram matrix then spans 1e-30 .. 1e30
    return G * 10.0**exponent


def objective(G: np.ndarray, indices: torch.Tensor, weights: torch.Tensor) -> float:
    """``||sum_S w_i g_i - gbar||`` from the explicit gradients."""
    target = G.mean(axis=0)
    approx = weights.numpy() @ G[indices.numpy()] if indices.numel() else np.zeros_like(target)
    return float(np.linalg.norm(approx - target))


def check_subset(indices: torch.Tensor, weights: torch.Tensor, n: int, k: int, nonnegative: bool) -> None:
    assert indices.dtype == torch.long and indices.shape == weights.shape
    assert indices.numel() <= k
    assert indices.unique().numel() == indices.numel(), f"repeated index in {indices.tolist()}"
    assert bool(((indices >= 0) & (indices < n)).all())
    assert bool(torch.isfinite(weights).all()), f"non-finite weights {weights.tolist()}"
    if nonnegative:
        assert bool((weights >= 0).all()), f"negative weights {weights.tolist()}"


@FUZZ
@given(
    G=gradient_sets(),
    k_fraction=st.floats(0.05, 1.5),
    nonnegative=st.booleans(),
    ridge=st.sampled_from([0, 1e-3, 0.1]),
    tol=st.sampled_from([None, 1e-4]),
)
def test_omp_on_adversarial_gram(G, k_fraction, nonnegative, ridge, tol):
    n = G.shape[0]
    k = max(1, round(k_fraction * n))  # k > n asks for more atoms than there are
    K = torch.from_numpy(G @ G.T)
    scale = float(K.diagonal().mean())
    result = omp_gram(K, k, ridge=ridge * scale, nonnegative=nonnegative, tol=tol)
    check_subset(result.indices, result.weights, n, k, nonnegative)
    assert all(math.isfinite(r) and r >= 0 for r in result.residuals)
    assert all(b <= a * (1 + 1e-6) + 1e-12 * math.sqrt(scale) for a, b in itertools.pairwise(result.residuals))
    # Never worse than choosing nothing, measured on the explicit gradients.
    target_norm = float(np.linalg.norm(G.mean(axis=0)))
    assert objective(G, result.indices, result.weights) <= target_norm * (1 + 1e-6) + 1e-9 * math.sqrt(scale)


@FUZZ
@given(G=gradient_sets(max_n=8))
def test_nonnegative_omp_with_k_equal_n_solves_nnls(G):
    """With k = n and no ridge, non-negative OMP is Lawson-Hanson NNLS: compare with scipy's NNLS."""
    from scipy.optimize import nnls

    n = G.shape[0]
    norm = float(np.abs(G).max())
    if norm == 0:
        result = omp_gram(torch.zeros(n, n, dtype=torch.float64), n, tol=None)
        assert result.indices.numel() == 0
        return
    Gs = G / norm  # scipy works in absolute tolerances: give it unit scale
    K = torch.from_numpy(G @ G.T)
    result = omp_gram(K, n, tol=None)
    check_subset(result.indices, result.weights, n, n, True)
    _, best = nnls(Gs.T, Gs.mean(axis=0))
    ours = objective(Gs, result.indices, result.weights)
    assert ours <= best + 1e-6 * (1 + float(np.linalg.norm(Gs.mean(axis=0))))


@FUZZ
@given(G=gradient_sets(), data=st.data())
def test_gradient_match_error_against_explicit_gradients(G, data):
    n = G.shape[0]
    m = data.draw(st.integers(1, n))
    indices = torch.tensor(data.draw(st.permutations(range(n)))[:m])
    weights = torch.tensor(data.draw(st.lists(st.floats(0.0, 10.0), min_size=m, max_size=m)), dtype=torch.float64)
    K = torch.from_numpy(G @ G.T)
    error = float(gradient_match_error(K, indices, weights))
    target = G.mean(axis=0)
    target_norm = float(np.linalg.norm(target))
    total = float(weights.sum())
    scale = float(np.abs(G).max()) if G.size else 0.0
    if total <= 0:
        assert math.isnan(error), "documented: undefined when the weights sum to zero"
        return
    if target_norm <= 1e-7 * scale:
        # The mean is zero or lost in the round-off of K: undefined (NaN) or some finite value, never infinite.
        assert math.isnan(error) or math.isfinite(error)
        return
    assert math.isfinite(error) and error >= 0
    reference = objective(G, indices, weights / total) / target_norm
    # K carries round-off of order 1e-16 * |g|^2, so the error is known to sqrt(1e-16) * |g| / |gbar|.
    assert abs(error - reference) <= 1e-6 * (1 + reference) + 1e-7 * scale / target_norm


@FUZZ
@given(
    n=st.integers(1, 10),
    classes=st.integers(1, 5),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    r_exp=st.integers(-8, 8),
    h_exp=st.integers(-8, 8),
    structure=st.sampled_from(["plain", "duplicates", "zero residuals", "zero features"]),
)
def test_last_layer_gram_against_explicit_gradients(n, classes, d, seed, r_exp, h_exp, structure):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((n, classes)) * 10.0**r_exp
    h = rng.standard_normal((n, d)) * 10.0**h_exp
    if structure == "duplicates":
        r[n // 2 :], h[n // 2 :] = r[: n - n // 2], h[: n - n // 2]
    elif structure == "zero residuals":
        r[rng.random(n) < 0.5] = 0.0
    elif structure == "zero features":
        h[:] = 0.0
    K = last_layer_gram(torch.tensor(r, dtype=torch.float32), torch.tensor(h, dtype=torch.float32))
    assert K.dtype == torch.float32 and K.shape == (n, n)
    assert bool(torch.isfinite(K).all())
    # Reference: explicit per-example gradients [r_i h_i^T, r_i] of the (rounded) float32 inputs.
    r32, h32 = r.astype(np.float32).astype(np.float64), h.astype(np.float32).astype(np.float64)
    G = np.concatenate([(r32[:, :, None] * h32[:, None, :]).reshape(n, -1), r32], axis=1)
    reference = G @ G.T
    peak = float(np.abs(reference).max())
    assert np.allclose(K.double().numpy(), reference, rtol=1e-5, atol=1e-5 * peak)
    assert torch.allclose(K, K.T, rtol=1e-6, atol=1e-6 * peak)
    if peak > 0:
        assert float(np.linalg.eigvalsh(K.double().numpy()).min()) >= -1e-4 * peak


@st.composite
def weight_vectors(draw):
    """Non-negative finite weights spanning the dtype's whole range, denormals included, and zeros."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    tiny, huge = (1e-45, 3e38) if dtype == torch.float32 else (5e-324, 1e308)
    magnitude = st.floats(tiny, huge, allow_nan=False, allow_infinity=False)
    values = draw(st.lists(st.one_of(st.just(0.0), magnitude), min_size=1, max_size=12))
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@FUZZ
@given(weights=weight_vectors())
def test_normalize_weights_on_extreme_magnitudes(weights):
    assert bool(torch.isfinite(weights).all())
    m = weights.numel()
    out = normalize_weights(weights, "subset_size")
    assert out.dtype == weights.dtype and out.shape == weights.shape
    assert bool(torch.isfinite(out).all()) and bool((out >= 0).all())
    assert math.isclose(float(out.double().sum()), m, rel_tol=1e-5)
    positive = weights > 0
    if bool(positive.any()):
        # Proportions are kept: zero stays zero, and the ratio of any two positive weights is unchanged
        # (compared in float64 on the values as given; float32 outputs may round the tiniest to zero).
        assert bool((out[~positive] == 0).all())
        w = weights.double()
        top = int(torch.argmax(w))
        expected = w / w[top] * float(out.double()[top])
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, torch.ones_like(weights))  # documented: all ones when they sum to zero


@FUZZ
@given(size=st.integers(2, 12), j_fraction=st.floats(0.0, 0.999), seed=st.integers(0, 2**31 - 1))
def test_cholesky_delete_against_refactorising(size, j_fraction, seed):
    """OMP drops atoms from its Cholesky factor in place; the result must be the factor of the reduced matrix, and the
    forward solution ``z = L^-1 b`` it carries must become that of the reduced factor and right-hand side."""
    from hf_sbp.core.omp_loop import _cholesky_delete

    rng = np.random.default_rng(seed)
    B = rng.standard_normal((size, size + 2))
    A = B @ B.T + 1e-3 * np.eye(size)
    b = rng.standard_normal(size)
    j = int(j_fraction * size)
    L = np.linalg.cholesky(A)
    Lt = np.zeros((size + 1, size + 1))  # the factor transposed, in a larger buffer, as OMP keeps it
    Lt[:size, :size] = L.T
    z = np.zeros(size + 1)
    z[:size] = np.linalg.solve(L, b)
    _cholesky_delete(Lt, size, j, z)
    reduced_L = np.linalg.cholesky(np.delete(np.delete(A, j, axis=0), j, axis=1))
    np.testing.assert_allclose(Lt[: size - 1, : size - 1], reduced_L.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(z[: size - 1], np.linalg.solve(reduced_L, np.delete(b, j)), rtol=1e-8, atol=1e-10)
    assert not Lt[size - 1 :, :].any() and not Lt[:, size - 1 :].any() and not z[size - 1 :].any()


@FUZZ
@given(
    n=st.integers(1, 6),
    scale_r=st.integers(-20, 20),
    scale_h=st.integers(-20, 25),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_gram_cannot_overflow_only_when_the_gram_is_finite(n, scale_r, scale_h, bias, seed):
    """The trainer skips checking the Gram matrix when this bound holds: it must never hold for an overflowing one."""
    from hf_sbp.core.selection import gram_cannot_overflow

    rng = np.random.default_rng(seed)
    residuals = torch.from_numpy(rng.standard_normal((n, 3)) * 10.0**scale_r).float()
    features = torch.from_numpy(rng.standard_normal((n, 8)) * 10.0**scale_h).float()
    if not (bool(torch.isfinite(residuals).all()) and bool(torch.isfinite(features).all())):
        return
    if gram_cannot_overflow(residuals, features, bias):
        assert bool(torch.isfinite(last_layer_gram(residuals, features, bias=bias)).all())
