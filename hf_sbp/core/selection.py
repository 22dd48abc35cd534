"""The numerical core of selective backprop: pure functions on tensors.

Nothing here knows about ``transformers``: every function takes tensors and returns tensors, so the
math can be tested against independent references (autograd, brute force, scikit-learn) and reused
outside the Trainer. ``docs/method.md`` states the formulas, with their sources.

Notation: a batch of ``n`` examples; the model ends in a linear head ``z_i = W h_i + b`` with
``h_i`` in R^d and ``C`` outputs; ``r_i = dl_i/dz_i`` is the head residual of example ``i`` and
``g_i = [r_i h_i^T, r_i]`` its last-layer gradient.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .._utils import check_int_at_least
from .omp_loop import omp_loop
from .omp_torch import omp_torch_loop

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
OMP_IMPLS = ("auto", "numba", "torch")
"""The loops :func:`omp_gram` can run (``impl``)."""


def _check_problem_type(problem_type: str) -> None:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type={problem_type!r} is not supported; expected one of {PROBLEM_TYPES}.")


def infer_problem_type(num_labels: int, labels: torch.Tensor, problem_type: str | None = None) -> str:
    """Return the loss family a sequence-classification model uses, with the rule of ``transformers``.

    Args:
        num_labels: the number of outputs of the head.
        labels: the batch's labels.
        problem_type: ``config.problem_type`` when the model sets it; returned as is (after validation).
    """
    if problem_type is not None:
        _check_problem_type(problem_type)
        return problem_type
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return "single_label_classification"
    return "multi_label_classification"


def per_example_loss(
    logits: torch.Tensor, labels: torch.Tensor, problem_type: str, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-example losses ``l_i`` with the same reduction over outputs as ``transformers`` models.

    Their batch mean equals the loss that ``*ForSequenceClassification`` models (or ``Trainer``'s
    label smoother) return: cross-entropy with optional label smoothing, BCE-with-logits averaged
    over the ``C`` outputs, and squared error averaged over the ``C`` outputs.

    Args:
        logits: ``(n, C)`` head outputs.
        labels: ``(n,)`` class ids, ``(n, C)`` multi-hot floats, or ``(n,)``/``(n, C)`` regression targets.
        problem_type: one of :data:`PROBLEM_TYPES`.
        label_smoothing: ``eps`` for single-label cross-entropy.

    Returns:
        A float32 tensor of shape ``(n,)``.
    """
    _check_problem_type(problem_type)
    logits = logits.float()
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels.view(-1), reduction="none", label_smoothing=label_smoothing)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(-1)
    return (logits - labels.to(logits.dtype).view(logits.shape)).pow(2).mean(-1)


def head_residuals(
    logits: torch.Tensor, labels: torch.Tensor, problem_type: str, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-example residuals ``r_i = dl_i/dz_i`` of the head's outputs, in float32.

    ======================================  ===================================================
    loss                                    ``r_i``
    ======================================  ===================================================
    softmax cross-entropy, smoothing eps    ``softmax(z_i) - ((1 - eps) onehot(y_i) + eps / C)``
    sigmoid BCE (multi-label)               ``sigmoid(z_i) - y_i``
    squared error (regression)              ``2 (z_i - y_i)``
    ======================================  ===================================================

    These are the gradients of the loss summed over the ``C`` outputs. For multi-label and
    multi-output regression, ``transformers`` averages over outputs instead, which scales every
    residual by the same ``1/C``: the selection and the normalised weights do not change.

    Args:
        logits: ``(n, C)`` head outputs.
        labels: labels as in :func:`per_example_loss`.
        problem_type: one of :data:`PROBLEM_TYPES`.
        label_smoothing: ``eps`` for single-label cross-entropy.

    Returns:
        A float32 tensor of shape ``(n, C)``.
    """
    _check_problem_type(problem_type)
    logits = logits.float()
    if problem_type == "single_label_classification":
        num_classes = logits.shape[-1]
        target = F.one_hot(labels.view(-1).long(), num_classes).float()
        target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
        return torch.softmax(logits, dim=-1) - target
    if problem_type == "multi_label_classification":
        return torch.sigmoid(logits) - labels.float()
    return 2.0 * (logits - labels.float().view(logits.shape))


def last_layer_gram(residuals: torch.Tensor, features: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """Gram matrix of the per-example last-layer gradients, weight and bias, without forming them.

    ``K_ij = <g_i, g_j> = (r_i . r_j) (h_i . h_j + 1)`` for ``g_i = [r_i h_i^T, r_i]``;
    cost ``O(n^2 (C + d))`` instead of ``O(n^2 C d)``. For a head without bias (decoders' ``score``),
    ``g_i = r_i h_i^T`` and the ``+ 1`` goes.

    Args:
        residuals: ``(n, C)`` head residuals (see :func:`head_residuals`).
        features: ``(n, d)`` inputs of the head.
        bias: whether the head has a bias, whose gradient ``r_i`` is part of ``g_i``.

    Returns:
        A float32 ``(n, n)`` symmetric positive semi-definite matrix.
    """
    if residuals.dim() != 2 or features.dim() != 2 or residuals.shape[0] != features.shape[0]:
        raise ValueError(
            f"residuals and features must be (n, C) and (n, d) with the same n; got {tuple(residuals.shape)} "
            f"and {tuple(features.shape)}."
        )
    r = residuals.float()
    h = features.float()
    return (r @ r.T) * (h @ h.T + 1.0) if bias else (r @ r.T) * (h @ h.T)


def mean_gradient_target(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target of gradient matching, the batch-mean gradient ``gbar``, seen through ``K``.

    Returns:
        ``(c, s)`` with ``c_i = <g_i, gbar> = mean_j K_ij`` and ``s = ||gbar||^2 = mean(K)``, in float64 (summed in
        float64 whatever ``gram``'s dtype), on ``gram``'s device. On the CPU they are NumPy's means, the very numbers
        :func:`omp_gram` computes for its default target.
    """
    if gram.device.type == "cpu" and gram.dtype in (torch.float32, torch.float64) and not gram.requires_grad:
        corr = gram.numpy().mean(axis=1, dtype=np.float64)
        return torch.from_numpy(corr), torch.tensor(corr.mean(), dtype=torch.float64)
    corr = gram.mean(dim=1, dtype=torch.float64)
    return corr, corr.mean()


def gram_cannot_overflow(residuals: torch.Tensor, features: torch.Tensor, bias: bool = True) -> bool:
    """Whether :func:`last_layer_gram` of these finite inputs is sure to have only finite float32 entries, in
    ``O(n (C + d))`` rather than the ``O(n^2)`` of checking the matrix.

    By Cauchy-Schwarz, every partial sum of ``r_i . r_j`` is at most ``max ||r||^2`` in magnitude, every partial sum
    of ``h_i . h_j`` (plus 1) at most ``max ||h||^2 + 1``, and every entry of ``K`` at most their product; when all
    three are below a quarter of float32's largest number, rounding cannot overflow either.
    ``False`` (non-finite inputs, or a larger bound) says nothing: check the matrix itself then.
    """
    if not (residuals.numel() and features.numel()):
        return True
    r = float(torch.linalg.vector_norm(residuals.detach(), dim=-1, dtype=torch.float64).max())
    h = float(torch.linalg.vector_norm(features.detach(), dim=-1, dtype=torch.float64).max())
    r_sq, h_sq = r * r, h * h + (1.0 if bias else 0.0)  # products overflow to inf (where ** 2 would raise)
    bound = max(r_sq, h_sq, r_sq * h_sq)
    return math.isfinite(bound) and bound <= float(torch.finfo(torch.float32).max) / 4


def gradient_match_error(
    gram: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    normalize: bool = True,
    target: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Relative error of a weighted subset's gradient against the batch-mean gradient, from the Gram matrix alone.

    With ``normalize`` (the default), ``|| sum_S w_i g_i / sum_S w_i - gbar || / || gbar ||``: only the weights'
    proportions matter. Without it, ``|| sum_S w_i g_i - gbar || / || gbar ||`` with the weights as given: pass
    ``w / m`` to measure the gradient of the subset loss ``(1/m) sum_S w_i l_i``, magnitude included.

    The squared error is ``a^T K_SS a - 2 a . c_S + ||gbar||^2`` for the subset's coefficients ``a``: ``O(|S|^2)``
    given ``target``, :func:`mean_gradient_target` of ``gram`` (computed here otherwise, in ``O(n^2)``).

    Returns:
        A float64 scalar; ``nan`` when ``gbar`` is zero or (normalising) the weights sum to zero (undefined).
    """
    corr, target_sq = mean_gradient_target(gram) if target is None else target
    idx = indices.to(gram.device).long()
    w = weights.to(gram.device).double()
    total = w.sum()
    if idx.numel() == 0 or (normalize and not bool(total > 0)) or not bool(target_sq > 0):
        return torch.tensor(float("nan"), dtype=torch.float64)
    a = w / total if normalize else w
    err_sq = a @ gram[idx[:, None], idx].double() @ a - 2.0 * (a @ corr.to(gram.device)[idx]) + target_sq
    return torch.sqrt(torch.clamp(err_sq, min=0.0) / target_sq)


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


def subset_size(n: int, keep: float, minimum: int = 1) -> int:
    """``k = round(keep * n)``, rounding halves up, and at least ``minimum`` (1 by default; 0 tells whether
    ``keep`` keeps anything of a batch of ``n`` at all)."""
    return max(minimum, int(math.floor(keep * n + 0.5)))


def random_subset(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` distinct rows out of ``n``, uniformly at random (the baseline: a smaller batch), in increasing order,
    so that with ``k = n`` the subset is the batch itself."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}]; got {k}.")
    return torch.randperm(n, generator=generator)[:k].sort().values


def loss_rank_sample(losses: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Composer's loss-based selection: exactly ``k`` rows, higher losses more likely.

    Examples are ranked by loss; the one at ascending rank ``r`` (0-based) has percentile
    ``p = (r + 0.5) / n`` and is drawn, without replacement, with probability proportional to
    ``p ** (n / k - 1)`` (``1/keep - 1`` in Composer's terms).

    Returns:
        A LongTensor of ``k`` distinct row indices.
    """
    n = losses.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}]; got {k}.")
    order = torch.argsort(losses.detach().float().cpu(), stable=True)
    percentiles = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    probs = percentiles.pow(n / k - 1.0)
    ranks = torch.multinomial(probs, k, replacement=False, generator=generator)
    return order[ranks]


class LossHistory:
    """The sliding window of recently observed losses behind Jiang et al.'s CDF (default 1024)."""

    def __init__(self, size: int = 1024) -> None:
        check_int_at_least("size", size, 1)
        self.size = size
        self._values = torch.empty(0, dtype=torch.float32)

    def push(self, losses: torch.Tensor) -> None:
        """Append losses, keeping only the newest ``size``."""
        new = losses.detach().float().cpu().reshape(-1)
        self._values = torch.cat([self._values, new])[-self.size :]

    def values(self) -> torch.Tensor:
        return self._values.clone()

    def __len__(self) -> int:
        return self._values.numel()

    def state_dict(self) -> dict:
        return {"size": self.size, "values": self._values.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        self._values = torch.tensor(state["values"], dtype=torch.float32)[-self.size :]


def loss_cdf_probabilities(
    losses: torch.Tensor, history: torch.Tensor, beta: float, min_prob: float = 0.0
) -> torch.Tensor:
    """Jiang et al.'s keep probabilities ``p_i = max(p_min, CDF(l_i) ** beta)``.

    ``CDF(l)`` is the fraction of the history strictly below ``l``; the caller pushes the current
    batch into the history first.
    """
    if history.numel() == 0:
        raise ValueError("history is empty; push the current batch's losses first.")
    current = losses.detach().float().cpu().reshape(-1, 1)
    cdf = (history.reshape(1, -1) < current).double().mean(dim=1)
    return torch.clamp(cdf.pow(beta), min=min_prob)


def loss_cdf_sample(
    losses: torch.Tensor,
    history: torch.Tensor,
    beta: float,
    min_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Jiang et al.'s loss-based selection: an independent coin flip per example.

    Keeps example ``i`` with probability :func:`loss_cdf_probabilities`, so the subset size varies
    (expected fraction ``1 / (beta + 1)`` when ``p_min = 0``). If every coin says drop, the example
    with the highest probability is kept, so a step never backpropagates nothing.

    Returns:
        A LongTensor of distinct row indices in increasing order.
    """
    probs = loss_cdf_probabilities(losses, history, beta, min_prob)
    coins = torch.rand(probs.shape, generator=generator, dtype=torch.float64)
    chosen = torch.nonzero(coins < probs).squeeze(-1)
    if chosen.numel() == 0:
        chosen = torch.argmax(probs).reshape(1)
    return chosen


def index_rows(batch: dict, indices: torch.Tensor, n: int) -> dict:
    """Select rows ``indices`` of every tensor in ``batch`` whose first dimension is ``n``.

    Other entries (scalars, non-tensors, tensors of another leading size) are passed through.
    """
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value.index_select(0, indices.to(value.device))
        else:
            out[key] = value
    return out
