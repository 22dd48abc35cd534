"""``importance`` and ``stale-importance``: importance sampling by the exact last-layer gradient norm (Katharopoulos
and Fleuret, ICML 2018, "Not All Samples Are Created Equal"), with the switch that pays the scoring forward only
while it is worth its cost. The math is in :mod:`hf_sbp.core.importance`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core.importance import SmoothedVarianceReduction, gradient_norms, importance_break_even, importance_sample
from ..core.selection import random_subset, subset_size
from ..selection_metrics import IMPORTANCE_SAMPLING, VARIANCE_REDUCTION
from .base import SelectionBatch, SelectionStrategy, register_strategy
from .stale import STALE_SETTINGS, StaleStatistics


@register_strategy("importance")
class ImportanceSampling(SelectionStrategy):
    """``k`` draws with replacement with ``p_i`` proportional to ``||r_i|| sqrt(||h_i||^2 + 1)``, each weighted
    ``1/(n p_i)``: an unbiased estimate of the batch's mean gradient with less variance than a uniform subset's.

    The switch: the smoothed variance reduction ``tau`` (see :class:`~hf_sbp.core.importance.SmoothedVarianceReduction`)
    is estimated from the scoring pass while sampling is on, and from the trained rows' own scores in the gradient
    forward (which costs nothing extra) while it is off. A step scores and samples only while ``tau`` exceeds the
    break-even ``sbp_importance_break_even`` (by default ``(n + 3k) / (3k)``); otherwise it trains a uniform subset
    of ``k`` with weight 1, at the cost of ``random``. The first step, with no estimate yet, is uniform.
    """

    needs_scoring = True
    weighted = True
    description = (
        "importance sampling by the last-layer gradient norm (unbiased weights), scoring only while the variance "
        "reduction pays for the scoring forward"
    )
    settings = ("sbp_importance_break_even", "sbp_head_module")

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.tau = SmoothedVarianceReduction()
        self.sampling = False  # this step's switch state, set by rows_to_score

    def break_even(self, n: int, k: int) -> float:
        """The variance reduction sampling must exceed: ``sbp_importance_break_even`` or ``(n + 3k) / (3k)``."""
        setting = self.args.sbp_importance_break_even
        return importance_break_even(n, k) if setting is None else setting

    def rows_to_score(self, batch: SelectionBatch) -> torch.Tensor:
        k = subset_size(batch.n, self.args.sbp_effective_keep)
        self.sampling = self.tau.exceeds(self.break_even(batch.n, k))
        return torch.arange(batch.n) if self.sampling else torch.zeros(0, dtype=torch.long)

    def scores(self, batch: SelectionBatch) -> torch.Tensor:
        """The ``(n,)`` sampling scores: the scoring pass's last-layer gradient norms."""
        return gradient_norms(batch.residuals, batch.features, batch.head_bias)

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.logits is None:  # switched off: a uniform subset, no scoring pass
            return random_subset(batch.n, k, batch.generator), torch.ones(k)
        scores = self.scores(batch).cpu()
        self.tau.observe(scores)
        return importance_sample(scores, k, batch.generator)

    def observe(self, indices: torch.Tensor, subset: SelectionBatch) -> None:
        # Switched off, the gradient forward's scores of the (uniform) trained rows are the free estimate of tau.
        if not self.sampling:
            self.tau.observe(gradient_norms(subset.residuals, subset.features, subset.head_bias).cpu())

    def end_step(self, sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.tau.end_step(sum_across_processes)

    def step_metrics(self) -> dict[str, float]:
        tau = self.tau.value
        return {IMPORTANCE_SAMPLING: float(self.sampling), VARIANCE_REDUCTION: float("nan") if tau is None else tau}

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau.load_state_dict(state["tau"])


@register_strategy("stale-importance")
class StaleImportanceSampling(StaleStatistics, ImportanceSampling):
    """``importance`` on the cached last-layer gradients: each row's ``||r_i|| sqrt(||h_i||^2 + 1)`` from the last
    forward pass that saw it; only rows without statistics younger than ``sbp_max_staleness`` epochs are scored.
    With no scoring forward to pay for, it samples on every step (no switch)."""

    description = "importance sampling on cached last-layer gradient norms: scores only rows not seen recently"
    settings = ("sbp_head_module",) + STALE_SETTINGS

    def rows_to_score(self, batch: SelectionBatch) -> torch.Tensor:
        self.sampling = True
        return StaleStatistics.rows_to_score(self, batch)

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = batch.cached
        scores = gradient_norms(cached.residuals, cached.features, cached.head_bias)
        self.tau.observe(scores)
        return importance_sample(scores, k, batch.generator)
