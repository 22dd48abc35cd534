"""Part ``padding``, ``padding.json``: what length-aware re-padding (``sbp_trim_padding``) saves, on real batches
with dynamic padding (``DataCollatorWithPadding``, rows truncated to ``--seq_len``), per dataset of ``--datasets``.

One row per dataset and strategy (``random``, ``gradmatch``, ``loss`` at keep 0.5, where registered and in
``--strategies``): the mean padding tokens per subset without and with trimming (and the subset's columns), counted
over the selections of ``--repeats`` batches; and the training step's median time with ``sbp_trim_padding`` False
and True, timed side by side: per repeat, every strategy's step without and with trimming (the order alternating
between repeats) on the same batch and the same model (SGD with learning rate 0 keeps it fixed), after one warm-up
round. The full batch's step (``none``) is timed in the same rounds, as the reference. Each step is timed in
wall-clock seconds and in this process's CPU seconds (``time.process_time``, all threads): on a machine shared with
other work the CPU time is the steadier of the two; ``load_average_1min`` (before and after the timing rounds) says
how busy the machine was. The ratios ``*_paired_*`` are medians of per-batch ratios. (A shortened scoring pass,
``sbp_scoring_max_length``, is measured by the throughput and grad-match parts, as strategy variants.)
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from ..core.padding import trim_padding
from ..core.selection import index_rows
from .common import FULL_BATCH, BenchmarkContext, Data, collated_batches, load_model, make_trainer, timed_training_step

PADDING_STRATEGIES = ("random", "gradmatch", "loss")
"""The strategies whose subsets are trimmed, when they are registered and in ``--strategies``."""
PADDING_KEEP = 0.5


def command_line(ctx: BenchmarkContext) -> str:
    """The command that reproduces this part's numbers (the options it depends on, spelled out)."""
    bench = ctx.bench
    threads = os.environ.get("OMP_NUM_THREADS")  # torch's thread count, when the command line set it
    parts = [f"OMP_NUM_THREADS={threads}"] if threads else []
    parts += ["python scripts/benchmark.py padding"] + (["--quick"] if bench.quick else [])
    if bench.train_file:
        parts += ["--train_file", bench.train_file]
    else:
        parts += ["--datasets", bench.datasets]
    parts += ["--model_name_or_path", bench.model_name_or_path, "--seq_len", str(bench.seq_len)]
    parts += ["--batch_size", str(bench.batch_size), "--repeats", str(bench.repeats)]
    parts += ["--device", bench.device]
    return " ".join(parts)


def padding_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(padding tokens, columns)`` of a batch: the masked positions, and the width every row is padded to."""
    mask = batch["attention_mask"]
    return int((mask == 0).sum()), int(mask.shape[1])


def _subset_tokens(ctx: BenchmarkContext, model: PreTrainedModel, strategy: str, batches: list) -> dict[str, float]:
    """Mean padding tokens and columns of the subsets ``strategy`` selects from ``batches``, untrimmed and trimmed."""
    bench = ctx.bench
    trainer = make_trainer(model, strategy, PADDING_KEEP, bench.batch_size, bench.device, ctx.scratch_dir)
    counts = defaultdict(list)
    for batch in batches:
        n = batch["labels"].shape[0]
        indices, _ = trainer.select_batch(model, batch)
        subset = index_rows(batch, indices, n)
        for name, rows in (("untrimmed", subset), ("trimmed", trim_padding(subset))):
            padding, columns = padding_tokens(rows)
            counts[f"pad_tokens_{name}"].append(padding)
            counts[f"columns_{name}"].append(columns)
        counts["real_tokens"].append(int(subset["attention_mask"].sum()))
        counts["batch_pad_tokens"].append(padding_tokens(batch)[0])
        counts["batch_columns"].append(padding_tokens(batch)[1])
    return {f"mean_{key}": float(np.mean(values)) for key, values in counts.items()}


def _trimming_timings(times: dict[Any, list[float]], cpu: dict[Any, list[float]], strategy: str) -> dict[str, Any]:
    """The step times of ``strategy`` without and with trimming (wall-clock and CPU), their ratios paired per batch
    (both settings ran on the same batch, one right after the other) and the ratios' quartiles."""
    off, on = (strategy, False), (strategy, True)
    untrimmed, trimmed = statistics.median(times[off]), statistics.median(times[on])
    paired = [t / u for u, t in zip(times[off], times[on], strict=True)]
    paired_cpu = [t / u for u, t in zip(cpu[off], cpu[on], strict=True)]
    return {
        "step_s_untrimmed": untrimmed,
        "step_s_trimmed": trimmed,
        "step_ratio_trimmed": trimmed / untrimmed,
        "step_ratio_paired_median": statistics.median(paired),
        "step_ratio_paired_quartiles": [float(q) for q in np.percentile(paired, [25, 75])],
        "step_cpu_s_untrimmed": statistics.median(cpu[off]),
        "step_cpu_s_trimmed": statistics.median(cpu[on]),
        "step_cpu_ratio_paired_median": statistics.median(paired_cpu),
        "step_cpu_ratio_paired_quartiles": [float(q) for q in np.percentile(paired_cpu, [25, 75])],
    }


def run_repadding(ctx: BenchmarkContext, name: str, data: Data, command: str) -> list[dict[str, Any]]:
    """The rows of ``padding.json`` for one dataset."""
    bench = ctx.bench
    strategies = [s for s in bench.strategy_names if s in PADDING_STRATEGIES]  # registration order
    model = load_model(ctx.model_path, data.num_labels, 0, bench.device)
    batches = collated_batches(data.splits["train"], ctx.tokenizer, bench.batch_size, bench.repeats, bench.device)
    tokens = {strategy: _subset_tokens(ctx, model, strategy, batches) for strategy in strategies}
    trainers = {
        (strategy, trim): make_trainer(
            model, strategy, PADDING_KEEP, bench.batch_size, bench.device, ctx.scratch_dir, sbp_trim_padding=trim
        )
        for strategy in strategies
        for trim in (False, True)
    }
    full = make_trainer(model, FULL_BATCH, 1.0, bench.batch_size, bench.device, ctx.scratch_dir)
    # SGD with a zero learning rate keeps the model fixed, so that both settings time the same model.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    load = [os.getloadavg()[0]]
    times: dict[Any, list[float]] = defaultdict(list)  # wall-clock seconds
    cpu: dict[Any, list[float]] = defaultdict(list)  # this process's CPU seconds (all threads)

    def timed_step(key, trainer, batch, keep: bool) -> None:
        wall_s, cpu_s = timed_training_step(trainer, model, batch, optimizer, bench.device)
        if keep:
            times[key].append(wall_s)
            cpu[key].append(cpu_s)

    for repeat in range(bench.repeats + 1):  # the first round warms up and is dropped
        batch = batches[(repeat - 1) % len(batches)]
        order = (False, True) if repeat % 2 == 0 else (True, False)
        for strategy in strategies:
            for trim in order:
                timed_step((strategy, trim), trainers[(strategy, trim)], batch, repeat > 0)
        timed_step(FULL_BATCH, full, batch, repeat > 0)
        if repeat % 5 == 0:
            ctx.progress(f"padding {name} round {repeat}/{bench.repeats}")
    load.append(os.getloadavg()[0])
    full_s = statistics.median(times[FULL_BATCH])
    rows = []
    for strategy in strategies:
        row = {
            "dataset": name,
            "strategy": strategy,
            "keep": PADDING_KEEP,
            "batch_size": bench.batch_size,
            "seq_len": bench.seq_len,
            "device": bench.device,
            "batches": len(batches),
            **tokens[strategy],
            **_trimming_timings(times, cpu, strategy),
            "full_step_s": full_s,
            "full_step_cpu_s": statistics.median(cpu[FULL_BATCH]),
            "repeats": bench.repeats,
            "load_average_1min": load,
            "command": command,
        }
        row["pad_tokens_saved"] = row["mean_pad_tokens_untrimmed"] - row["mean_pad_tokens_trimmed"]
        rows.append(row)
        ctx.progress(
            f"padding {name} {strategy}@{PADDING_KEEP}: padding tokens per subset "
            f"{row['mean_pad_tokens_untrimmed']:.0f} -> {row['mean_pad_tokens_trimmed']:.0f} "
            f"(of {row['mean_real_tokens']:.0f} real), step "
            f"{row['step_s_untrimmed']:.3f} -> {row['step_s_trimmed']:.3f} s "
            f"(paired {row['step_ratio_paired_median']:.3f} x, "
            f"CPU time {row['step_cpu_ratio_paired_median']:.3f} x; load {load[0]:.1f}, {load[1]:.1f})"
        )
    return rows


def run_padding(ctx: BenchmarkContext) -> list[dict[str, Any]]:
    """The rows of ``padding.json``, dataset by dataset."""
    command = command_line(ctx)
    rows = []
    for name, spec in ctx.bench.dataset_specs():
        rows += run_repadding(ctx, name, Data(spec, ctx.tokenizer, ctx.bench.seq_len), command)
    return rows
