"""``stale-gradmatch`` and ``stale-loss``: selection from cached per-example statistics, skipping the scoring pass.

Every forward pass the trainer runs writes what it computed for its rows into a per-example cache (see
:mod:`hf_sbp.example_cache`): the scoring pass for the rows it scores, the subset's gradient forward for the rows
it trains on. A row whose statistics are younger than ``sbp_max_staleness`` epochs is not scored again; the
scoring pass covers the other rows only, and is skipped when there are none, so such a step costs what a random
subset's costs. In the first epoch every row is new and is scored, as with ``gradmatch`` and ``loss``.
"""

from __future__ import annotations

import torch

from ..core.selection import last_layer_gram
from .base import SelectionBatch, SelectionStrategy, register_strategy
from .gradmatch import GradientMatching
from .loss import LossBased

STALE_SETTINGS = ("sbp_max_staleness", "sbp_cache_projection_dim")


class StaleStatistics(SelectionStrategy):
    """Scores only the rows whose cached statistics are missing or older than ``sbp_max_staleness`` epochs."""

    needs_scoring = True
    uses_example_cache = True

    def rows_to_score(self, batch: SelectionBatch) -> torch.Tensor:
        return torch.nonzero(batch.cached.age >= self.args.sbp_max_staleness).reshape(-1)


@register_strategy("stale-gradmatch")
class StaleGradientMatching(StaleStatistics, GradientMatching):
    """``gradmatch`` on the Gram matrix of the cached last-layer gradients (Jiang et al.'s stale idea applied to
    gradient matching): the rows just scored enter with fresh statistics, the others with their cached ones."""

    description = "gradmatch on cached per-example gradients: scores only rows not seen for sbp_max_staleness epochs"
    settings = GradientMatching.settings + STALE_SETTINGS

    def gram(self, batch: SelectionBatch) -> torch.Tensor:
        cached = batch.cached
        return last_layer_gram(cached.residuals, cached.features, bias=cached.head_bias)


@register_strategy("stale-loss")
class StaleLossBased(StaleStatistics, LossBased):
    """``loss`` on the cached losses (Jiang et al. 2019's stale variant): each row's loss from the last forward
    pass that saw it, the rows just scored included."""

    description = "loss-based selection on cached losses: scores only rows not seen for sbp_max_staleness epochs"
    settings = LossBased.settings + STALE_SETTINGS

    def losses(self, batch: SelectionBatch) -> torch.Tensor:
        return batch.cached.losses
