"""``loss``: the prior art, loss-based Selective Backprop (Composer's rank rule or Jiang et al.'s CDF rule)."""

from __future__ import annotations

from typing import Any

import torch

from ..core.selection import LossHistory, loss_cdf_sample, loss_rank_sample
from .base import SelectionBatch, SelectionStrategy, register_strategy


@register_strategy("loss")
class LossBased(SelectionStrategy):
    """Higher losses are more likely to be backpropagated; every selected row has weight 1.

    ``sbp_loss_variant="composer"`` (MosaicML Composer): exactly ``k`` rows drawn without replacement with probability
    proportional to ``rank_percentile ** (1/keep - 1)``. ``"jiang"`` (Jiang et al. 2019): keep each row with
    probability ``max(p_min, CDF(loss) ** beta)`` over the last ``sbp_loss_history_size`` losses seen, so the subset
    size varies; the history is part of the checkpoint.
    """

    needs_scoring = True
    description = "loss-based selective backprop: high-loss rows are more likely to be backpropagated"
    settings = ("sbp_loss_variant", "sbp_loss_beta", "sbp_loss_history_size", "sbp_loss_min_prob", "sbp_head_module")

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.history = LossHistory(args.sbp_loss_history_size)

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        losses = self.losses(batch)
        if self.args.sbp_loss_variant == "composer":
            indices = loss_rank_sample(losses, k, batch.generator)
        else:
            # Jiang et al.: the current batch enters the history before its CDF is read.
            self.history.push(losses)
            indices = loss_cdf_sample(
                losses,
                self.history.values(),
                self.args.sbp_effective_loss_beta,
                self.args.sbp_loss_min_prob,
                batch.generator,
            )
        return indices, torch.ones(indices.numel())

    def losses(self, batch: SelectionBatch) -> torch.Tensor:
        """The ``(n,)`` losses the rule ranks: the scoring pass's (``batch.losses``)."""
        return batch.losses

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state["history"])
