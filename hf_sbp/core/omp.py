"""Orthogonal Matching Pursuit on a Gram matrix (:func:`omp_gram`), and the weights it gives.

OMP sees the atoms (the last-layer gradients ``g_i``) only through ``K = G G^T`` and the target through
``c = G t``; :func:`omp_gram` checks its inputs and runs one of two loops, :mod:`.omp_loop` (Numba, on the CPU) or
:mod:`.omp_torch` (on the matrix's device). :func:`normalize_weights` turns its raw weights into loss weights, and
:func:`sum_constrained_problem` is the same problem with the weights' sum held near 1. ``docs/method.md`` (section
2.3) states the algorithm and its sources.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from .._utils import check_int_at_least
from .omp_loop import omp_loop
from .omp_torch import omp_torch_loop
from .selection import mean_gradient_target

OMP_IMPLS = ("auto", "numba", "torch")
"""The loops :func:`omp_gram` can run (``impl``)."""


class OMPResult(NamedTuple):
    """The result of :func:`omp_gram`.

    Attributes:
        indices: LongTensor of the chosen atoms, distinct, in the order they were (last) added.
        weights: float64 weights of those atoms, estimating the target: ``sum_S w_i g_i ~ target``.
        residuals: ``sqrt`` of the objective ``||sum_S w_i g_i - target||^2 + ridge ||w||^2`` after
            each accepted step, starting with the empty subset (``||target||``). Never increases.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    residuals: list[float]


def _check_omp_arguments(gram: torch.Tensor, n_nonzero: int, ridge: float, tol: float | None, batch: int) -> None:
    """The errors :func:`omp_gram` raises for bad arguments, before either loop runs."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (n, n) matrix; got shape {tuple(gram.shape)}.")
    check_int_at_least("n_nonzero", n_nonzero, 1)
    check_int_at_least("batch", batch, 1)
    if not (ridge >= 0.0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite number >= 0; got {ridge!r}.")
    if tol is not None and not (tol >= 0.0 and math.isfinite(tol)):
        raise ValueError(f"tol must be None or a finite number >= 0; got {tol!r}.")


def _loop_inputs(
    gram: torch.Tensor,
    impl: str,
    target_corr: torch.Tensor | None,
    target_sq_norm: torch.Tensor | float | None,
    tol: float | None,
) -> tuple[Any, torch.Tensor, float]:
    """``(K, c, ||target||^2)`` as the loop of ``impl`` takes them: ``K`` a float32/float64 NumPy array (``numba``)
    or the matrix on its device (``torch``), ``c`` float64; the target checked once for both loops (default: the
    batch mean)."""
    n = gram.shape[0]
    if not bool(torch.isfinite(gram.detach()).all()):
        raise ValueError("gram contains NaN or infinite entries.")
    if impl == "numba":
        # float32 stays float32 (every float32 is a float64, so nothing is rounded): the loop reads rows of K into
        # float64 as it needs them, and keeps the chosen atoms' columns in K's dtype (half the memory traffic).
        gram_cpu = gram.detach().to("cpu")
        if gram_cpu.dtype not in (torch.float32, torch.float64):
            gram_cpu = gram_cpu.double()
        K = np.ascontiguousarray(gram_cpu.numpy())
        if target_corr is None:  # NumPy's means, as mean_gradient_target computes them on the CPU
            corr_np = K.mean(axis=1, dtype=np.float64)
            corr, mean_sq = torch.from_numpy(corr_np), float(corr_np.mean())
    else:
        K = gram.detach()
        if not K.dtype.is_floating_point:
            K = K.double()
        if target_corr is None:  # on the device, as mean_gradient_target computes them there
            corr = K.mean(dim=1, dtype=torch.float64)
            mean_sq = float(corr.mean())
    # The target, checked once for both loops; the default is the batch mean.
    if target_corr is None:
        target_sq = mean_sq if target_sq_norm is None else float(target_sq_norm)
    else:
        if target_corr.shape != (n,):
            raise ValueError(f"target_corr must have shape ({n},); got {tuple(target_corr.shape)}.")
        corr = target_corr.detach().to(torch.float64)
        if target_sq_norm is None and tol is not None:
            raise ValueError("target_sq_norm is required with a custom target_corr when tol is set.")
        target_sq = float("nan") if target_sq_norm is None else float(target_sq_norm)
    return K, corr, target_sq


def omp_gram(
    gram: torch.Tensor,
    n_nonzero: int,
    *,
    target_corr: torch.Tensor | None = None,
    target_sq_norm: torch.Tensor | float | None = None,
    ridge: float = 0.0,
    nonnegative: bool = True,
    tol: float | None = 1e-4,
    batch: int = 1,
    impl: str = "auto",
) -> OMPResult:
    """Orthogonal Matching Pursuit on a Gram matrix, with ridge and optional non-negative weights.

    Greedily builds a subset ``S`` of at most ``n_nonzero`` atoms whose weighted sum matches a target
    vector, seeing the atoms only through ``K = G G^T`` and the target through ``c = G t``:

    1. add the atom (not in ``S``) with the largest residual correlation ``c - K[:, S] w_S``
       (largest absolute value when ``nonnegative`` is False, as in classic OMP);
    2. refit ``w_S = (K_SS + ridge I)^-1 c_S`` with a Cholesky factor of ``K_SS + ridge I`` that is
       extended by one row per step rather than refactorised.

    With ``nonnegative`` (the default), only atoms with a positive residual correlation can enter, and
    a refit that makes weights negative is resolved as in Lawson-Hanson NNLS: move from the previous
    (feasible) weights towards the new solution until the first weight hits zero, drop that atom, and
    refit. Every step therefore lowers the objective, and a weight is never negative. With
    ``n_nonzero >= n`` and ``ridge = 0`` this is Lawson-Hanson NNLS over all atoms.

    It stops when ``n_nonzero`` atoms are chosen, when no atom can lower the objective, or when the
    objective falls to ``tol^2 * ||target||^2`` (the residual is negligible).

    With ``batch > 1`` (generalized OMP, Wang, Kwon and Shim 2012), step 1 adds the ``batch`` atoms with the
    largest residual correlations at once (the fewer that ``n_nonzero`` leaves room for, skipping any that depends
    on the chosen ones), and step 2 refits once: about ``batch`` times fewer steps, each as costly as one of OMP's,
    for a greedier choice. It is another method than OMP: its subsets differ.

    Args:
        gram: ``(n, n)`` symmetric positive semi-definite Gram matrix of the atoms.
        n_nonzero: the most atoms to choose (``k``), at least 1.
        target_corr: ``(n,)`` correlations ``<g_i, target>``; defaults to the batch mean gradient,
            ``c_i = mean_j K_ij``.
        target_sq_norm: ``||target||^2``, used for ``tol`` and the reported residuals; defaults to
            ``mean(K)`` for the mean target. Required with a custom ``target_corr`` if ``tol`` is set.
        ridge: ``lam >= 0`` added to the diagonal of ``K_SS`` in every refit (absolute units of ``K``).
        nonnegative: keep every weight ``>= 0``.
        tol: relative residual at which to stop early; ``None`` never stops early.
        batch: the atoms added per step, at least 1; 1 (the default) is OMP.
        impl: which loop runs OMP, one of :data:`OMP_IMPLS`: ``"numba"`` (compiled, on the CPU: the matrix is copied
            there), ``"torch"`` (:mod:`hf_sbp.core.omp_torch`, on ``gram``'s device, without reading the device inside
            the loop), or ``"auto"`` (the default): ``"torch"`` for a matrix on CUDA or XPU, ``"numba"`` otherwise
            (MPS has no float64). Both run the same algorithm on the same checked inputs.

    A step costs ``O(n |S|)`` for the residual correlations and ``O(|S|^2)`` for the factor's new row and the refit;
    dropping an atom costs ``O(|S|^2)``: ``O(n k^2)`` in all.

    Returns:
        An :class:`OMPResult` on ``gram``'s device. Computation is in float64: on the CPU, in one thread, compiled
        (:mod:`hf_sbp.core.omp_loop`), or on ``gram``'s device (:mod:`hf_sbp.core.omp_torch`).
    """
    _check_omp_arguments(gram, n_nonzero, ridge, tol, batch)
    n, device = gram.shape[0], gram.device
    impl = resolve_omp_impl(impl, device)
    K, corr, target_sq = _loop_inputs(gram, impl, target_corr, target_sq_norm, tol)
    stop_at = -math.inf if tol is None or not math.isfinite(target_sq) else tol * tol * target_sq
    k = min(n_nonzero, n)
    if impl == "numba":
        corr_np = np.ascontiguousarray(corr.to("cpu").numpy())
        support, weights, residuals = omp_loop(K, corr_np, target_sq, k, ridge, nonnegative, stop_at, batch)
        index_tensor = torch.from_numpy(support.astype(np.int64)).to(device)
        weight_tensor = torch.from_numpy(np.maximum(weights, 0.0) if nonnegative else weights).to(device)
        return OMPResult(index_tensor, weight_tensor, residuals.tolist())
    index_tensor, weight_tensor, residual_list = omp_torch_loop(
        K, corr.to(device), target_sq, k, ridge, nonnegative, stop_at, batch
    )
    return OMPResult(index_tensor, weight_tensor.clamp(min=0.0) if nonnegative else weight_tensor, residual_list)


def resolve_omp_impl(impl: str, device: torch.device | str) -> str:
    """The loop :func:`omp_gram` runs for ``impl`` (one of :data:`OMP_IMPLS`) and a Gram matrix on ``device``:
    ``"numba"`` or ``"torch"``. ``"auto"`` keeps OMP where the matrix is on CUDA and XPU (no copy to the host, no
    host read inside the loop) and uses the compiled loop elsewhere: on the CPU it is the faster, and MPS has no
    float64."""
    if impl not in OMP_IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; expected one of {OMP_IMPLS}.")
    device_type = torch.device(device).type
    if impl == "auto":
        return "torch" if device_type in ("cuda", "xpu") else "numba"
    if impl == "torch" and device_type == "mps":
        raise ValueError("impl='torch' computes in float64, which MPS does not support; use impl='numba' there.")
    return impl


def prepare_omp(dtype: torch.dtype = torch.float32) -> None:
    """Make :func:`omp_gram`'s compiled loop ready for Gram matrices of ``dtype`` (float32 or float64): compiled at
    its first use on a machine (seconds, then cached on disk), loaded from that cache in later processes (a fraction
    of a second). Call it before timing anything that runs OMP."""
    omp_gram(torch.eye(2, dtype=dtype), 1)


def sum_constrained_problem(
    gram: torch.Tensor, strength: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient matching with the weights' sum held near 1, as a plain OMP problem on a modified Gram matrix.

    A constant coordinate ``sqrt(lam)`` appended to every gradient ``g_i`` and to the target ``gbar`` adds ``lam`` to
    every entry of ``K``, to every correlation ``c_i`` and to ``||gbar||^2``. The fit's error on that coordinate is
    ``lam (sum_S w_i - 1)^2``, so for large ``lam`` the weights sum to about 1: OMP then estimates the mean gradient
    as a weighted *mean* of the chosen gradients, and rescaling its weights to sum to ``m`` no longer inflates a
    shrunken fit (what made gradient matching worse than a random subset at keep 0.25, and on regression).

    Args:
        gram: ``(n, n)`` Gram matrix of the gradients.
        strength: ``lam`` relative to the mean squared gradient norm (mean of ``diag K``).

    Returns:
        ``(gram + lam, c + lam, ||gbar||^2 + lam)``: arguments ``gram``, ``target_corr`` and ``target_sq_norm`` of
        :func:`omp_gram`, in float64.
    """
    K = gram.double()
    corr, target_sq = mean_gradient_target(K)
    lam = strength * float(torch.diagonal(K).mean())
    return K + lam, corr + lam, target_sq + lam


def normalize_weights(weights: torch.Tensor, mode: str = "subset_size") -> torch.Tensor:
    """Scale OMP's weights into per-example loss weights for the subset loss ``(1/m) sum_S w_i l_i``.

    Args:
        weights: OMP's raw weights (they estimate the mean gradient: ``sum_S w_i g_i ~ gbar``).
        mode: ``"subset_size"`` (Balles et al. 2023, see ``docs/method.md``): rescale so the weights sum to
            ``m = |S|``, so a weight of 1 counts like one example and the loss is a weighted mean. ``"none"``: keep
            OMP's estimate of the mean gradient, magnitude included, i.e. return ``m * w``.

    Returns:
        A tensor of the same shape and dtype; all ones if the weights sum to zero, all NaN if any weight
        is NaN or infinite (so that the caller cannot mistake a broken estimate for a usable one).
    """
    m = weights.numel()
    if mode == "subset_size":
        if m == 0:
            return weights.clone()
        if not bool(torch.isfinite(weights).all()):
            return torch.full_like(weights, math.nan)
        # Divide by the largest magnitude first, in float64, so that neither the sum nor m / sum
        # overflows or underflows for denormal or near-overflow weights.
        w = weights.double()
        peak = w.abs().max()
        if bool(peak > 0):
            w = w / peak
        total = w.sum()
        if not bool(total > 0):
            return torch.ones_like(weights)
        return (w * (m / total)).to(weights.dtype)
    if mode == "none":
        return weights * m
    raise ValueError(f"weight normalization mode={mode!r} is not supported; expected 'subset_size' or 'none'.")
