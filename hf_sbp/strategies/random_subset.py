"""``random``: a uniform subset of the same size, i.e. a smaller batch; the baseline every claim is made against."""

from __future__ import annotations

import torch

from ..core.selection import random_subset
from .base import SelectionBatch, SelectionStrategy, register_strategy


@register_strategy("random")
class RandomSubset(SelectionStrategy):
    """``k`` rows uniformly at random, weight 1 each. No scoring pass (unless ``sbp_diagnostic_scoring`` asks for
    one to log the subset's gradient-match error), so a step costs what a batch of ``k`` costs."""

    description = "a uniform subset of the same size (a smaller batch): the baseline to beat"
    settings = ("sbp_diagnostic_scoring",)

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return random_subset(batch.n, k, batch.generator), torch.ones(k)
