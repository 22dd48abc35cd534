"""Part 4, ``training.json``: fine-tuning runs per strategy, with accuracy curves against training time, and the
statistics that compare them at an equal number of steps and at an equal wall-clock budget.

:func:`train_run` is one run (data subset, label noise, model, trainer, curve, test accuracy); the benchmark's
training part and ``scripts/demo.py`` both train through it.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import (
    PreTrainedTokenizerBase,
    ProgressCallback,
    TrainerCallback,
)

from ..glue.run_glue import apply_label_noise, first_rows
from ..selection_metrics import selection_statistics
from ..trainer import SelectiveBackpropTrainer
from .common import (
    BUDGET_STRATEGY,
    FULL_BATCH,
    BenchmarkContext,
    Data,
    evaluating_trainer,
    load_model,
    per_batch,
    strategy_grid,
    strategy_order,
)


class CurveCallback(TrainerCallback):
    """Evaluates every ``every`` steps (and after the last) and records ``[training seconds, accuracy, examples
    backpropagated]``; the seconds exclude the evaluations."""

    def __init__(self, trainer: SelectiveBackpropTrainer, every: int) -> None:
        self.trainer, self.every = trainer, every
        self.curve: list[list[float]] = []
        self.train_s = 0.0
        self._resumed = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._resumed = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.train_s += time.perf_counter() - self._resumed
            metrics = self.trainer.evaluate(metric_key_prefix="curve")
            self.curve.append([self.train_s, metrics["curve_accuracy"], self.trainer.sbp_backprop_examples])
            self._resumed = time.perf_counter()


class RunProgressBar(ProgressCallback):
    """``Trainer``'s progress bar over the optimizer steps, labelled with the run, without the log lines and the
    evaluation bars that ``ProgressCallback`` adds."""

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc=self.description)
        self.current_step = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


@dataclass
class TrainingRun:
    """One fine-tuning run: the data, the strategy, the schedule and the evaluations.

    ``steps * batch_size`` training examples are drawn from the shuffled training split (``seed``) and their labels
    noised at ``label_noise``; the model's head is initialised with ``seed``. The learning rate warms up over a tenth
    of the steps, then decays linearly. Validation accuracy on ``eval_samples`` examples is measured every
    ``eval_every`` steps, test accuracy on ``test_samples`` examples at the end.
    """

    dataset: str
    strategy: str
    keep: float
    label_noise: float
    seed: int
    steps: int
    batch_size: int
    learning_rate: float
    eval_every: int
    eval_samples: int
    test_samples: int
    device: str = "cpu"
    eval_batch_size: int = 128


@dataclass
class RunOutcome:
    """What :func:`train_run` measured: ``row``, a row of ``training.json``, and ``metrics``, the metrics that
    ``trainer.train()`` returned (with the selection metrics' whole-run values, ``train_sbp/...``)."""

    row: dict[str, Any]
    metrics: dict[str, float]


def train_run(
    run: TrainingRun,
    data: Data,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str,
    output_dir: str,
    progress_bar: bool = False,
) -> RunOutcome:
    """Train ``model_path`` on ``data`` as ``run`` says, with its accuracy curve, then measure test accuracy.

    Args:
        run: the run's settings.
        data: the tokenised dataset (its ``train``, ``validation`` and test splits are used).
        tokenizer: the model's tokenizer (for padding the batches).
        model_path: the checkpoint to fine-tune (a folder or a Hub name).
        output_dir: the trainer's output folder (nothing is saved there).
        progress_bar: show a progress bar over the run's steps, as ``Trainer`` does.
    """
    splits = data.splits
    train = first_rows(splits["train"].shuffle(seed=run.seed), run.steps * run.batch_size)
    train, flipped = apply_label_noise(train, run.label_noise, data.num_labels, run.seed, label_column="labels")
    validation = first_rows(splits["validation"], run.eval_samples)
    test = first_rows(splits[data.test_split], run.test_samples)
    model = load_model(model_path, data.num_labels, run.seed, run.device)
    trainer = evaluating_trainer(
        model,
        strategy=run.strategy,
        keep=run.keep,
        seed=run.seed,
        steps=run.steps,
        warmup_steps=run.steps // 10,
        batch_size=run.batch_size,
        eval_batch_size=run.eval_batch_size,
        learning_rate=run.learning_rate,
        device=run.device,
        train=train,
        validation=validation,
        tokenizer=tokenizer,
        output_dir=output_dir,
        logging_steps=run.eval_every,
    )
    if progress_bar:
        label = run.strategy if run.strategy == FULL_BATCH else f"{run.strategy}@{run.keep}"
        trainer.add_callback(RunProgressBar(label))
    curve = CurveCallback(trainer, run.eval_every)
    trainer.add_callback(curve)
    metrics = dict(trainer.train().metrics)
    test_accuracy = trainer.evaluate(test, metric_key_prefix="test")["test_accuracy"]
    row = {
        "dataset": run.dataset,
        "strategy": run.strategy,
        "keep": run.keep,
        "label_noise": run.label_noise,
        "seed": run.seed,
        "test_accuracy": test_accuracy,
        "train_time_s": curve.train_s,
        "backprop_examples": trainer.sbp_backprop_examples,
        "curve": [[t, a] for t, a, _ in curve.curve],
        "curve_backprop_examples": [e for _, _, e in curve.curve],
        "flipped_labels": flipped,
        "steps": run.steps,
        "batch_size": run.batch_size,
    }
    return RunOutcome(row, metrics)


RUN_STATISTICS = ("backprop_fraction", "grad_match_error", "scoring_time_share", "selection_time_share")
"""The whole-run selection statistics a row of the demo reports (the means of :func:`selection_statistics`)."""


def whole_run_statistics(metrics: dict[str, float]) -> dict[str, float | None]:
    """:data:`RUN_STATISTICS` from ``train()``'s returned ``metrics`` (``None`` where a run did not log one, e.g. the
    match error without a scoring pass, or anything for ``none``)."""
    stats = selection_statistics([metrics])
    return {name: stats[f"mean_{name}"] for name in RUN_STATISTICS}


def run_training(ctx: BenchmarkContext) -> list[dict[str, Any]]:
    """Every dataset x noise x seed x (strategy, keep) run (rows of ``training.json``)."""
    bench = ctx.bench
    rows = []
    runs = [
        (name, spec, strategy, keep, noise, seed)
        for name, spec in bench.dataset_specs()
        for noise in bench.noise_values
        for seed in bench.seed_values
        for strategy, keep in strategy_grid(per_batch(bench.strategy_names), bench.training_keep_values)
    ]
    data_cache: dict[str, Data] = {}
    for number, (name, spec, strategy, keep, noise, seed) in enumerate(runs, 1):
        if name not in data_cache:
            data_cache[name] = Data(spec, ctx.tokenizer, bench.seq_len)
        run = TrainingRun(
            dataset=name,
            strategy=strategy,
            keep=keep,
            label_noise=noise,
            seed=seed,
            steps=bench.train_steps,
            batch_size=bench.batch_size,
            learning_rate=bench.learning_rate,
            eval_every=bench.eval_every,
            eval_samples=bench.eval_samples,
            test_samples=bench.test_samples,
            device=bench.device,
        )
        row = train_run(run, data_cache[name], ctx.tokenizer, ctx.model_path, ctx.scratch_dir).row
        rows.append(row)
        ctx.progress(
            f"training {number}/{len(runs)} {name} noise={noise} seed={seed} {strategy}@{keep}: "
            f"test acc {row['test_accuracy']:.4f}, {row['train_time_s']:.1f} s"
        )
    return rows


# ---- statistics -------------------------------------------------------------------------------------


def accuracy_at(curve: list[list[float]], budget_s: float) -> float:
    """Validation accuracy of the last evaluation within ``budget_s`` seconds of training (nan if none)."""
    within = [acc for t, acc in curve if t <= budget_s + 1e-9]
    return within[-1] if within else math.nan


def equal_budget_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset, noise and keep: each strategy's validation accuracy at the wall-clock budget of the random
    subset (the median of its runs' training times), as mean, std and count over the runs that evaluated within it.

    The full-batch runs (``none``) join every keep's comparison; a keep without random-subset runs has no budget
    and no entries. Strategies appear in registration order.
    """
    groups = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["label_noise"])].append(row)
    table = []
    for (dataset, noise), group in sorted(groups.items()):
        keeps = sorted({r["keep"] for r in group if r["strategy"] != FULL_BATCH})
        for keep in keeps:
            members = [r for r in group if r["keep"] == keep or r["strategy"] == FULL_BATCH]
            budgets = [r["train_time_s"] for r in members if r["strategy"] == BUDGET_STRATEGY]
            if not budgets:
                continue
            budget = float(np.median(budgets))
            for strategy in strategy_order(r["strategy"] for r in members):
                values = [accuracy_at(r["curve"], budget) for r in members if r["strategy"] == strategy]
                values = [v for v in values if not math.isnan(v)]
                table.append(
                    {
                        "dataset": dataset,
                        "label_noise": noise,
                        "keep": keep,
                        "budget_s": budget,
                        "strategy": strategy,
                        "mean": float(np.mean(values)) if values else math.nan,
                        "std": float(np.std(values)) if values else math.nan,
                        "runs": len(values),
                    }
                )
    return table
