"""``gradmatch``: a weighted subset whose last-layer gradient matches the batch's mean gradient (OMP)."""

from __future__ import annotations

from typing import Any

import torch

from ..core.omp import normalize_weights, omp_gram, prepare_omp, sum_constrained_problem
from ..core.selection import random_subset
from .base import SelectionBatch, SelectionStrategy, register_strategy


@register_strategy("gradmatch")
class GradientMatching(SelectionStrategy):
    """Orthogonal Matching Pursuit on the Gram matrix of the batch's last-layer gradients (Balles, Archambeau and
    Zappella 2023, after Killamsetty et al.'s GRAD-MATCH 2021): up to ``k`` rows with non-negative weights whose
    weighted gradient fits the batch's mean gradient, the weights then scaled by ``sbp_weight_normalization``."""

    needs_scoring = True
    weighted = True
    description = "OMP picks a weighted subset whose last-layer gradient matches the batch's mean gradient"
    settings = (
        "sbp_weight_normalization",
        "sbp_omp_ridge",
        "sbp_omp_nonnegative",
        "sbp_omp_tol",
        "sbp_omp_batch",
        "sbp_omp_impl",
        "sbp_head_module",
    )

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        # OMP's compiled loop, for the dtype of the matrix select() passes it: compiled (at its first use on a
        # machine) or loaded now, when the trainer is built, rather than within the first training step.
        prepare_omp(torch.float64 if args.sbp_weight_normalization == "sum_constrained" else torch.float32)

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if k >= batch.n:  # keep 1.0: the batch is the subset, each row with weight 1 (OMP could stop early)
            return torch.arange(batch.n), torch.ones(batch.n)
        gram = self.gram(batch)
        # The ridge is relative to the gradients' mean squared norm, so it does not depend on the loss's scale.
        ridge = self.args.sbp_omp_ridge * float(torch.diagonal(gram).double().mean())
        mode = self.args.sbp_weight_normalization
        target = {}
        if mode == "sum_constrained":
            gram, target["target_corr"], target["target_sq_norm"] = sum_constrained_problem(gram)
        elif batch.__dict__.get("gram") is gram:  # batch.gram (cached; a subclass may use another matrix)
            # The batch mean's correlations, which the trainer's match error reads too.
            target["target_corr"], target["target_sq_norm"] = batch.gram_target
        nonnegative, tol = self.args.sbp_omp_nonnegative, self.args.sbp_omp_tol or None
        per_step = self.args.sbp_omp_batch  # examples added per OMP step
        impl = self.args.sbp_omp_impl  # auto: on the Gram matrix's device when that is CUDA or XPU
        result = omp_gram(gram, k, ridge=ridge, nonnegative=nonnegative, tol=tol, batch=per_step, impl=impl, **target)
        if result.indices.numel() == 0:
            # The batch's mean gradient is zero (or every gradient is): any subset matches it equally well.
            return random_subset(batch.n, k, batch.generator), torch.ones(k)
        return result.indices, normalize_weights(result.weights, "subset_size" if mode == "sum_constrained" else mode)

    def gram(self, batch: SelectionBatch) -> torch.Tensor:
        """The ``(n, n)`` Gram matrix OMP works on: the scoring pass's (``batch.gram``)."""
        return batch.gram
