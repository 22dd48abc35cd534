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

import numpy as np
import torch
import torch.nn.functional as F

from .._utils import check_int_at_least

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


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
