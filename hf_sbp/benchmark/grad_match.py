"""Part 3, ``grad_match.json``: how well each strategy's weighted subset gradient matches the batch mean gradient,
measured with autograd (the whole model and the last layer) along a full-batch training run."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithPadding, PreTrainedModel

from ..selection import index_rows
from .common import BenchmarkContext, Data, fixed_batches, load_model, make_trainer


def flat_grad(model: PreTrainedModel, names: list[str] | None = None) -> torch.Tensor:
    """The parameters' ``.grad`` (those named in ``names``, or all) as one float64 vector."""
    grads = [
        p.grad.reshape(-1) for n, p in model.named_parameters() if p.grad is not None and (names is None or n in names)
    ]
    return torch.cat(grads).double()


def subset_gradient(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], indices: torch.Tensor, weights: torch.Tensor
) -> None:
    """Gradient of ``sum_S w_i l_i / sum_S w_i`` (the normalised weighted subset loss), into ``.grad``."""
    model.zero_grad(set_to_none=True)
    rows = index_rows(batch, indices, batch["labels"].shape[0])
    labels = rows.pop("labels")
    logits = model(**rows).logits
    w = weights.to(logits.device, torch.float32)
    ((w * F.cross_entropy(logits.float(), labels, reduction="none")).sum() / w.sum()).backward()


def run_grad_match(ctx: BenchmarkContext, data: Data) -> list[dict[str, Any]]:
    """Along a full-batch training run, the strategies' subset gradients against the batch mean gradient, on
    held-out batches at four steps (rows of ``grad_match.json``)."""
    bench = ctx.bench
    model = load_model(ctx.model_path, data.num_labels, 0, bench.device)
    train = data.splits["train"].shuffle(seed=0)
    steps = bench.train_steps
    checkpoints = sorted({0, steps // 3, 2 * steps // 3, steps})
    probe = fixed_batches(
        data.splits["validation"], ctx.tokenizer, bench.batch_size, bench.seq_len, 2 if bench.quick else 4, bench.device
    )
    collate = DataCollatorWithPadding(ctx.tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=bench.learning_rate)
    head_params = None
    rows = []
    trainers = {
        (s, k): make_trainer(model, s, k, bench.batch_size, bench.device, ctx.scratch_dir, sbp_diagnostic_scoring=True)
        for k in bench.keep_values
        for s in bench.strategy_names
    }
    for step in range(steps + 1):
        if step in checkpoints:
            errors = defaultdict(list)
            for batch in probe:
                model.eval()  # compare gradients without dropout noise
                subset_gradient(
                    model, batch, torch.arange(batch["labels"].shape[0]), torch.ones(batch["labels"].shape[0])
                )
                if head_params is None:
                    some = next(iter(trainers.values()))
                    some.score_batch(model, batch)  # finds the head, without drawing from the selection generator
                    head_params = [f"{some.head_name}.weight", f"{some.head_name}.bias"]
                full = {"full": flat_grad(model), "last": flat_grad(model, head_params)}
                for (strategy, keep), trainer in trainers.items():
                    indices, weights = trainer.select_batch(model, batch)
                    model.eval()
                    subset_gradient(model, batch, indices, weights)
                    sub = {"full": flat_grad(model), "last": flat_grad(model, head_params)}
                    for layer in ("full", "last"):
                        err = torch.linalg.norm(sub[layer] - full[layer]) / torch.linalg.norm(full[layer])
                        errors[(strategy, keep, layer)].append(float(err))
            for (strategy, keep, layer), values in errors.items():
                rows.append(
                    {
                        "strategy": strategy,
                        "keep": keep,
                        "layer": layer,
                        "step": step,
                        "rel_error": float(np.mean(values)),
                        "rel_error_std": float(np.std(values)),
                        "batches": len(values),
                    }
                )
            summary = ", ".join(
                f"{s}@{k}: {np.mean(errors[(s, k, 'full')]):.3f}"
                for k in bench.keep_values
                for s in bench.strategy_names
            )
            ctx.progress(f"grad-match step {step}/{steps} (full-model rel. error) {summary}")
        if step == steps:
            break
        model.train()
        start = (step * bench.batch_size) % max(1, len(train) - bench.batch_size)
        batch = collate([train[i] for i in range(start, start + bench.batch_size)])
        batch = {k: v.to(bench.device) for k, v in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    return rows
