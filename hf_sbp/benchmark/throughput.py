"""Part 2, ``throughput.json``: the training step's time per strategy, and its peak memory in a fresh process."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any

import torch
from transformers import AutoTokenizer

from ..data import resolve_model_name
from ..glue import DataTrainingArguments
from .common import (
    BUDGET_STRATEGY,
    FULL_BATCH,
    BenchmarkArguments,
    BenchmarkContext,
    Data,
    fixed_batches,
    load_model,
    make_trainer,
    strategy_grid,
    sync,
)

SCORING_FORWARD = "scoring_forward"
"""The pseudo-strategy of the throughput rows that time the no-grad scoring forward alone."""


def peak_memory_command(bench: BenchmarkArguments, strategy: str, keep: float) -> list[str]:
    """The command line of the child process that measures one strategy's peak memory (``_peak_memory``)."""
    command = [
        sys.executable,
        "-m",
        "hf_sbp.benchmark",
        "_peak_memory",
        "--model_name_or_path",
        bench.model_name_or_path,
        "--device",
        bench.device,
        "--seq_len",
        str(bench.seq_len),
        "--batch_size",
        str(bench.batch_size),
        "--keeps",
        str(keep),
        "--memory_strategy",
        strategy,
    ]
    if bench.strategy_modules:
        command += ["--sbp_strategy_modules", ",".join(bench.strategy_modules)]
    if bench.train_file:
        command += ["--train_file", bench.train_file, "--validation_file", bench.validation_file or bench.train_file]
    return command


def peak_memory_mb(bench: BenchmarkArguments, strategy: str, keep: float) -> float:
    """Peak memory of a few training steps of one strategy, in a fresh process (RSS on CPU), in MB."""
    # The child imports the same hf_sbp as this process, installed or not.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        peak_memory_command(bench, strategy, keep), capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"the peak-memory process for {strategy}@{keep} failed:\n{out.stderr[-4000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def resident_bytes() -> int:
    """This process's resident memory (RSS), in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples this process's resident memory every millisecond in a thread; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, resident_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def measure_peak_memory(bench: BenchmarkArguments, scratch_dir: str) -> None:
    """Child process: one warm-up step (which creates the optimizer's state), then print the peak memory of
    three more steps above the memory held before them, in MB: the activations and gradients that a step of
    this strategy needs."""
    strategy, keep = bench.memory_strategy, bench.keep_values[0]
    spec = (
        DataTrainingArguments(train_file=bench.train_file, validation_file=bench.validation_file)
        if bench.train_file
        else DataTrainingArguments(dataset_name="tweets")
    )
    model_path = resolve_model_name(bench.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = Data(spec, tokenizer, bench.seq_len, limit=4 * bench.batch_size)
    batches = fixed_batches(data.splits["train"], tokenizer, bench.batch_size, bench.seq_len, 2, bench.device)
    model = load_model(model_path, data.num_labels, 0, bench.device)
    trainer = make_trainer(model, strategy, keep, bench.batch_size, bench.device, scratch_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch) -> None:
        trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    if bench.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for i in range(3):
            step(batches[i % 2])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        base = resident_bytes()
        with RssSampler() as sampler:
            for i in range(3):
                step(batches[i % 2])
        peak = sampler.peak
    print((peak - base) / 2**20)


def run_throughput(ctx: BenchmarkContext, data: Data) -> list[dict[str, Any]]:
    """Median step time per strategy and keep, all interleaved in one process, with the peak memory of each
    (rows of ``throughput.json``)."""
    bench = ctx.bench
    model = load_model(ctx.model_path, data.num_labels, 0, bench.device)
    batches = fixed_batches(data.splits["train"], ctx.tokenizer, bench.batch_size, bench.seq_len, 4, bench.device)
    grid = strategy_grid(bench.strategy_names, bench.keep_values)
    trainers = {
        (strategy, keep): make_trainer(model, strategy, keep, bench.batch_size, bench.device, ctx.scratch_dir)
        for strategy, keep in grid
    }
    # SGD with a zero learning rate keeps the model fixed, so every strategy times the same model;
    # the optimizer step's cost is the same for all and small next to forward and backward.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    times: dict[tuple[str, float], list[float]] = defaultdict(list)

    def timed_step(trainer, batch) -> float:
        sync(bench.device)
        start = time.perf_counter()
        trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(bench.device)
        return time.perf_counter() - start

    for repeat in range(bench.repeats + 1):  # the first round warms up and is dropped
        batch = batches[repeat % len(batches)]
        for key in grid:
            elapsed = timed_step(trainers[key], batch)
            if repeat:
                times[key].append(elapsed)
        sync(bench.device)
        start = time.perf_counter()
        with torch.no_grad():
            model.eval()
            model(**{k: v for k, v in batch.items() if k != "labels"})
            model.train()
        sync(bench.device)
        if repeat:
            times[(SCORING_FORWARD, 1.0)].append(time.perf_counter() - start)
        if repeat % 5 == 0:
            ctx.progress(f"throughput round {repeat}/{bench.repeats}")
    full = statistics.median(times[(FULL_BATCH, 1.0)])
    rows = []
    for (strategy, keep), values in times.items():
        row = {
            "strategy": strategy,
            "keep": keep,
            "device": bench.device,
            "step_s": statistics.median(values),
            "full_step_s": full,
            "peak_mem_mb": None,
        }
        if strategy != SCORING_FORWARD:
            row["peak_mem_mb"] = peak_memory_mb(bench, strategy, keep)
        rows.append(row)
    scoring_s = statistics.median(times[(SCORING_FORWARD, 1.0)])
    for row in rows:
        row["ratio_to_full"] = row["step_s"] / full
        trainer = trainers.get((row["strategy"], row["keep"]))
        if trainer is not None and trainer.strategy.selective and trainer.runs_scoring_pass:
            # Scoring forward (a third of a step) plus forward and backward on the subset.
            row["ideal_ratio"] = (1 + 3 * row["keep"]) / 3
            random_times = times.get((BUDGET_STRATEGY, row["keep"]))
            if random_times:  # the floor needs the random subset's step at the same keep
                row["floor_s"] = scoring_s + statistics.median(random_times)
                row["ratio_to_floor"] = row["step_s"] / row["floor_s"]
        ctx.progress(
            f"throughput {row['strategy']}@{row['keep']}: {row['step_s']:.3f} s ({row['ratio_to_full']:.3f} x full)"
        )
    return rows
