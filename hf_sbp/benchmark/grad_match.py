"""Part 3, ``grad_match.json``: how well each strategy's subset gradient matches the batch mean gradient, measured
with autograd (the whole model and the last layer) along a full-batch training run, on a classification task and on
a regression task built from the same text.

What is measured is the gradient a selective step actually trains: the trainer's subset loss is
``(1/m) sum_S w_i l_i`` (:mod:`hf_sbp.subset_loss`), so its gradient is ``(1/m) sum_S w_i g_i``, magnitude included,
with the weights that :meth:`~hf_sbp.SelectiveBackpropTrainer.select_batch` returns. ``gradmatch`` is measured in
every ``sbp_weight_normalization`` mode, beside the unweighted strategies and the variants of ``--probe_variants``
(by default a shortened scoring pass, ``sbp_scoring_max_length``).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from datasets import Value
from transformers import DataCollatorWithPadding, PreTrainedModel

from ..config import WEIGHT_NORMALIZATIONS
from ..core.selection import index_rows, per_example_loss
from ..strategies import strategy_class
from .common import (
    BenchmarkContext,
    Data,
    collated_batches,
    load_model,
    make_trainer,
    parse_variant,
    per_batch,
)

TASKS = ("classification", "regression")
"""The tasks of the part: the dataset's own labels, and :func:`regression_data`'s continuous target."""
PROBLEM_TYPES = {"classification": "single_label_classification", "regression": "regression"}
WEIGHTED_STRATEGY = "gradmatch"
"""The strategy measured once per ``sbp_weight_normalization`` mode."""
REGRESSION_NOISE = 0.25
"""Standard deviation of the Gaussian noise in :func:`regression_data`'s target."""


def flat_grad(model: PreTrainedModel, names: list[str] | None = None) -> torch.Tensor:
    """The parameters' ``.grad`` (those named in ``names``, or all) as one float64 vector."""
    grads = [
        p.grad.reshape(-1) for n, p in model.named_parameters() if p.grad is not None and (names is None or n in names)
    ]
    return torch.cat(grads).double()


def trained_gradient(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    indices: torch.Tensor,
    weights: torch.Tensor,
    problem_type: str,
) -> None:
    """The gradient of the subset loss a selective step trains, ``(1/m) sum_S w_i l_i`` with ``m = |S|`` (its
    magnitude included), into the parameters' ``.grad``. With every row and weights 1 it is the gradient of the
    batch's mean loss, the target of gradient matching.

    Args:
        model: a sequence classifier, in the mode (train or eval) the caller chose.
        batch: a collated batch on the model's device, with ``labels``.
        indices: the subset's rows.
        weights: their loss weights as the trainer uses them (``select_batch``'s), one per row of ``indices``.
        problem_type: the loss family, as in :func:`~hf_sbp.core.selection.per_example_loss`.
    """
    model.zero_grad(set_to_none=True)
    rows = index_rows(batch, indices, batch["labels"].shape[0])
    labels = rows.pop("labels")
    losses = per_example_loss(model(**rows).logits, labels, problem_type)
    w = weights.to(losses.device, losses.dtype)
    ((w * losses).sum() / losses.numel()).backward()


def relative_error(subset: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``||subset - target|| / ||target||``, and the two numbers it is made of: the cosine between the vectors and
    the ratio of their norms (an error from a wrong length shows as a norm ratio away from 1 at a high cosine)."""
    target_norm, subset_norm = torch.linalg.norm(target), torch.linalg.norm(subset)
    return {
        "rel_error": float(torch.linalg.norm(subset - target) / target_norm),
        "cosine": float(subset @ target / (subset_norm * target_norm)),
        "norm_ratio": float(subset_norm / target_norm),
    }


def regression_data(data: Data, seed: int = 0) -> Data:
    """A regression task on ``data``'s text: the target of each example is ``y = c + 0.5 t + 0.25 e``, where ``c`` is
    its class id, ``t`` the standardised log of its token count (after truncation; ``data`` is not padded) and ``e``
    standard Gaussian noise drawn under ``seed``. Like real regression targets (ratings, STS-B's 0 to 5), it is not
    centred, and part of it (length, and for ordered classes such as sentiment, the class) can be read from the text.

    Returns:
        A copy of ``data`` whose splits' ``labels`` are float32 targets and whose ``num_labels`` is 1.
    """
    rng = np.random.default_rng(seed)
    lengths = np.log(np.array([len(ids) for ids in data.splits["train"]["input_ids"]], dtype=float))
    mean, std = float(lengths.mean()), float(lengths.std()) or 1.0
    out = copy.copy(data)
    out.num_labels, out.label_names = 1, None
    out.splits = {}
    for name, split in data.splits.items():
        noise = rng.standard_normal(len(split))

        def target(batch: dict[str, list], indices: list[int], noise: np.ndarray = noise) -> dict[str, list[float]]:
            standard = (np.log([len(ids) for ids in batch["input_ids"]]) - mean) / std
            y = np.asarray(batch["labels"], float) + 0.5 * standard + REGRESSION_NOISE * noise[indices]
            return {"labels": y.astype(np.float32).tolist()}

        # float32, the logits' dtype: the model's MSE loss does not promote a float64 target.
        out.splits[name] = split.map(target, batched=True, with_indices=True).cast_column("labels", Value("float32"))
    return out


def measured_strategies(strategies: list[str]) -> list[tuple[str, str | None]]:
    """``(strategy, weight normalisation)`` pairs: ``gradmatch`` once per mode of ``sbp_weight_normalization``, every
    other strategy once (``None``: it does not weight its rows). Strategies that select from a per-example cache are
    left out: the probe batches are held-out rows with no dataset index and no cached statistics."""
    pairs = []
    for strategy in strategies:
        if getattr(strategy_class(parse_variant(strategy)[0]), "uses_example_cache", False):
            continue
        if strategy == WEIGHTED_STRATEGY:
            pairs.extend((strategy, mode) for mode in WEIGHT_NORMALIZATIONS)
        else:
            pairs.append((strategy, None))
    return pairs


def _summary(values: list[dict[str, float]]) -> dict[str, Any]:
    errors = [v["rel_error"] for v in values]
    return {
        "rel_error": float(np.mean(errors)),
        "rel_error_median": float(np.median(errors)),
        "rel_error_std": float(np.std(errors)),
        "cosine": float(np.mean([v["cosine"] for v in values])),
        "norm_ratio": float(np.mean([v["norm_ratio"] for v in values])),
        "batches": len(values),
        "rel_errors": errors,  # per probe batch, for medians over batches and steps
    }


def _grad_match_row(
    task: str, problem_type: str, key: tuple[str, str | None, float], layer: str, step: int,
    values: list[dict[str, float]],
    info: list[dict[str, float]],
) -> dict[str, Any]:  # fmt: skip
    """A row of ``grad_match.json``: one strategy's errors at one step on one layer set, over the probe batches."""
    strategy, mode, keep = key
    return {
        "task": task,
        "problem_type": problem_type,
        "strategy": strategy,
        "weight_normalization": mode,
        "keep": keep,
        "layer": layer,
        "step": step,
        **_summary(values),
        # sum_S w_i / m: the trained gradient's scale against a weighted mean of the subset's.
        "mean_weight": float(np.mean([d["mean_weight"] for d in info])),
        "subset_size": float(np.mean([d["subset_size"] for d in info])),
        # The trainer's own logged estimate (from the Gram matrix): equals the last layer's error.
        "gram_error": float(np.mean([d["gram_error"] for d in info])) if layer == "last" else None,
    }


def full_batch_step(
    model: PreTrainedModel, train: Any, collate: Any, optimizer: torch.optim.Optimizer, step: int, bench: Any
) -> None:
    """One plain full-batch training step of the run along which the errors are measured: the ``step``-th window of
    ``bench.batch_size`` rows of ``train``, collated, forward, backward, optimizer step."""
    model.train()
    start = (step * bench.batch_size) % max(1, len(train) - bench.batch_size)
    batch = collate([train[i] for i in range(start, start + bench.batch_size)])
    batch = {k: v.to(bench.device) for k, v in batch.items()}
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()


def run_task(ctx: BenchmarkContext, data: Data, task: str) -> list[dict[str, Any]]:
    """Along a full-batch training run of ``task``, every measured strategy's trained subset gradient against the
    batch mean gradient on held-out batches, at four steps (rows of ``grad_match.json``)."""
    bench = ctx.bench
    problem_type = PROBLEM_TYPES[task]
    model = load_model(ctx.model_path, data.num_labels, 0, bench.device)
    model.config.problem_type = problem_type
    train = data.splits["train"].shuffle(seed=0)
    steps = bench.train_steps
    checkpoints = sorted({0, steps // 3, 2 * steps // 3, steps})
    probe_count = 2 if bench.quick else 8
    probe = collated_batches(
        data.splits["validation"], ctx.tokenizer, bench.batch_size, probe_count, bench.device, bench.seq_len
    )
    collate = DataCollatorWithPadding(ctx.tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=bench.learning_rate)
    pairs = measured_strategies(per_batch(bench.probe_strategy_names))
    trainers = {}
    for keep in bench.keep_values:
        for strategy, mode in pairs:
            extra = {"sbp_weight_normalization": mode} if mode is not None else {}
            trainers[(strategy, mode, keep)] = make_trainer(
                model, strategy, keep, bench.batch_size, bench.device, ctx.scratch_dir, sbp_diagnostic_scoring=True,
                **extra,
            )  # fmt: skip
    head_params = None
    rows = []
    for step in range(steps + 1):
        if step in checkpoints:
            measured = defaultdict(list)
            details = defaultdict(list)
            model.eval()  # compare gradients without dropout noise, as the scoring pass sees the model
            for batch in probe:
                n = batch["labels"].shape[0]
                if head_params is None:
                    some = next(iter(trainers.values()))
                    some.score_batch(model, batch)  # finds the head, without drawing from the selection generator
                    head_params = [f"{some.head_name}.weight", f"{some.head_name}.bias"]
                trained_gradient(model, batch, torch.arange(n), torch.ones(n), problem_type)
                full = {"full": flat_grad(model), "last": flat_grad(model, head_params)}
                for key, trainer in trainers.items():
                    indices, weights = trainer.select_batch(model, batch)
                    model.eval()
                    trained_gradient(model, batch, indices, weights, problem_type)
                    sub = {"full": flat_grad(model), "last": flat_grad(model, head_params)}
                    for layer in ("full", "last"):
                        measured[(*key, layer)].append(relative_error(sub[layer], full[layer]))
                    gram_error = trainer.last_selection.grad_match_error
                    details[key].append(
                        {
                            "mean_weight": float(weights.double().mean()),
                            "subset_size": indices.numel(),
                            "gram_error": float("nan") if gram_error is None else gram_error,
                        }
                    )
            for (strategy, mode, keep, layer), values in measured.items():
                info = details[(strategy, mode, keep)]
                rows.append(_grad_match_row(task, problem_type, (strategy, mode, keep), layer, step, values, info))
            summary = ", ".join(
                f"{s}{'/' + m if m else ''}@{k}: {np.mean([v['rel_error'] for v in measured[(s, m, k, 'full')]]):.3f}"
                for (s, m, k) in trainers
            )
            ctx.progress(f"grad-match {task} step {step}/{steps} (full-model rel. error) {summary}")
        if step == steps:
            break
        full_batch_step(model, train, collate, optimizer, step, bench)
    return rows


def run_grad_match(ctx: BenchmarkContext, data: Data) -> list[dict[str, Any]]:
    """:func:`run_task` on ``data``'s classification task, then on :func:`regression_data`'s regression task."""
    rows = run_task(ctx, data, "classification")
    return rows + run_task(ctx, regression_data(data), "regression")
