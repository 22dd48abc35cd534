"""``infobatch`` and ``random-prune``: dataset-level pruning, each epoch visiting part of the training set.

The rules are the pure functions of :mod:`hf_sbp.core.pruning`; the trainer plans every epoch with them (see
:mod:`hf_sbp.epoch_pruning`) from each example's loss, recorded by the forward passes it already runs, and trains
every row of each batch with the epoch's loss weights.
"""

from __future__ import annotations

import torch

from ..core.pruning import infobatch_keep, random_prune_keep
from .base import DatasetPruningStrategy, register_strategy

PRUNING_SETTINGS = ("sbp_prune_ratio", "sbp_prune_anneal")


@register_strategy("infobatch")
class InfoBatch(DatasetPruningStrategy):
    """InfoBatch (Qin et al., ICLR 2024): each epoch after the first leaves out each example whose last loss is below
    the mean with probability ``sbp_prune_ratio`` and weights the kept ones' losses by ``1 / (1 - ratio)``, so the
    expected gradient is unchanged; nothing is pruned in the last ``sbp_prune_anneal`` of training."""

    weighted = True
    settings = PRUNING_SETTINGS
    description = (
        "InfoBatch: each epoch skips examples whose last loss is below the mean with probability sbp_prune_ratio, "
        "reweighting the kept ones"
    )

    def keep_examples(
        self, losses: torch.Tensor, seen: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return infobatch_keep(losses, seen, self.args.sbp_prune_ratio, generator)


@register_strategy("random-prune")
class RandomPrune(DatasetPruningStrategy):
    """InfoBatch's baseline: each epoch leaves out as many examples as InfoBatch's rule would (on this run's own
    losses), drawn uniformly from the whole training set, with weight 1; the same annealing."""

    settings = PRUNING_SETTINGS
    description = "InfoBatch's baseline: each epoch skips as many examples as infobatch would, uniformly at random"

    def keep_examples(
        self, losses: torch.Tensor, seen: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return random_prune_keep(losses, seen, self.args.sbp_prune_ratio, generator)
