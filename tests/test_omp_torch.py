"""The torch OMP loop (:mod:`hf_sbp.core.omp_torch`) against the compiled one (:mod:`hf_sbp.core.omp_loop`), on the CPU.

Both run one algorithm, so on every input they must choose the same atoms in the same order, with the same weights
and residuals up to rounding (the torch loop refactorises ``K_SS`` every step where the compiled one updates its
factor), and raise the same errors. The inputs are adversarial: rank-deficient, duplicated and zero columns, exact
ties, near-singular, the scales of test_fuzz.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz import FUZZ, gradient_sets
from torch.utils._python_dispatch import TorchDispatchMode

from hf_sbp.core import omp_torch
from hf_sbp.core.omp import OMP_IMPLS, omp_gram, resolve_omp_impl
from hf_sbp.core.selection import mean_gradient_target


def assert_same_result(K: torch.Tensor, k: int, elementwise: bool = True, **options) -> None:
    """``omp_gram`` with ``impl='numba'`` and ``impl='torch'`` agree: atoms, weights and residuals.

    The weights agree in what they fit: ``||sum_S (w_torch - w_numba)_i g_i|| <= 1e-6 ||target||``, i.e.
    ``d^T K_SS d`` from ``K``. With ``elementwise`` each weight also agrees to rounding (relative to the largest); an
    atom whose gradient is many orders of magnitude shorter than the target has a weight set by a cancellation in
    its correlation, which the two loops round differently (the fuzzed row scales of 1e-6 to 1e6 make such atoms).
    """
    numba = omp_gram(K, k, impl="numba", **options)
    torch_ = omp_gram(K, k, impl="torch", **options)
    assert torch_.indices.dtype == torch.long and torch_.weights.dtype == torch.float64
    assert torch_.indices.tolist() == numba.indices.tolist(), options
    idx = numba.indices.cpu()
    K_SS = K.cpu().double()[idx[:, None], idx]
    gap = (torch_.weights - numba.weights).cpu()
    target_sq = options.get("target_sq_norm", float(K.double().mean()))
    assert float(gap @ K_SS @ gap) <= 1e-12 * max(float(target_sq), 1e-300) + 1e-300, (numba.weights, torch_.weights)
    scale = float(numba.weights.abs().max()) if numba.weights.numel() else 1.0
    if elementwise:
        torch.testing.assert_close(torch_.weights, numba.weights, rtol=1e-6, atol=1e-8 * scale)
    # Residuals relative to ||target||: the last one is the square root of a difference that rounds to ~0.
    assert len(torch_.residuals) == len(numba.residuals)
    if numba.residuals:
        np.testing.assert_allclose(torch_.residuals, numba.residuals, rtol=1e-6, atol=1e-6 * numba.residuals[0])


OPTIONS = [
    {"nonnegative": True, "batch": 1, "ridge": 0.0, "tol": None},
    {"nonnegative": True, "batch": 1, "ridge": 0.0, "tol": 1e-4},
    {"nonnegative": True, "batch": 3, "ridge": 0.0, "tol": None},
    {"nonnegative": False, "batch": 1, "ridge": 0.0, "tol": None},
    {"nonnegative": False, "batch": 4, "ridge": 0.0, "tol": 1e-4},
    {"nonnegative": True, "batch": 1, "ridge": 0.1, "tol": None},
    {"nonnegative": True, "batch": 2, "ridge": 0.1, "tol": 1e-3},
]


def _gram(G: np.ndarray) -> torch.Tensor:
    """``G G^T``, exactly symmetric, and with duplicated rows of ``G`` giving exactly equal rows of ``K`` (so exactly
    tied correlations): computed once per distinct row, since a BLAS product may round the entries of equal rows
    differently (the diagonal and an off-diagonal copy of the same product), and the two loops' row means, summed in
    different orders, would then break the near tie differently."""
    distinct, inverse = np.unique(G, axis=0, return_inverse=True)
    K = distinct @ distinct.T
    K = np.triu(K) + np.triu(K, 1).T
    return torch.from_numpy(np.ascontiguousarray(K[np.ix_(inverse.ravel(), inverse.ravel())]))


def adversarial_grams() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    G = rng.standard_normal((24, 6))
    duplicated = G.copy()
    duplicated[12:] = duplicated[:12]
    zero = G.copy()
    zero[::3] = 0.0
    near = G.copy()
    near[1] = near[0] + 1e-7 * rng.standard_normal(6)  # near-singular pairs
    near[3] = near[2] * (1 + 1e-6)
    ties = np.abs(rng.standard_normal((8, 4)))
    ties = np.concatenate([ties, ties, ties])  # every correlation tied three ways: the lowest atom first
    return {
        "random": _gram(rng.standard_normal((30, 40))),
        "rank-deficient": _gram(G),
        "duplicated columns": _gram(duplicated),
        "zero columns": _gram(zero),
        "ties": _gram(ties),
        "near-singular": _gram(near),
        "all zero": torch.zeros(7, 7, dtype=torch.float64),
        "one atom": torch.tensor([[2.0]], dtype=torch.float64),
        "float32": _gram(rng.standard_normal((20, 5))).float(),
        "float16": (_gram(rng.standard_normal((12, 3))) / 4).half(),
        "mixed signs": _gram(rng.standard_normal((16, 16)) * np.linspace(0.1, 10, 16)[:, None]),
    }


ADVERSARIAL = adversarial_grams()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_torch_loop_matches_the_compiled_loop_on_adversarial_grams(name, options):
    K = ADVERSARIAL[name]
    n = K.shape[0]
    for k in sorted({1, max(1, n // 4), n // 2 or 1, n}):
        assert_same_result(K, k, **options)


def test_ties_go_to_the_lowest_numbered_atom_in_both():
    K = ADVERSARIAL["ties"]
    numba, torch_ = (omp_gram(K, 3, impl=impl, tol=None) for impl in ("numba", "torch"))
    assert torch_.indices.tolist() == numba.indices.tolist()
    assert max(numba.indices.tolist()) < 8, "each of the tied copies is the lowest-numbered of its three"


def test_torch_loop_matches_with_a_custom_target_and_untracked_residuals():
    rng = np.random.default_rng(3)
    G = rng.standard_normal((20, 9))
    target = rng.standard_normal(9)
    K, corr = _gram(G), torch.from_numpy(G @ target)
    assert_same_result(K, 8, target_corr=corr, target_sq_norm=float(target @ target), nonnegative=False)
    assert_same_result(K, 8, target_corr=corr, tol=None)  # no ||target||^2: no residuals reported
    assert omp_gram(K, 8, target_corr=corr, tol=None, impl="torch").residuals == []
    # The sum-constrained problem of gradmatch's 'sum_constrained' normalisation, and the trainer's cached target.
    corr_mean, target_sq = mean_gradient_target(K)
    assert_same_result(K, 6, target_corr=corr_mean, target_sq_norm=target_sq)


@FUZZ
@given(gradient_sets(max_n=16), st.integers(1, 16), st.sampled_from(OPTIONS))
def test_torch_loop_matches_the_compiled_loop_on_fuzzed_grams(G, k, options):
    assert_same_result(_gram(G), min(k, G.shape[0]), elementwise=False, **options)


BAD_INPUTS = [
    ((torch.ones(2, 3), 1), {}),
    ((torch.eye(3), 0), {}),
    ((torch.eye(3), 1), {"ridge": -1.0}),
    ((torch.eye(3), 1), {"ridge": math.inf}),
    ((torch.eye(3), 1), {"tol": -0.5}),
    ((torch.eye(3), 1), {"batch": 0}),
    ((torch.full((2, 2), math.nan), 1), {}),
    ((torch.tensor([[1.0, math.inf], [math.inf, 1.0]]), 1), {}),
    ((torch.eye(3), 1), {"target_corr": torch.ones(2)}),
    ((torch.eye(3), 1), {"target_corr": torch.ones(3)}),  # tol set without target_sq_norm
]


@pytest.mark.parametrize(("args", "kwargs"), BAD_INPUTS)
def test_both_loops_raise_the_same_errors(args, kwargs):
    messages = []
    for impl in ("numba", "torch"):
        with pytest.raises(ValueError) as error:
            omp_gram(*args, impl=impl, **kwargs)
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_impl_is_resolved_by_the_device():
    assert OMP_IMPLS == ("auto", "numba", "torch")
    assert resolve_omp_impl("auto", "cpu") == "numba"
    assert resolve_omp_impl("auto", "cuda") == "torch" and resolve_omp_impl("auto", "xpu") == "torch"
    assert resolve_omp_impl("auto", "mps") == "numba"  # no float64 there
    assert resolve_omp_impl("torch", "cpu") == "torch" and resolve_omp_impl("numba", "cuda") == "numba"
    with pytest.raises(ValueError, match="MPS does not support"):
        resolve_omp_impl("torch", "mps")
    with pytest.raises(ValueError, match=r"impl='jax' is not supported"):
        omp_gram(torch.eye(2), 1, impl="jax")


class _HostReads(TorchDispatchMode):
    """Counts the operator behind ``.item()``, ``bool()`` and ``int()`` of a tensor: a read of a device value by
    the host (a synchronisation on an accelerator)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[2], OPTIONS[4]])
def test_a_step_of_the_torch_loop_never_reads_the_device(options):
    """The loop's steps read nothing back (the compiled loop's branches are masks here); the whole call reads one
    flag per block of k steps and the result once."""
    K = ADVERSARIAL["duplicated columns"]
    corr, target_sq = mean_gradient_target(K)
    nonnegative, batch = options["nonnegative"], options["batch"]
    loop, state = omp_torch._start(K, corr, float(target_sq), 12, 0.0, nonnegative, -math.inf, batch)
    with _HostReads() as reads:
        for _ in range(30):  # more steps than it needs: finished steps change nothing
            loop.step(state)
    assert reads.reads == 0
    assert bool(state.done)
    with _HostReads() as reads:
        result = omp_gram(K, 12, impl="torch", **options)
    assert result.indices.numel() > 0
    # The finiteness check, ||target||^2, a flag per block (one or two here) and the result's sizes: far fewer than
    # the steps (12 and more).
    assert reads.reads <= 8, reads.reads
