"""The loss of a selective step's subset: the model's own loss, with the selection weights applied when there are
any, and the check that the per-example losses the trainer computes are the model's.

An unweighted subset (``random``, ``loss``) trains with exactly the loss the model, ``compute_loss_func`` or the
label smoother computes on its rows: a smaller batch. A weighted subset (``gradmatch``) trains with
``c (1/m) sum_S w_i l_i``, where ``l_i`` are the per-example losses and ``c`` (held constant) is the model's loss over
``mean(l_i)``: with weights all 1 that is the model's loss, value and gradient, whatever its normalisation (a mean,
or a sum over ``num_items_in_batch``).

With a ``compute_loss_func`` (the ``Trainer`` argument), the per-example loss ``l_i`` is that function on row ``i``
alone (:func:`custom_example_losses`), and the loss it returns on the batch is checked to be their mean (or their
sum over ``num_items_in_batch``) as the model's loss is otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from .core.selection import per_example_loss

COMPUTE_LOSS_FUNC = "compute_loss_func"


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
    logits: torch.Tensor,
    labels: torch.Tensor,
    problem_type: str,
    label_smoothing: float,
    strategy: str,
    compute_loss_func: Callable[..., torch.Tensor] | None = None,
):
    """:func:`~hf_sbp.core.selection.per_example_loss`, or :func:`custom_example_losses` of ``compute_loss_func`` when
    there is one; a clear error for outputs that are not one row of logits per example (a language model's, a token
    classifier's)."""
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"sbp_strategy={strategy!r} computes one loss per example from (n, num_labels) logits, but the model "
            f"returns logits of shape {tuple(logits.shape)} for labels of shape {tuple(labels.shape)} (problem type "
            f"{problem_type!r}). Selective backprop with per-example losses serves sequence classification heads; "
            "use sbp_strategy='random' or 'none', which train with the model's own loss."
        )
    if compute_loss_func is not None:
        return custom_example_losses(compute_loss_func, logits, labels, strategy)
    return per_example_loss(logits, labels, problem_type, label_smoothing)


def custom_example_losses(
    compute_loss_func: Callable[..., torch.Tensor], logits: torch.Tensor, labels: torch.Tensor, strategy: str = ""
) -> torch.Tensor:
    """``(n,)`` float32 per-example losses of a ``Trainer`` ``compute_loss_func``: the function called, as ``Trainer``
    calls it, on each row alone, with an output that holds that row's ``logits`` and ``num_items_in_batch`` that row's
    label count. Differentiable in ``logits``. One call per row: a Python loop, cheap next to a forward pass."""
    rows = []
    for i in range(logits.shape[0]):
        row_labels = labels[i : i + 1]
        try:
            loss = compute_loss_func(
                SequenceClassifierOutput(logits=logits[i : i + 1]),
                row_labels,
                num_items_in_batch=row_labels.ne(-100).sum(),
            )
        except Exception as error:
            raise ValueError(
                f"sbp_strategy={strategy!r} scores, weights or observes each example by its own loss, so it calls "
                f"{COMPUTE_LOSS_FUNC} on one row at a time, with an output that holds only that row's logits; that "
                f"call failed ({error!r}). Make {COMPUTE_LOSS_FUNC} read only outputs.logits, or use "
                "sbp_strategy='random' or 'none', which train with its loss on whole (sub)batches."
            ) from error
        loss = torch.as_tensor(loss)
        if loss.numel() != 1:
            raise ValueError(
                f"{COMPUTE_LOSS_FUNC} returned a loss of shape {tuple(loss.shape)} for one row; it must return a "
                "scalar."
            )
        rows.append(loss.reshape(()).float())
    return torch.stack(rows)


def custom_losses_and_residuals(
    example_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses, residuals)``, float32, of per-example losses ``l_i = example_loss(z, y)_i`` in which each ``l_i``
    depends on row ``z_i`` only: the residuals ``r_i = dl_i/dz_i`` are the gradient of ``sum_i l_i`` (one backward
    through the loss alone, on a detached copy of the logits)."""
    z = logits.detach().float().requires_grad_(True)
    with torch.enable_grad():
        losses = example_loss(z, labels)
        if not losses.requires_grad:  # a loss that does not depend on the logits has no gradient
            return losses.detach(), torch.zeros_like(z)
        (residuals,) = torch.autograd.grad(losses.sum(), z, allow_unused=True)
    return losses.detach(), torch.zeros_like(z) if residuals is None else residuals


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
    custom: bool = False,
    logits: torch.Tensor | None = None,
) -> None:
    """Raise unless the model's own loss (``compute_loss_func``'s, when ``custom``) is the mean of the per-example
    ``losses`` or their sum over ``num_items_in_batch``, up to round-off in the precision of the model's loss and
    ``logits`` (the model's, which the losses were computed from; see :func:`loss_check_tolerance`); either may be
    multiplied by the number of
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
    source = f"{COMPUTE_LOSS_FUNC}'s loss" if custom else "the model's own loss"
    if not all(math.isfinite(v) for v in [value, *expected]):
        # Not a question of which loss: the forward pass produced NaN or infinity.
        raise ValueError(
            f"{source} ({value:.6g}) or the mean of the per-example losses ({expected[0]:.6g}) is not finite: the "
            "forward pass on these examples produced NaN or infinity (check the inputs, the learning rate, the "
            "model's dtype), so the losses cannot be compared."
        )
    if custom:
        raise ValueError(
            f"{source} ({value:.6g}) is not the mean of its per-example losses ({expected[0]:.6g}: "
            f"{COMPUTE_LOSS_FUNC} on each row alone), so selecting or weighting rows by them would train with another "
            f"loss than yours. Selective backprop needs a {COMPUTE_LOSS_FUNC} that is the mean (or the sum over "
            "num_items_in_batch) of one term per example; for another loss (e.g. cross-entropy with class weights, "
            "which divides by the weights' sum) use sbp_strategy='random' or 'none', which train with it as it is."
        )
    raise ValueError(
        f"{source} ({value:.6g}) is not the mean of the per-example losses that selective backprop "
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
