"""``none``: no selection; every step is ``transformers.Trainer``'s own."""

from __future__ import annotations

import torch

from .base import SelectionBatch, SelectionStrategy, register_strategy


@register_strategy("none")
class FullBatch(SelectionStrategy):
    """The plain ``Trainer``: the trainer delegates each step to ``Trainer.training_step`` unchanged."""

    selective = False
    description = "no selection: the plain Trainer, every batch backpropagated in full"

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(batch.n), torch.ones(batch.n)
