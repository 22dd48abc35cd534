"""Where a batch's labels are and which loss family they make: the per-batch checks of every selective step.

The trainer reads a batch's labels with :func:`batch_labels` and its problem type with :func:`batch_problem_type`
at every step (``config.problem_type`` is set by the model's first forward, and a batch's label dtype decides the
rest, so neither can be fixed once when the trainer is built); :data:`LABEL_COLUMNS` are the dataset columns that
hold labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .core.selection import infer_problem_type

LABEL_COLUMNS = ("labels", "label", "label_ids")
"""The dataset columns that may hold the labels (``transformers``' default collator turns ``label`` and ``label_ids``
into the batch's ``labels``)."""


def model_config(model: torch.nn.Module, strategy: str):
    """The model's ``config``, which selection needs for ``num_labels``; a clear error without one."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_labels", None) is None:
        raise ValueError(
            f"sbp_strategy={strategy!r} needs a model with a `config.num_labels` (a transformers "
            "*ForSequenceClassification model); use sbp_strategy='none' for other models."
        )
    return config


def batch_labels(inputs: Mapping[str, Any], key: str = "labels") -> torch.Tensor:
    """The batch's labels (under ``key``, the trainer's first ``label_names``), one row per example; a clear error
    when the collator returned none."""
    if inputs.get(key) is None:
        raise ValueError(
            f"the batch has no {key!r} (its keys are {sorted(inputs)}); selective backprop selects rows by their "
            "labels' rows and scores them by their loss, so the collator must return labels (see label_names)."
        )
    labels = inputs[key]
    if labels.dim() == 0 or labels.shape[0] == 0:
        raise ValueError(f"the batch's labels have shape {tuple(labels.shape)}; expected one row per example.")
    return labels


def batch_problem_type(config, labels: torch.Tensor, label_smoothing: float) -> str:
    """The loss family of the batch (the rule of ``transformers``' sequence classifiers), checked for what the
    per-example loss cannot serve: labels of the wrong shape, class ids outside ``[0, num_labels)`` (the ignore
    index included), and label smoothing outside single-label classification."""
    problem_type = infer_problem_type(config.num_labels, labels, config.problem_type)
    n, classes, shape = labels.shape[0], config.num_labels, tuple(labels.shape)
    if problem_type == "single_label_classification":
        if labels.dim() != 1:
            raise ValueError(
                f"the batch's labels have shape {shape}, but sequence classification with class ids needs one label "
                "per example, (n,). Per-token labels (token classification) have no per-example loss here: use "
                "sbp_strategy='random' or 'none', which train with the model's own loss."
            )
        low, high, ignored = torch.stack([labels.min(), labels.max(), (labels == -100).sum()]).tolist()
        if ignored:
            raise ValueError(
                "the batch's labels contain the ignore index -100; every example needs a label for selective "
                "backprop (filter unlabelled rows out of the training set)."
            )
        if low < 0 or high >= classes:
            raise ValueError(
                f"the batch has label id {low if low < 0 else high}, outside [0, {classes}) for num_labels={classes}; "
                "class ids must be 0 .. num_labels - 1 (set num_labels to the number of classes)."
            )
    elif problem_type == "multi_label_classification" and shape != (n, classes):
        raise ValueError(
            f"float labels of shape {shape} with num_labels={classes} make the problem multi-label classification, "
            f"which needs labels of shape ({n}, {classes}). For class ids use integer labels; for one regression "
            "target set num_labels=1 (or config.problem_type='regression')."
        )
    elif problem_type == "regression" and labels.numel() != n * classes:
        raise ValueError(f"regression labels of shape {shape} do not fit num_labels={classes} outputs per example.")
    if label_smoothing and problem_type != "single_label_classification":
        raise ValueError(
            f"label_smoothing_factor={label_smoothing} applies to single-label classification "
            f"only; these labels make the problem {problem_type!r}."
        )
    return problem_type
