"""Importance sampling by the last-layer gradient norm (Katharopoulos and Fleuret, ICML 2018): the math, on tensors.

For a model that ends in a linear head ``z_i = W h_i + b``, the gradient of example ``i``'s loss with respect to the
head is ``g_i = [r_i h_i^T, r_i]`` (``r_i = dl_i/dz_i``), whose norm is exact and cheap:
``||g_i|| = ||r_i|| sqrt(||h_i||^2 + 1)``. Drawing ``k`` of the ``n`` rows with replacement with ``p_i``
proportional to it and weighting each draw by ``w_i = 1/(n p_i)`` makes ``(1/k) sum_draws w_i g_i`` an unbiased
estimate of the batch's mean gradient ``(1/n) sum_i g_i``, for any gradient, not only the head's, because every
``p_i`` is positive where ``g_i`` is not zero.

Whether a scoring forward pays for itself is decided by the variance reduction ``tau`` of the sampling distribution
against the uniform one ``u``: ``tau = 1 / sqrt(1 - ||p - u||^2 / ||p||^2)``, smoothed with momentum 0.9. A step that
scores costs ``F(n) + 3 F(k)`` against ``3 F(k)`` for a uniform subset, so sampling pays while
``tau > (n + 3k) / (3k)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

TAU_MOMENTUM = 0.9
"""The smoothing of the variance-reduction estimate, as in Katharopoulos and Fleuret's repository."""


def gradient_norms(residuals: torch.Tensor, features: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """``(n,)`` exact norms of the per-example last-layer gradients ``||r_i|| sqrt(||h_i||^2 + 1)`` (the ``+ 1`` is
    the bias's gradient, ``r_i`` itself; left out when the head has no bias), in float32 (float64 inside, so that
    large features do not overflow)."""
    r, h = residuals.detach().double(), features.detach().double()
    return (r.norm(dim=-1) * (h.pow(2).sum(dim=-1) + float(bias)).sqrt()).float()


def sampling_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """``p_i = s_i / sum_j s_j`` (float64); uniform when no score is positive (every gradient is zero: any draw is
    as good) or when they are not all finite."""
    scores = scores.detach().double().clamp_min(0)
    total = scores.sum()
    if not (torch.isfinite(total) and total > 0):
        return torch.full_like(scores, 1.0 / scores.numel())
    return scores / total


def importance_sample(
    scores: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``k`` of ``n = len(scores)`` rows with replacement with ``p_i`` proportional to ``scores``.

    Returns:
        ``(indices, weights)``: the distinct rows drawn (increasing) and their float32 loss weights, scaled for a
        subset loss ``(1/m) sum_S w_i l_i`` over the ``m`` distinct rows (what the trainer computes). A row drawn
        ``c_i`` times gets ``w_i = (m / k) c_i / (n p_i)``, so that ``(1/m) sum_S w_i g_i`` equals
        ``(1/k) sum_draws g_i / (n p_i)``: duplicates count as often as they were drawn.
    """
    n = scores.numel()
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}.")
    p = sampling_probabilities(scores.reshape(-1))
    draws = torch.multinomial(p, k, replacement=True, generator=generator)
    indices, counts = torch.unique(draws, return_counts=True)
    m = indices.numel()
    weights = (m / k) * counts.double() / (n * p[indices])
    return indices, weights.float()


def variance_reduction(scores: torch.Tensor) -> float:
    """``tau = 1 / sqrt(1 - ||p - u||^2 / ||p||^2)`` for ``p`` proportional to ``scores`` and ``u`` uniform: how much
    importance sampling reduces the variance of the gradient estimate against uniform sampling (1 for equal scores;
    it equals ``sqrt(n) ||p||``)."""
    p = sampling_probabilities(scores.reshape(-1))
    u = torch.full_like(p, 1.0 / p.numel())
    ratio = float((p - u).pow(2).sum() / p.pow(2).sum())
    return 1.0 / math.sqrt(max(1.0 - ratio, 1e-12))


def importance_break_even(n: int, k: int) -> float:
    """The variance reduction at which a scoring forward over ``n`` rows pays for itself on a subset of ``k``:
    ``(n + 3k) / (3k)``, a scored step's cost ``F(n) + 3 F(k)`` over a uniform subset's ``3 F(k)``."""
    return (n + 3 * k) / (3 * k)


class SmoothedVarianceReduction:
    """The running estimate of ``tau``: ``tau <- m tau + (1 - m) tau_step`` with momentum ``m`` (0.9), started at
    the first step observed (so that it is not biased towards a starting value); ``None`` before any.

    ``tau_step`` is the mean variance reduction of the score sets :meth:`observe` received in a step, over every
    process: :meth:`end_step` folds it in with a cross-process sum, so that every process holds the same estimate and
    takes the same decision (a scoring forward on some processes only would desynchronise DDP's collectives).
    """

    def __init__(self, momentum: float = TAU_MOMENTUM) -> None:
        self.momentum = momentum
        self.value: float | None = None
        self._step = [0.0, 0.0]  # this step's sum of variance reductions, and their count

    def observe(self, scores: torch.Tensor) -> None:
        """Record the variance reduction of one set of scores (at least two rows, finite; one row says nothing)."""
        if scores.numel() < 2 or not bool(torch.isfinite(scores).all()):
            return
        self._step[0] += variance_reduction(scores)
        self._step[1] += 1

    def end_step(self, sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold this step's observations, summed over processes with ``sum_across_processes`` (every process must
        call it together; ``None`` on one process), into the estimate."""
        totals = torch.tensor(self._step, dtype=torch.float64)
        self._step = [0.0, 0.0]
        if sum_across_processes is not None:
            totals = sum_across_processes(totals)
        if float(totals[1]) == 0:
            return
        tau = float(totals[0] / totals[1])
        self.value = tau if self.value is None else self.momentum * self.value + (1 - self.momentum) * tau

    def exceeds(self, threshold: float) -> bool:
        """Whether the estimate is above ``threshold`` (never before the first observation, unless it is <= 0)."""
        return threshold <= 0 or (self.value is not None and self.value > threshold)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = None if state["value"] is None else float(state["value"])
