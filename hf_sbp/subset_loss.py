"""The loss of a selective step's subset: the model's own loss, with the selection weights applied when there are
any, and the check that the per-example losses the trainer computes are the model's.

An unweighted subset (``random``, ``loss``) trains with exactly the loss the model, ``compute_loss_func`` or the
label smoother computes on its rows: a smaller batch. A weighted subset (``gradmatch``) trains with
``c (1/m) sum_S w_i l_i``, where ``l_i`` are the per-example losses and ``c`` (held constant) is the model's loss over
``mean(l_i)``: with weights all 1 that is the model's loss, value and gradient, whatever its normalisation (a mean,
or a sum over ``num_items_in_batch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .selection import per_example_loss


@dataclass
class SubsetStep:
    """What ``compute_loss`` needs to know about the subset of the current selective training step."""

    labels: torch.Tensor
    problem_type: str | None
    weights: torch.Tensor | None
    """The rows' loss weights, or ``None`` when they are all 1."""
    verify: bool = False
    """Check the model's loss against the per-example losses (the first step that computes them)."""
    applied: bool = False
    """Whether ``SelectiveBackpropTrainer.compute_loss`` applied the weights."""

    def weights_not_applied(self, trainer: str, strategy: str) -> None:
        """Raise the error of a ``compute_loss`` override that dropped the selection weights."""
        raise ValueError(
            f"{trainer}.compute_loss did not apply the selection weights of sbp_strategy={strategy!r}: call "
            "super().compute_loss in your override, or apply trainer.selection_weights and set the class attribute "
            "supports_selection_weights = True."
        )


def example_losses(
    logits: torch.Tensor, labels: torch.Tensor, problem_type: str, label_smoothing: float, strategy: str
):
    """:func:`~hf_sbp.selection.per_example_loss`, or a clear error for outputs that are not one row of logits per
    example (a language model's, a token classifier's)."""
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"sbp_strategy={strategy!r} computes one loss per example from (n, num_labels) logits, but the model "
            f"returns logits of shape {tuple(logits.shape)} for labels of shape {tuple(labels.shape)} (problem type "
            f"{problem_type!r}). Selective backprop with per-example losses serves sequence classification heads; "
            "use sbp_strategy='random' or 'none', which train with the model's own loss."
        )
    return per_example_loss(logits, labels, problem_type, label_smoothing)


def loss_check_tolerance(model_loss: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[float, float]:
    """``(rel_tol, abs_tol)`` of :func:`verify_model_loss`: the round-off of the least precise of the model's loss and
    logits. In float32, 2e-3 and 1e-5. In a lower precision (a model in bfloat16 or float16) the model computes its
    loss in that precision while the per-example losses are computed in float32, so they differ by its round-off:
    measured up to 1.3 ``eps`` relative for a bfloat16 ``BertForSequenceClassification`` (16 seeds, logits scaled up to
    100x), hence 4 ``eps`` relative, and ``4 eps (1 + max |z|)`` absolute for the cancellation in ``z_y - logsumexp(z)``
    of a small loss. Wrong losses (another loss family, a sum for a mean) differ by far more."""
    floating = [t.dtype for t in (model_loss, logits) if t is not None and t.dtype.is_floating_point]
    eps = max((torch.finfo(dtype).eps for dtype in floating), default=0.0)
    scale = 1.0 + (float(logits.detach().abs().max()) if logits is not None and logits.numel() else 0.0)
    return max(2e-3, 4 * eps), max(1e-5, 4 * eps * scale)


def verify_model_loss(
    model_loss: torch.Tensor,
    losses: torch.Tensor,
    problem_type: str,
    num_items_in_batch: Any = None,
    processes: int = 1,
    logits: torch.Tensor | None = None,
) -> None:
    """Raise unless the model's own loss is the mean of the per-example ``losses`` or their sum over
    ``num_items_in_batch``, up to round-off in the precision of the model's loss and ``logits`` (the model's, which
    the losses were computed from; see :func:`loss_check_tolerance`); either may be multiplied by the number of
    processes (what ``Trainer`` does with ``average_tokens_across_devices``)."""
    value = float(model_loss.detach().float().mean())
    losses = losses.detach()
    expected = [float(losses.mean())]
    if num_items_in_batch is not None:
        expected.append(float(losses.sum()) / float(num_items_in_batch))
    candidates = [e * scale for e in expected for scale in {1, processes}]
    rel_tol, abs_tol = loss_check_tolerance(model_loss, logits)
    if any(math.isclose(value, e, rel_tol=rel_tol, abs_tol=abs_tol) for e in candidates):
        return
    raise ValueError(
        f"the model's own loss ({value:.6g}) is not the mean of the per-example losses that selective backprop "
        f"computes for problem type {problem_type!r} ({expected[0]:.6g}), so selecting or weighting by them would "
        "train with a different loss than the model's. Set config.problem_type ('single_label_classification', "
        "'multi_label_classification' or 'regression') if that one was inferred wrongly, use sbp_strategy='random' "
        "or 'none' (which train with the model's own loss), or register a strategy that fits this model."
    )


def weighted_subset_loss(model_loss: torch.Tensor, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``c (1/m) sum_S w_i l_i`` with ``c = model_loss / mean(l_i)`` held constant (1 if the mean is 0)."""
    mean = losses.mean()
    scale = (model_loss / mean).detach() if bool(mean != 0) else 1.0
    return scale * (weights.to(losses.device, losses.dtype) * losses).sum() / losses.numel()


def subset_num_items(num_items_in_batch: Any, subset_labels: torch.Tensor, labels: torch.Tensor) -> Any:
    """The subset's share of ``num_items_in_batch`` (counted by ``Trainer`` on the full batches): the count times the
    subset's items over the batch's, so that a model that divides its summed loss by the count keeps the scale of a
    full micro-batch."""
    if num_items_in_batch is None:
        return None
    return num_items_in_batch * (subset_labels.ne(-100).sum() / labels.ne(-100).sum())
