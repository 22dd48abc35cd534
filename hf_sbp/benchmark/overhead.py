"""Part 1, ``overhead.json``: what selection adds to a batch, against the no-grad scoring forward it follows."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from transformers import PreTrainedModel

from .. import SelectiveBackpropTrainer
from ..head import HeadCapture
from ..selection import index_rows
from .common import OVERHEAD_STRATEGY, BenchmarkContext, Data, fixed_batches, load_model, make_trainer, sync


def hook_cost_s(
    model: PreTrainedModel, trainer: SelectiveBackpropTrainer, batch: dict[str, torch.Tensor], repeats: int = 200
) -> float:
    """What the capture hook adds to one forward: the head called with and without it (seconds)."""
    head = dict(model.named_modules())[trainer.head_name]
    features = trainer.score_batch(model, batch).features
    capture = HeadCapture([(trainer.head_name, head)])
    with torch.no_grad():
        timings = {}
        for hooked in (False, True):
            start = time.perf_counter()
            for _ in range(repeats):
                if hooked:
                    with capture.capturing():
                        head(features)
                else:
                    head(features)
            timings[hooked] = (time.perf_counter() - start) / repeats
    return max(0.0, timings[True] - timings[False])


def run_overhead(ctx: BenchmarkContext, data: Data) -> list[dict[str, Any]]:
    """Median forward and selection times per batch size and keep (rows of ``overhead.json``)."""
    bench = ctx.bench
    model = load_model(ctx.model_path, data.num_labels, 0, bench.device).eval()
    batch_sizes = [16, 32, 64] if bench.quick else [16, 32, 64, 128, 256]
    rows = []
    for batch_size in batch_sizes:
        batches = fixed_batches(data.splits["train"], ctx.tokenizer, batch_size, bench.seq_len, 2, bench.device)
        for keep in bench.keep_values if bench.quick else sorted({0.25, 0.5, *bench.keep_values}):
            trainer = make_trainer(model, OVERHEAD_STRATEGY, keep, batch_size, bench.device, ctx.scratch_dir)
            trainer.select_batch(model, batches[0])  # resolve the head, warm up
            hook_s = hook_cost_s(model, trainer, batches[0])
            forward, selection = [], []
            for repeat in range(bench.repeats):
                batch = batches[repeat % 2]
                forward_inputs = {k: v for k, v in batch.items() if k != "labels"}
                sync(bench.device)
                start = time.perf_counter()
                with torch.no_grad():
                    model(**forward_inputs)
                sync(bench.device)
                forward.append(time.perf_counter() - start)
                indices, _ = trainer.select_batch(model, batch)
                start = time.perf_counter()
                index_rows(batch, indices, batch_size)
                sync(bench.device)
                selection.append(trainer.last_selection.selection_s + time.perf_counter() - start + hook_s)
            row = {
                "batch_size": batch_size,
                "seq_len": bench.seq_len,
                "keep": keep,
                "device": bench.device,
                "forward_s": statistics.median(forward),
                "selection_s": statistics.median(selection),
            }
            rows.append(row)
            ctx.progress(
                f"overhead b={batch_size} keep={keep}: forward {row['forward_s'] * 1e3:.1f} ms, selection "
                f"{row['selection_s'] * 1e3:.2f} ms ({100 * row['selection_s'] / row['forward_s']:.2f}%)"
            )
    return rows
