"""``rho-loss`` and ``stale-rho-loss``: the rows of largest reducible loss (Mindermann et al., ICML 2022,
"Prioritized Training on Points that are Learnable, Worth Learning, and Not Yet Learnt"). The irreducible losses
come from IL models trained on the other half of the training set (:mod:`hf_sbp.irreducible_loss`); the selection
is :func:`hf_sbp.core.rho_loss.reducible_loss_top_k`."""

from __future__ import annotations

import torch

from ..core.rho_loss import reducible_loss_top_k
from .base import SelectionBatch, SelectionStrategy, register_strategy
from .stale import STALE_SETTINGS, StaleStatistics

IL_SETTINGS = ("sbp_il_model", "sbp_il_epochs", "sbp_il_learning_rate")


@register_strategy("rho-loss")
class RhoLoss(SelectionStrategy):
    """The ``k`` rows of largest ``l_i - IL_i`` (current loss from the scoring pass minus the irreducible loss), weight
    1: rows the model can still learn, skipping those it has learnt (low loss) and those no model learns (high IL,
    such as mislabelled ones)."""

    needs_scoring = True
    uses_example_cache = True  # for the rows' dataset indices, which key the irreducible losses
    caches_gradients = False
    needs_irreducible_loss = True
    description = "RHO-LOSS: the rows of largest reducible loss (current loss minus a held-out model's loss)"
    settings = IL_SETTINGS + ("sbp_head_module",)

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = reducible_loss_top_k(self.losses(batch), batch.irreducible_losses, k)
        return indices, torch.ones(indices.numel())

    def losses(self, batch: SelectionBatch) -> torch.Tensor:
        """The ``(n,)`` current losses: the scoring pass's (``batch.losses``)."""
        return batch.losses


@register_strategy("stale-rho-loss")
class StaleRhoLoss(StaleStatistics, RhoLoss):
    """``rho-loss`` on the cached losses: each row's current loss is the one the last forward pass that saw it
    computed; only rows not seen for ``sbp_max_staleness`` epochs are scored."""

    description = "RHO-LOSS on cached losses: scores only rows not seen for sbp_max_staleness epochs"
    settings = RhoLoss.settings + STALE_SETTINGS

    def losses(self, batch: SelectionBatch) -> torch.Tensor:
        return batch.cached.losses
