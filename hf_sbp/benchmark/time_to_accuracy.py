"""Part 5, ``time_to_accuracy.json``: does a strategy reach the full batch's accuracy sooner than the random subset and
the full batch, on the full batch's wall-clock budget?

Per dataset, label noise and seed (a *unit*), the full batch trains for its epochs on a step schedule; its training
time ``T`` is the budget, its cost in forward-equivalents the cost budget, and ``0.99 A`` (``A`` its final validation
accuracy) the target. Every per-batch strategy then trains from the same initial weights, batch order and data with
its learning rate a function of its own training time ``t / T`` (the same warm-up and linear decay), and stops at
``T``; dataset-level pruning trains for the full batch's epochs, pruned. Every run is evaluated at the same fractions
``i / marks`` of the budget, with the clock paused; the full batch is run again at the unit's end to measure drift.
The statistics (paired ratios, bootstrap intervals over seeds, verdicts) are in :mod:`.tta_stats`; the protocol,
its sizes and how to read a verdict in ``docs/benchmarks/README.md``. The grid of units, its resuming and its
summary are in :mod:`.tta_grid`; this module makes one run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase, TrainerCallback

from ..glue.run_glue import apply_label_noise, first_rows
from ..selection_metrics import PRUNED_FRACTION, run_key
from .arguments import BenchmarkArguments
from .common import (
    Data,
    evaluating_trainer,
    load_model,
    prunes_dataset,
    sync,
)
from .wall_clock import AccuracyEvaluator, MarkedRun, TrainingClock, WallClockScheduleTrainer, warmup_steps

JSON_NAME = "time_to_accuracy"
"""The rows: ``<output_dir>/time_to_accuracy.json``."""
SUMMARY_NAME = "time_to_accuracy_summary"
"""The statistics: ``<output_dir>/time_to_accuracy_summary.json``."""
PROTOCOL = 2
"""The protocol version every row records (version 1, with calibrated step schedules, is in git's history)."""
TARGET_FRACTION = 0.99
"""The target is this fraction of the full batch's final validation accuracy."""
STEP_CAP_FACTOR = 50
"""A time-scheduled run's ``max_steps`` (never reached: the budget stops it) is this many full-batch runs' steps."""
ROW_KEYS = (
    "dataset", "label_noise", "seed", "strategy", "keep", "repeat", "schedule", "protocol", "sitting", "machine",
    "budget_s", "budget_cost", "target", "curve", "final_accuracy", "time_to_target_s", "cost_to_target", "steps",
    "planned_steps", "warmup_steps", "backprop_examples", "scoring_forward_examples", "train_s", "eval_s", "wall_s",
    "stopped_by_budget", "train_examples", "epochs", "batch_size", "max_seq_length", "eval_samples", "eval_points",
    "learning_rate", "flipped_labels", "pruned_fraction", "flipped_share_visited", "flipped_share_backprop", "il_s",
    "il_cost",
)  # fmt: skip
"""The keys of a row of ``time_to_accuracy.json``, in order."""
CELL_KEYS = ("train_examples", "epochs", "batch_size", "max_seq_length", "eval_points", "eval_samples", "learning_rate")
"""The sizes of a cell that the summary records (from its first full-batch run)."""


@dataclass
class TimeToAccuracySettings:
    """What every run of the part shares (``docs/benchmarks/README.md`` gives the defaults' reasons)."""

    train_examples: int = 2560
    epochs: int = 3
    min_steps: int = 240
    batch_size: int = 32
    max_seq_length: int = 64
    learning_rate: float = 1e-4
    eval_samples: int = 1000
    min_eval_samples: int = 500
    eval_points: int = 24
    device: str = "cpu"
    eval_batch_size: int = 256

    @classmethod
    def from_arguments(cls, bench: BenchmarkArguments) -> TimeToAccuracySettings:
        """The settings of the benchmark's ``--tta_*``, ``--batch_size``, ``--seq_len``, ``--learning_rate`` and
        ``--device`` arguments (a dataset's ``--tta_learning_rates`` entry is applied per unit)."""
        return cls(
            train_examples=bench.tta_train_examples,
            epochs=bench.tta_epochs,
            min_steps=bench.tta_min_steps,
            batch_size=bench.batch_size,
            max_seq_length=bench.seq_len,
            learning_rate=bench.learning_rate,
            eval_samples=bench.tta_eval_samples,
            min_eval_samples=bench.tta_min_eval_samples,
            eval_points=bench.tta_eval_points,
            device=bench.device,
        )

    def epochs_for(self, train_size: int) -> int:
        """The full batch's epochs over ``train_size`` examples: ``epochs``, or more to make ``min_steps`` steps."""
        per_epoch = math.ceil(train_size / self.batch_size)
        return max(self.epochs, math.ceil(self.min_steps / per_epoch))

    def full_batch_steps(self, train_size: int) -> int:
        """The full batch's steps: ``epochs_for(train_size) * ceil(train_size / batch_size)``."""
        return self.epochs_for(train_size) * math.ceil(train_size / self.batch_size)


@dataclass
class Cell:
    """One (dataset, label noise, seed) unit with its data: the training subset (noised) and the validation sample."""

    dataset: str
    label_noise: float
    seed: int
    train: Dataset
    validation: Dataset
    num_labels: int
    flipped: list[int] = dataclasses.field(default_factory=list)
    """The training subset's rows whose label the noise flipped."""

    @classmethod
    def from_data(cls, name: str, data: Data, label_noise: float, seed: int, settings: TimeToAccuracySettings) -> Cell:
        """The validation sample: the first ``eval_samples`` of the validation split shuffled with seed 0; where that
        split has fewer than ``min_eval_samples``, the test split and then the training split (shuffled with seed 0)
        top it up to that many, and those rows leave the training pool. The training subset: the first
        ``train_examples`` of the pool shuffled with ``seed``, labels noised at ``label_noise`` with ``seed``. Only
        the training subset depends on the seed."""
        validation = data.splits["validation"].shuffle(seed=0)
        validation = first_rows(validation, settings.eval_samples)
        pool = data.splits["train"]
        wanted = min(settings.eval_samples, settings.min_eval_samples)
        if len(validation) < wanted and "test" in data.splits:
            test = data.splits["test"].shuffle(seed=0)
            topped = first_rows(test, wanted - len(validation))
            validation = concatenate_datasets([validation, topped])
        if len(validation) < wanted:
            pool = pool.shuffle(seed=0)
            moved = min(wanted - len(validation), len(pool) - 1)
            validation = concatenate_datasets([validation, pool.select(range(moved))])
            pool = pool.select(range(moved, len(pool)))
        clean = first_rows(pool.shuffle(seed=seed), settings.train_examples)
        train, _ = apply_label_noise(clean, label_noise, data.num_labels, seed, label_column="labels")
        flipped = np.flatnonzero(np.asarray(train["labels"]) != np.asarray(clean["labels"])).tolist()
        return cls(name, label_noise, seed, train, validation, data.num_labels, flipped)


def device_clock(device: str) -> Callable[[], float]:
    """``time.perf_counter`` after waiting for the device's queued work (on CUDA; nothing to wait for on a CPU)."""

    def clock() -> float:
        sync(device)
        return time.perf_counter()

    return clock


class PlanRecorder(TrainerCallback):
    """For a dataset-level strategy: the examples each pruned epoch visits, read from the trainer's plan."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.visited: dict[int, list[int]] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        history = self.trainer.pruning_history
        plan = history.current if history is not None else None
        if plan is not None and plan.active and plan.pruned and plan.epoch not in self.visited:
            self.visited[plan.epoch] = plan.order.tolist()

    def flipped_share(self, flipped: list[int]) -> float | None:
        """The mean over pruned epochs of the share of ``flipped`` rows among those the epoch visits."""
        if not self.visited:
            return None
        marked = set(flipped)
        return float(np.mean([sum(i in marked for i in rows) / len(rows) for rows in self.visited.values()]))


class BackpropCounter:
    """Counts the rows that go through a forward with autograd (the rows a step backpropagates), and how many of them
    are mislabelled: a forward pre-hook on the model matches each row (its tokens and label) against the flipped
    rows of the unit's training subset. The scoring pass runs without autograd and is not counted."""

    def __init__(self, model: Any, train: Dataset, flipped: list[int]) -> None:
        rows = train.select(flipped)
        self.flipped_keys = {
            (tuple(ids), int(label)) for ids, label in zip(rows["input_ids"], rows["labels"], strict=True)
        }
        self.rows = 0
        self.flipped = 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
        if not torch.is_grad_enabled() or ids is None or labels is None:
            return
        mask = kwargs.get("attention_mask")
        for row in range(ids.shape[0]):
            tokens = ids[row] if mask is None else ids[row][mask[row].bool()]
            self.flipped += (tuple(tokens.tolist()), int(labels[row])) in self.flipped_keys
        self.rows += int(ids.shape[0])

    def share(self) -> float | None:
        """The share of mislabelled rows among those backpropagated (``None`` before any)."""
        self.handle.remove()
        return self.flipped / self.rows if self.rows else None


def irreducible_loss_cost(args: Any, train_size: int, strategy: Any) -> float:
    """The forward-equivalents of RHO-LOSS's irreducible losses over ``train_size`` examples (0 for a strategy that
    needs none): ``double`` trains two IL models for ``sbp_il_epochs`` epochs on half the data each (``3 e N``) and
    scores the data (``N``); ``linear_probe`` only scores it (``N``; the fits are negligible)."""
    if not getattr(strategy, "needs_irreducible_loss", False):
        return 0.0
    if args.sbp_il_model == "double":
        return float(train_size * (3 * args.sbp_il_epochs + 1))
    return float(train_size)


def schedule_of(strategy: str, budgeted: bool) -> str:
    """``steps`` (the full batch, which defines the budget), ``epochs`` (dataset-level pruning) or ``time``."""
    if not budgeted:
        return "steps"
    return "epochs" if prunes_dataset(strategy) else "time"


class StepCost:
    """The cost clock's charge for the step just made: the scoring forward's rows plus 3 per row backpropagated
    (a forward and a backward that costs two), read off the trainer's counters after each step."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.backprop = 0
        self.scored = 0.0
        """Rows the scoring forward covered so far."""

    def __call__(self) -> float:
        trainer = self.trainer
        backprop = trainer.sbp_backprop_examples - self.backprop
        self.backprop = trainer.sbp_backprop_examples
        record = trainer.last_selection
        scored = 0.0
        if trainer.strategy.selective and record is not None and record.scored:
            scored = record.batch_size * record.scored_fraction
        self.scored += scored
        return scored + 3 * backprop


def _run_trainer(
    cell: Cell,
    strategy: str,
    keep: float,
    settings: TimeToAccuracySettings,
    schedule: str,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str,
    output_dir: str,
) -> tuple[Any, torch.nn.Module, int | None]:
    """``(trainer, model, warm-up steps)`` of a run on ``schedule``: the full batch's step count and warm-up
    (``steps``), the epochs of a dataset-level strategy (``epochs``), or a step cap that the budget ends first
    (``time``, whose warm-up is a fraction of the budget instead)."""
    model = load_model(model_path, cell.num_labels, cell.seed, settings.device)
    full_steps = settings.full_batch_steps(len(cell.train))
    steps = {"steps": full_steps, "epochs": -1, "time": STEP_CAP_FACTOR * full_steps}[schedule]
    warmup = warmup_steps(full_steps) if schedule != "time" else None
    trainer = evaluating_trainer(
        model,
        strategy=strategy,
        keep=keep,
        seed=cell.seed,
        steps=steps,
        warmup_steps=warmup or 0,
        batch_size=settings.batch_size,
        eval_batch_size=settings.eval_batch_size,
        learning_rate=settings.learning_rate,
        device=settings.device,
        train=cell.train,
        validation=None,
        tokenizer=tokenizer,
        output_dir=output_dir,
        lr_scheduler_type="linear",
        trainer_class=WallClockScheduleTrainer,
        **({"num_train_epochs": settings.epochs_for(len(cell.train))} if schedule == "epochs" else {}),
    )
    return trainer, model, warmup


def _run_settings(cell: Cell, settings: TimeToAccuracySettings) -> dict[str, Any]:
    """The settings a row records: what its unit trained on and with."""
    return {
        "train_examples": len(cell.train),
        "epochs": settings.epochs_for(len(cell.train)),
        "batch_size": settings.batch_size,
        "max_seq_length": settings.max_seq_length,
        "eval_samples": len(cell.validation),
        "eval_points": settings.eval_points,
        "learning_rate": settings.learning_rate,
        "flipped_labels": len(cell.flipped),
    }


def train_run(
    cell: Cell,
    strategy: str,
    keep: float,
    settings: TimeToAccuracySettings,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str,
    output_dir: str,
    budget: dict[str, float] | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """One run of the unit, as a row of ``time_to_accuracy.json`` (without ``sitting`` and ``machine``).

    Without ``budget`` it is a full-batch run; its row's ``budget_s``, ``budget_cost`` and ``target`` are what it
    measured. With ``budget`` (``{"budget_s", "budget_cost", "target"}`` of the unit's full batch) the run is
    time-scheduled or, for a dataset-level strategy, epoch-scheduled, and stopped at ``budget_s``.
    """
    started = time.perf_counter()
    schedule = schedule_of(strategy, budget is not None)
    trainer, model, warmup = _run_trainer(cell, strategy, keep, settings, schedule, tokenizer, model_path, output_dir)
    training_clock = TrainingClock(clock or device_clock(settings.device))
    evaluate = AccuracyEvaluator(model, cell.validation, tokenizer, settings.eval_batch_size, settings.device)
    step_cost = StepCost(trainer)
    il_cost = irreducible_loss_cost(trainer.args, len(cell.train), trainer.strategy)

    def upfront() -> tuple[float, float]:
        return trainer.sbp_il_seconds, il_cost

    mode = {"steps": settings.full_batch_steps(len(cell.train))} if budget is None else {"budget_s": budget["budget_s"]}
    marks = MarkedRun(evaluate, settings.eval_points, training_clock, step_cost, upfront=upfront, **mode)
    if schedule == "time":
        trainer.schedule_fraction = marks.fraction
    trainer.add_callback(marks)
    plans = PlanRecorder(trainer)
    trainer.add_callback(plans)
    counter = BackpropCounter(model, cell.train, cell.flipped) if cell.flipped else None
    metrics = trainer.train().metrics
    final = marks.curve[-1][3]
    if budget is None:
        budget = {"budget_s": marks.curve[-1][1], "budget_cost": marks.cost, "target": TARGET_FRACTION * final}
    reached = next((entry for entry in marks.curve if entry[3] >= budget["target"] - 1e-9), None)
    row = {
        "dataset": cell.dataset,
        "label_noise": cell.label_noise,
        "seed": cell.seed,
        "strategy": strategy,
        "keep": keep,
        "repeat": False,
        "schedule": schedule,
        "protocol": PROTOCOL,
        "sitting": None,
        "machine": None,
        **budget,
        "curve": marks.curve,
        "final_accuracy": final,
        "time_to_target_s": None if reached is None else reached[1],
        "cost_to_target": None if reached is None else reached[2],
        "steps": trainer.state.global_step,
        "planned_steps": None if schedule == "time" else trainer.state.max_steps,
        "warmup_steps": warmup,
        "backprop_examples": trainer.sbp_backprop_examples,
        "scoring_forward_examples": step_cost.scored,
        "train_s": marks.curve[-1][1],
        "eval_s": marks.eval_s,
        "wall_s": 0.0,
        "stopped_by_budget": marks.stopped_by_budget,
        **_run_settings(cell, settings),
        "pruned_fraction": metrics.get(run_key(PRUNED_FRACTION)),
        "flipped_share_visited": plans.flipped_share(cell.flipped) if cell.flipped else None,
        "flipped_share_backprop": counter.share() if counter is not None else None,
        "il_s": trainer.sbp_il_seconds,
        "il_cost": il_cost,
    }
    row["wall_s"] = time.perf_counter() - started
    return row
