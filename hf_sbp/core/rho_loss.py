"""RHO-LOSS (Mindermann et al., ICML 2022, "Prioritized Training on Points that are Learnable, Worth Learning, and
Not Yet Learnt"): the math, on tensors.

The reducible loss of example ``i`` is its loss under the current model minus its irreducible loss (IL), the loss
of an IL model that never trained on it; each batch keeps its ``k`` rows of largest reducible loss, weight 1. The IL
models here are trained on halves of the training set ("double IL"): the IL of each half comes from the model
trained on the other half, so that the target model still trains on all the data.

A split needs every half to hold at least :data:`MIN_PER_HALF` examples of every class (single-label
classification: each class present needs ``2 x MIN_PER_HALF`` examples; other problems: ``2 x MIN_PER_HALF``
examples in all), so that each IL model sees every class the other half is scored on.
"""

from __future__ import annotations

import torch

from .selection import per_example_loss

MIN_PER_HALF = 2
"""The fewest examples of each class (of any, for regression and multi-label) a half must hold."""


def check_splittable(labels: torch.Tensor, problem_type: str) -> None:
    """Raise ``ValueError`` unless the training set's ``labels`` can be split into two halves with at least
    :data:`MIN_PER_HALF` examples each (of every class present, for single-label classification)."""
    need = 2 * MIN_PER_HALF
    if labels.shape[0] < need:
        raise ValueError(
            f"the training set has {labels.shape[0]} examples; RHO-LOSS trains its irreducible-loss models on two "
            f"halves of it and needs at least {need} ({MIN_PER_HALF} per half). Use a larger training set or another "
            "sbp_strategy."
        )
    if problem_type == "single_label_classification":
        classes, counts = torch.unique(labels.long(), return_counts=True)
        small = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < need}
        if small:
            raise ValueError(
                f"classes {sorted(small)} of the training set have too few examples ({small}); RHO-LOSS splits every "
                f"class between two halves, each needing at least {MIN_PER_HALF} examples of each class (so "
                f"{need} per class) for its irreducible-loss model. Use more data or another sbp_strategy."
            )


def split_halves(
    labels: torch.Tensor, problem_type: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of ``range(len(labels))`` (sorted index tensors) that cover it: a random split, per class
    for single-label classification (stratified, so both halves hold every class)."""
    n = labels.shape[0]
    if problem_type == "single_label_classification":
        groups = [torch.nonzero(labels.long() == c).reshape(-1) for c in torch.unique(labels.long())]
    else:
        groups = [torch.arange(n)]
    first, second = [], []
    for group in groups:
        shuffled = group[torch.randperm(group.numel(), generator=generator)]
        first.append(shuffled[: group.numel() // 2])
        second.append(shuffled[group.numel() // 2 :])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def reducible_loss_top_k(losses: torch.Tensor, irreducible: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows with the largest reducible loss ``losses - irreducible``, in increasing order (ties to the
    lower index)."""
    reducible = (losses.detach().cpu().double() - irreducible.detach().cpu().double()).reshape(-1)
    order = torch.argsort(-reducible, stable=True)
    return order[:k].sort().values


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    problem_type: str,
    num_outputs: int,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> torch.nn.Linear:
    """A linear head ``z = W h + b`` fitted to frozen features by minimising the mean loss of ``problem_type`` plus
    ``(l2 / 2) ||W||^2`` (logistic regression for classification, ridge regression for ``regression``), with
    L-BFGS in float64 from zero. The features are standardised first (folded back into ``W`` and ``b``), so ``l2``
    does not depend on their scale."""
    x = features.detach().double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    y = labels.detach()
    y = y.double() if problem_type != "single_label_classification" else y.long()
    weight = torch.zeros(num_outputs, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_outputs, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = per_example_loss(x @ weight.T + bias, y, problem_type).mean() + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    probe = torch.nn.Linear(x.shape[1], num_outputs)
    with torch.no_grad():  # z = W (h - mean) / std + b = (W / std) h + (b - W mean / std)
        probe.weight.copy_((weight / std).float())
        probe.bias.copy_((bias - (weight / std) @ mean).float())
    return probe
