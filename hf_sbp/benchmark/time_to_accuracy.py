"""Part 5, ``time_to_accuracy.json``: how long each strategy needs to reach 99% of the full batch's accuracy, on the
full batch's wall-clock budget.

Per dataset, label-noise rate and seed (a *cell*):

1. The full batch (``none``) trains for ``--tta_epochs`` epochs (3) over a fixed training subset of
   ``--tta_train_examples`` examples (640, drawn from the shuffled training split with the seed, labels noised at
   the rate with the seed), batches of ``--batch_size`` (32) truncated to ``--seq_len`` tokens (64), so 60 steps.
   Its training time ``T`` (the clock runs from ``on_train_begin`` to the last step and stops during evaluations)
   is the cell's budget; its final validation accuracy ``A`` defines the target ``0.99 A``.
2. Every other strategy (``--strategies`` at ``--training_keeps``) trains on the same data, from the same initial
   weights, with the same budget ``T``: a :class:`BudgetCallback` stops it at the first step end at which its own
   training time (evaluations excluded) reaches ``T``. Its learning-rate schedule is sized to its own run: the same
   warm-up fraction (:data:`WARMUP_FRACTION`) and linear decay to zero as the full batch, over
   ``max_steps = floor((T - startup) / step_s)`` steps (:func:`schedule_steps`), so that the schedule ends when the
   budget does: a strategy is neither cut off mid-schedule nor left idle. The random subset at keep 0.5 thus makes
   about twice the full batch's steps.
3. Validation accuracy on a fixed sample of ``--tta_eval_samples`` validation examples (300) is recorded
   ``--tta_eval_points`` times per run (12): for a budgeted run every ``T / 12`` seconds of training time, for the
   full batch every ``steps / 12`` steps (the same spacing, since its steps take equal time), and always at the
   end. Evaluation time is excluded from the clock. ``time_to_target_s`` is the training time of the first
   evaluation at or above the target (``null`` if none), so its resolution is the evaluation interval.

**Dataset-level strategies** (``infobatch``, ``random-prune``: ``prunes_dataset``) run as InfoBatch is meant to
run: for the full batch's ``--tta_epochs`` epochs, pruned, with the full batch's schedule (its warm-up and linear
decay, stretched over the pruned epochs so that it ends with the last one; see :mod:`hf_sbp.epoch_pruning`),
evaluated every ``T / 12`` seconds and stopped at ``T`` if it gets there. Their steps cost what the full batch's do;
what pruning saves is the steps it skips, so such a run ends before ``T`` by the share of the examples it left out,
and ``time_to_target_s`` shows whether it lost accuracy by doing so. ``random-prune`` leaves out as many examples at
random, so the two differ only in which examples they skip. Their rows record ``schedule: "epochs"`` (the others
``"steps"``) and the run's ``pruned_fraction``; ``planned_steps`` is the run's own step count. Under label noise,
``flipped_share_visited`` is the share of mislabelled examples among those the pruned epochs visited (mean over
those epochs), to set beside the training subset's share (``flipped_labels / train_examples``): InfoBatch keeps
the mislabelled examples, whose loss stays high, and ``random-prune`` keeps their share.

**Measuring the step time (calibration).** ``step_s`` must be known before the run starts, because ``Trainer``
fixes the schedule's length when it creates the scheduler. Before each budgeted run, a calibration run trains a
deep copy of the freshly initialised model with the same strategy, data, batch order and settings for one
warm-up step plus ``--tta_calibration_steps`` (4) timed steps, and is then discarded; the real run starts from the
same initial weights, so the calibration spends none of the budget and changes nothing the run learns. ``step_s``
is the median of the timed steps (step end to step end, data loading and optimizer step included; the median
shrugs off a hiccup of this shared machine), and ``startup`` the first step's excess over it (data loader,
first-step checks), which the real run pays too and which is subtracted from ``T`` before dividing. Measuring
right before each run, in the same process, tracks the machine's current speed. The alternatives were worse:
measuring inside the real run and resizing the schedule after a few steps changes the warm-up length the first
steps already used (and ``Trainer`` does not support it); reusing ``throughput.json``'s step times takes them
from another sitting and fixed-length padding, not this run's data. The price is about five extra steps per run
(2 to 3 s of wall clock, outside the budget, recorded as ``calibration_s``).

**Sizes** (defaults), measured on a 2-core Intel Xeon with all-MiniLM-L6-v2. 640 examples x 3 epochs = 60
full-batch steps of 32 examples of at most 64 tokens; ``T`` was 39.5 s on tweets and 39 to 42 s on BBC news. The
peak learning rate is 1e-4 (``--learning_rate``), except on BBC news, 5e-5 (``--tta_learning_rates``): the full
batch's accuracy must still be rising over most of its budget, or the comparison measures the evaluation interval.
On tweets at 1e-4 it reached its target only at its last evaluation (0.40 -> 0.65); on BBC news at 1e-4 it reached
it after 43% of the budget and then stayed flat, at 5e-5 after 83% and 92% (seeds 0 and 1). Evaluations: 12 per run
on 300 validation examples (BBC news has 222), about 23 s per run on tweets and 14 s on BBC news. A run then takes
about 60 s of wall clock (``T``, the evaluations, 2 to 3 s of calibration, loading the model), a cell of four
(none, random, loss and gradmatch at keep 0.5) about 4 to 4.5 minutes, the full grid (2 datasets x noise 0, 0.2 x 3
seeds = 12 cells) about 50 minutes here, about 75 minutes on a CPU 1.5 times slower (the AMD EPYC of
``docs/benchmarks``); ``--quick`` (tweets, noise 0, seed 0: one cell) took 4 to 4.5 minutes. In that sitting the
calibrated step time was within 7% of the run's mean step (either way: the run's batches differ in length from the
first ones, and the evaluations slow the steps after them a little), so a run either ended its schedule up to 6%
before ``T`` or was stopped at ``T`` a few steps (under 5%, at under 5% of the peak learning rate) before its
schedule's end; ``steps`` and ``planned_steps`` record which. With all seven selective strategies (a third sitting,
same machine, idle but slower and drifting in speed that day) ``T`` was 52 to 58 s on tweets and 58 to 81 s on BBC
news, a run 75 to 110 s of wall clock, a cell of eight runs 11 to 14 minutes, the grid 2 h 25 min, and the
calibrated step time up to 1.45 times the run's own (a run then ended its schedule up to 31% before ``T``:
``train_s`` against ``budget_s``).

**Resuming.** Rows are appended to the JSON after every run, each with its ``sitting`` (an id of the invocation:
its start time in UTC) and ``machine``. A rerun skips every (dataset, noise, seed, strategy, keep) already in the
file. A cell with any row missing is run again in the new sitting with its ``none`` run (the budget and target must
come from the same sitting) and its ``random`` runs at the missing rows' keeps beside the missing rows; the older
sitting's rows stay. Times compare only within a sitting: the report pairs every run with the ``random`` and
``none`` runs of its own sitting.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
)

from .. import SelectiveBackpropTrainer
from ..glue import apply_label_noise
from ..selection_metrics import PRUNED_FRACTION, run_key
from ..strategies import strategy_class
from .common import (
    BUDGET_STRATEGY,
    FULL_BATCH,
    PRUNING_BASELINE,
    BenchmarkArguments,
    BenchmarkContext,
    Data,
    evaluating_trainer,
    load_model,
    load_rows,
    prunes_dataset,
    strategy_grid,
    strategy_order,
    sync,
    write_json,
)

JSON_NAME = "time_to_accuracy"
"""The part's JSON file: ``<output_dir>/time_to_accuracy.json``."""
TARGET_FRACTION = 0.99
"""The target is this fraction of the full batch's final validation accuracy."""
WARMUP_FRACTION = 0.1
"""Every run's learning rate warms up over this fraction of its steps (rounded up), then decays linearly to 0."""
ROW_KEYS = (
    "dataset", "label_noise", "seed", "strategy", "keep", "budget_s", "target", "curve", "time_to_target_s",
    "final_accuracy", "steps", "backprop_examples", "scoring_forward_examples", "sitting", "machine",
    "train_s", "eval_s", "planned_steps", "warmup_steps", "step_s", "startup_s", "calibration_s", "stopped_by_budget",
    "train_examples", "epochs", "batch_size", "max_seq_length", "eval_samples", "learning_rate", "flipped_labels",
    "warm_step_s", "schedule", "pruned_fraction", "flipped_share_visited",
)  # fmt: skip
"""The keys of a row of ``time_to_accuracy.json``, in order."""


# ---- the schedule, the clock and the callbacks ------------------------------------------------------


def schedule_steps(
    budget_s: float,
    step_s: float,
    startup_s: float = 0.0,
    warm_step_s: float | None = None,
    cold_steps: int = 0,
) -> int:
    """The number of optimizer steps that fill a training budget: ``floor((budget_s - startup_s) / step_s)``, at
    least 1; with ``warm_step_s``, the first ``cold_steps`` at ``step_s`` and the rest at ``warm_step_s``.

    Args:
        budget_s: the training time allowed (seconds, evaluation excluded).
        step_s: the measured time of one step (seconds, > 0).
        startup_s: the time the run spends before its steps run at ``step_s`` (first-step overhead), >= 0.
        warm_step_s: the step time once a strategy's per-example cache is warm (after its first epoch), if it
            differs (the stale-* strategies skip the scoring pass then).
        cold_steps: the steps before the cache is warm (an epoch).
    """
    if warm_step_s is not None:
        cold_s = startup_s + cold_steps * step_s
        if budget_s > cold_s:
            return cold_steps + schedule_steps(budget_s - cold_s, warm_step_s)
    if not step_s > 0 or not math.isfinite(step_s):
        raise ValueError(f"step_s={step_s!r} is invalid; a step takes a positive, finite time.")
    if not budget_s > 0:
        raise ValueError(f"budget_s={budget_s!r} is invalid; the budget must be positive.")
    if startup_s < 0:
        raise ValueError(f"startup_s={startup_s!r} is invalid; it must be >= 0.")
    # A hair of tolerance, so that a budget of exactly n steps is n steps despite rounding (e.g. 0.3 / 0.1).
    return max(1, math.floor((budget_s - startup_s) / step_s + 1e-9))


def warmup_steps(steps: int, fraction: float = WARMUP_FRACTION) -> int:
    """Warm-up steps of a ``steps``-step schedule: ``ceil(fraction * steps)`` (as ``TrainingArguments`` rounds a
    fractional ``warmup_steps``), the same fraction for every run."""
    return math.ceil(fraction * steps - 1e-9)


def calibrated_step(begin: float, step_ends: list[float]) -> tuple[float, float]:
    """``(step_s, startup_s)`` from a calibration run's clock readings: ``begin`` at ``on_train_begin`` and one per
    step end. The first step is a warm-up: ``step_s`` is the median of the later steps' durations, and
    ``startup_s`` the first step's excess over it (at least 0). Needs at least two steps."""
    if len(step_ends) < 2:
        raise ValueError("calibration needs a warm-up step and at least one timed step.")
    durations = [b - a for a, b in zip(step_ends[:-1], step_ends[1:], strict=True)]
    step_s = statistics.median(durations)
    return step_s, max(0.0, step_ends[0] - begin - step_s)


def time_to_target(curve: list[list[float]], target: float) -> float | None:
    """The training time of the first evaluation of ``curve`` (``[seconds, accuracy]`` pairs) whose accuracy reaches
    ``target`` (with a 1e-9 tolerance for rounding), or ``None`` if none does."""
    for seconds, value in curve:
        if value >= target - 1e-9:
            return seconds
    return None


class PlanRecorder(TrainerCallback):
    """For a dataset-level strategy: the examples each pruned epoch visits, read from the trainer's plan at the
    epoch's first step."""

    def __init__(self, trainer: SelectiveBackpropTrainer) -> None:
        self.trainer = trainer
        self.visited: dict[int, list[int]] = {}
        """Per pruned epoch (pruning active and something left out): its examples."""

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
        return statistics.mean(sum(i in marked for i in rows) / len(rows) for rows in self.visited.values())


def device_clock(device: str) -> Callable[[], float]:
    """``time.perf_counter`` after waiting for the device's queued work (on CUDA; nothing to wait for on a CPU)."""

    def clock() -> float:
        sync(device)
        return time.perf_counter()

    return clock


class StepClock(TrainerCallback):
    """Records the clock at ``on_train_begin`` (``begin``) and at every step end (``step_ends``): the readings of a
    calibration run (see :func:`calibrated_step`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.begin = math.nan
        self.step_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(self.clock())


class BudgetCallback(TrainerCallback):
    """Keeps a run's training clock, evaluates on a schedule and stops the run when its budget is spent.

    The clock runs from ``on_train_begin`` and pauses while the callback evaluates, so ``train_s`` is training time
    with evaluation excluded. At a step end, the callback evaluates when ``eval_interval_s`` seconds of training
    time have passed since the last evaluation mark (marks at ``i * eval_interval_s``), or every
    ``eval_every_steps`` steps, and always at the last step; if ``budget_s`` is set and ``train_s`` has reached it,
    it evaluates (the run's last point) and stops training.

    Args:
        evaluate: returns the current validation accuracy.
        budget_s: training seconds allowed (``None``: no limit, the run ends with its schedule).
        eval_interval_s: training seconds between evaluations.
        eval_every_steps: steps between evaluations (instead of ``eval_interval_s``).
        clock: the time source (``time.perf_counter``; a fake one in tests, a synchronising one on CUDA).
        on_step: called at every step end, before the clock pauses (e.g. counting what the step did).
    """

    def __init__(
        self,
        evaluate: Callable[[], float],
        budget_s: float | None = None,
        eval_interval_s: float | None = None,
        eval_every_steps: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        if (eval_interval_s is None) == (eval_every_steps is None):
            raise ValueError("give exactly one of eval_interval_s and eval_every_steps.")
        if eval_interval_s is not None and not eval_interval_s > 0:
            raise ValueError(f"eval_interval_s={eval_interval_s!r} is invalid; it must be positive.")
        if eval_every_steps is not None and eval_every_steps < 1:
            raise ValueError(f"eval_every_steps={eval_every_steps!r} is invalid; it must be at least 1.")
        self.evaluate = evaluate
        self.budget_s = budget_s
        self.eval_interval_s = eval_interval_s
        self.eval_every_steps = eval_every_steps
        self.clock = clock
        self.on_step = on_step
        self.curve: list[list[float]] = []
        """``[training seconds, accuracy]`` of every evaluation."""
        self.train_s = 0.0
        self.eval_s = 0.0
        self.stopped_by_budget = False
        self._next_mark = eval_interval_s or 0.0
        self._resumed = math.nan

    def on_train_begin(self, args, state, control, **kwargs):
        self._resumed = self.clock()

    def _due(self, step: int) -> bool:
        if self.eval_every_steps is not None:
            return step % self.eval_every_steps == 0
        return self.train_s >= self._next_mark - 1e-9

    def on_step_end(self, args, state, control, **kwargs):
        self.train_s += self.clock() - self._resumed
        if self.on_step is not None:
            self.on_step()
        over = self.budget_s is not None and self.train_s >= self.budget_s - 1e-9
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        if over or last or self._due(state.global_step):
            paused = self.clock()
            self.curve.append([self.train_s, float(self.evaluate())])
            self.eval_s += self.clock() - paused
            if self.eval_interval_s is not None:
                while self._next_mark <= self.train_s + 1e-9:
                    self._next_mark += self.eval_interval_s
        if over:
            self.stopped_by_budget = not last
            control.should_training_stop = True
        self._resumed = self.clock()
        return control


# ---- the runs ---------------------------------------------------------------------------------------


@dataclass
class TimeToAccuracySettings:
    """What every run of the part shares (see the module docstring for the defaults' reasons)."""

    train_examples: int = 640
    epochs: int = 3
    batch_size: int = 32
    max_seq_length: int = 64
    learning_rate: float = 1e-4
    eval_samples: int = 300
    eval_points: int = 12
    calibration_steps: int = 4
    device: str = "cpu"
    eval_batch_size: int = 128

    @classmethod
    def from_arguments(cls, bench: BenchmarkArguments) -> TimeToAccuracySettings:
        """The settings that the benchmark's ``--tta_*``, ``--batch_size``, ``--seq_len``, ``--learning_rate`` and
        ``--device`` arguments give (the learning rate of a dataset that ``--tta_learning_rates`` names is set per
        cell)."""
        return cls(
            train_examples=bench.tta_train_examples,
            epochs=bench.tta_epochs,
            batch_size=bench.batch_size,
            max_seq_length=bench.seq_len,
            learning_rate=bench.learning_rate,
            eval_samples=bench.tta_eval_samples,
            eval_points=bench.tta_eval_points,
            calibration_steps=bench.tta_calibration_steps,
            device=bench.device,
        )

    def full_batch_steps(self, train_size: int) -> int:
        """Steps of the full-batch run over ``train_size`` examples: ``epochs * ceil(train_size / batch_size)``."""
        return self.epochs * math.ceil(train_size / self.batch_size)


@dataclass
class Cell:
    """One (dataset, label noise, seed) of the grid, with its data: the training subset (noised) and the fixed
    validation sample that every run of the cell uses."""

    dataset: str
    label_noise: float
    seed: int
    train: Dataset
    validation: Dataset
    flipped_labels: int
    num_labels: int
    flipped: list[int] = dataclasses.field(default_factory=list)
    """The training subset's rows whose label the noise flipped."""

    @classmethod
    def from_data(cls, name: str, data: Data, label_noise: float, seed: int, settings: TimeToAccuracySettings) -> Cell:
        """The cell's training subset (the first ``train_examples`` of the training split shuffled with ``seed``,
        labels noised at ``label_noise`` with ``seed``) and validation sample (the first ``eval_samples`` of the
        validation split shuffled with seed 0: the same for every seed)."""
        train_split, validation_split = data.splits["train"], data.splits["validation"]
        clean = train_split.shuffle(seed=seed).select(range(min(len(train_split), settings.train_examples)))
        train, flipped = apply_label_noise(clean, label_noise, data.num_labels, seed, label_column="labels")
        rows = np.flatnonzero(np.asarray(train["labels"]) != np.asarray(clean["labels"])).tolist()
        validation = validation_split.shuffle(seed=0).select(range(min(len(validation_split), settings.eval_samples)))
        return cls(name, label_noise, seed, train, validation, flipped, data.num_labels, rows)

    @property
    def key(self) -> tuple[str, float, int]:
        """``(dataset, label_noise, seed)``."""
        return (self.dataset, self.label_noise, self.seed)


def build_trainer(
    model: PreTrainedModel,
    strategy: str,
    keep: float,
    steps: int | None,
    cell: Cell,
    settings: TimeToAccuracySettings,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str,
) -> SelectiveBackpropTrainer:
    """A trainer of ``strategy`` at ``keep`` for ``steps`` steps on the cell's data, seeded with the cell's seed
    (same batch order for every strategy), warm-up over :data:`WARMUP_FRACTION` of the steps then linear decay, that
    evaluates accuracy on the cell's validation sample and saves nothing. ``steps=None``: ``settings.epochs`` epochs
    with the full batch's warm-up (a dataset-level strategy, whose pruned epochs have fewer steps)."""
    extra = {}
    if steps is None:
        extra["num_train_epochs"] = settings.epochs
        warmup = warmup_steps(settings.full_batch_steps(len(cell.train)))
    else:
        warmup = warmup_steps(steps)
    return evaluating_trainer(
        model,
        strategy=strategy,
        keep=keep,
        seed=cell.seed,
        steps=-1 if steps is None else steps,
        warmup_steps=warmup,
        batch_size=settings.batch_size,
        eval_batch_size=settings.eval_batch_size,
        learning_rate=settings.learning_rate,
        device=settings.device,
        train=cell.train,
        validation=cell.validation,
        tokenizer=tokenizer,
        output_dir=output_dir,
        lr_scheduler_type="linear",
        **extra,
    )


@dataclass
class Calibration:
    """A strategy's measured step time (``step_s``), first-step overhead (``startup_s``) and the wall clock the
    calibration took (``wall_s``)."""

    step_s: float
    startup_s: float
    wall_s: float
    warm_step_s: float | None = None
    """For a strategy with a per-example cache: the step time after the first epoch (see :func:`calibrate`)."""
    cold_steps: int = 0
    """The steps before ``warm_step_s`` applies (an epoch)."""


def calibrate(
    model: PreTrainedModel,
    strategy: str,
    keep: float,
    cell: Cell,
    settings: TimeToAccuracySettings,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str,
) -> Calibration:
    """Train a deep copy of ``model`` for one warm-up step and ``settings.calibration_steps`` timed steps of
    ``strategy`` on the cell's data (the run's first batches), discard it, and return the step time
    (:func:`calibrated_step`). ``model`` itself is not touched.

    A strategy with a per-example cache (``uses_example_cache``: the stale-* ones) scores every row in its first
    epoch and mostly skips the scoring pass after it, so one step time would undersize its schedule (it would end
    long before the budget). Its calibration run goes on for a whole epoch plus ``calibration_steps`` steps, and
    ``warm_step_s`` is the median of the steps after the epoch: the run's schedule is an epoch at ``step_s`` and
    the rest of the budget at ``warm_step_s``. Steps of later epochs may still score rows whose statistics grew
    too old, so such a run is more likely to be stopped by the budget a few steps before its schedule's end
    (``stopped_by_budget``) than to end early."""
    started = time.perf_counter()
    copied = copy.deepcopy(model)
    chosen = strategy_class(strategy)
    cached = chosen.needs_scoring and chosen.uses_example_cache  # steps get cheaper once the cache is warm
    epoch = math.ceil(len(cell.train) / settings.batch_size)
    steps = 1 + settings.calibration_steps + (epoch if cached else 0)
    trainer = build_trainer(copied, strategy, keep, steps, cell, settings, tokenizer, output_dir)
    timer = StepClock(device_clock(settings.device))
    trainer.add_callback(timer)
    trainer.train()
    cold_ends = timer.step_ends[: 1 + settings.calibration_steps]
    step_s, startup_s = calibrated_step(timer.begin, cold_ends)
    calibration = Calibration(step_s, startup_s, 0.0)
    if cached:
        warm_ends = timer.step_ends[epoch:]  # from the end of the first epoch's last step
        calibration.warm_step_s = statistics.median(b - a for a, b in zip(warm_ends[:-1], warm_ends[1:], strict=True))
        calibration.cold_steps = epoch
    del trainer, copied
    gc.collect()
    calibration.wall_s = time.perf_counter() - started
    return calibration


def train_cell_run(
    cell: Cell,
    strategy: str,
    keep: float,
    settings: TimeToAccuracySettings,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str,
    output_dir: str,
    budget: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One run of the cell, as a row of ``time_to_accuracy.json`` (without ``sitting`` and ``machine``).

    Without ``budget`` it is the full-batch run: ``settings.epochs`` epochs, evaluated every ``steps / eval_points``
    steps; its ``budget_s`` is its own training time and its ``target`` :data:`TARGET_FRACTION` of its final
    accuracy. With ``budget = (budget_s, target)`` the step time is calibrated first (:func:`calibrate`), the
    schedule sized with :func:`schedule_steps`, and the run evaluated every ``budget_s / eval_points`` seconds of
    training and stopped at ``budget_s``.
    """
    model = load_model(model_path, cell.num_labels, cell.seed, settings.device)
    calibration = None
    epochs_run = budget is not None and prunes_dataset(strategy)
    if budget is None:
        steps = settings.full_batch_steps(len(cell.train))
    elif epochs_run:
        steps = None  # the full batch's epochs, pruned: the step count is known at the end
    else:
        calibration = calibrate(model, strategy, keep, cell, settings, tokenizer, output_dir)
        steps = schedule_steps(
            budget[0], calibration.step_s, calibration.startup_s, calibration.warm_step_s, calibration.cold_steps
        )
    trainer = build_trainer(model, strategy, keep, steps, cell, settings, tokenizer, output_dir)
    scored = [0]

    def count_scoring() -> None:
        record = trainer.last_selection
        if trainer.strategy.selective and record is not None and record.scored:
            scored[0] += record.batch_size

    def evaluate() -> float:
        return trainer.evaluate(metric_key_prefix="curve")["curve_accuracy"]

    if budget is None:
        every = max(1, steps // settings.eval_points)
        callback = BudgetCallback(evaluate, eval_every_steps=every, clock=device_clock(settings.device))
    else:
        interval = budget[0] / settings.eval_points
        callback = BudgetCallback(
            evaluate, budget_s=budget[0], eval_interval_s=interval, clock=device_clock(settings.device)
        )
    callback.on_step = count_scoring
    trainer.add_callback(callback)
    plans = PlanRecorder(trainer)
    trainer.add_callback(plans)
    metrics = trainer.train().metrics
    final = callback.curve[-1][1]
    warmup = warmup_steps(settings.full_batch_steps(len(cell.train)) if steps is None else steps)
    steps = trainer.state.max_steps if steps is None else steps
    budget_s, target = (callback.train_s, TARGET_FRACTION * final) if budget is None else budget
    row = {
        "dataset": cell.dataset,
        "label_noise": cell.label_noise,
        "seed": cell.seed,
        "strategy": strategy,
        "keep": keep,
        "budget_s": budget_s,
        "target": target,
        "curve": callback.curve,
        "time_to_target_s": time_to_target(callback.curve, target),
        "final_accuracy": final,
        "steps": trainer.state.global_step,
        "backprop_examples": trainer.sbp_backprop_examples,
        "scoring_forward_examples": scored[0],
        "sitting": None,
        "machine": None,
        "train_s": callback.train_s,
        "eval_s": callback.eval_s,
        "planned_steps": steps,
        "warmup_steps": warmup,
        "step_s": calibration.step_s if calibration else callback.train_s / max(1, trainer.state.global_step),
        "startup_s": calibration.startup_s if calibration else None,
        "calibration_s": calibration.wall_s if calibration else 0.0,
        "stopped_by_budget": callback.stopped_by_budget,
        "train_examples": len(cell.train),
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "max_seq_length": settings.max_seq_length,
        "eval_samples": len(cell.validation),
        "learning_rate": settings.learning_rate,
        "flipped_labels": cell.flipped_labels,
        "warm_step_s": calibration.warm_step_s if calibration else None,
        "schedule": "epochs" if epochs_run else "steps",
        "pruned_fraction": metrics.get(run_key(PRUNED_FRACTION)),
        "flipped_share_visited": plans.flipped_share(cell.flipped) if cell.flipped else None,
    }
    return row


# ---- the grid and resuming --------------------------------------------------------------------------


def _pair(strategy: str, keep: float) -> tuple[str, float]:
    return (strategy, round(float(keep), 6))


def runs_to_make(
    existing: Iterable[dict[str, Any]], cell: tuple[str, float, int], grid: list[tuple[str, float]]
) -> list[tuple[str, float]]:
    """The (strategy, keep) runs to make for ``cell`` = (dataset, label_noise, seed) in a new sitting, given the
    ``existing`` rows and the requested ``grid`` (``(none, 1.0)`` first, as :func:`strategy_grid` makes it).

    Nothing if every run of the grid is already recorded for the cell. Otherwise the missing runs, with the full
    batch (the budget and target come from the same sitting) and the random subset at each missing run's keep
    (the baseline the report compares within a sitting; if it is requested or was recorded before) beside them; a
    missing dataset-level run (keep 1.0) brings the random subset at every keep of the grid and ``random-prune``, its
    own baseline: the full batch first, then the grid's order, then recorded baseline runs not in the grid.
    """
    done = {
        _pair(r["strategy"], r["keep"])
        for r in existing
        if (r["dataset"], r["label_noise"], r["seed"]) == (cell[0], cell[1], cell[2])
    }
    wanted = [_pair(s, k) for s, k in grid]
    missing = [pair for pair in wanted if pair not in done]
    if not missing:
        return []
    plan = {_pair(FULL_BATCH, 1.0), *missing}
    batch_keeps = {keep for strategy, keep in wanted if strategy != FULL_BATCH and not prunes_dataset(strategy)}
    for strategy, keep in missing:
        if strategy == FULL_BATCH:
            continue
        baselines = [_pair(BUDGET_STRATEGY, keep)]
        if prunes_dataset(strategy):
            baselines = [_pair(BUDGET_STRATEGY, k) for k in sorted(batch_keeps)] + [_pair(PRUNING_BASELINE, 1.0)]
        plan.update(baseline for baseline in baselines if baseline in wanted or baseline in done)
    ordered = [pair for pair in [_pair(FULL_BATCH, 1.0), *wanted] if pair in plan]
    ordered = list(dict.fromkeys(ordered))
    return ordered + sorted(plan - set(ordered))


def new_sitting_id() -> str:
    """An id of this invocation, its start time in UTC (``2025-01-31T12:34:56.789012Z``): ids sort by time."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def run_time_to_accuracy(ctx: BenchmarkContext, machine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every dataset x noise x seed cell, each run of :func:`runs_to_make`, appended to
    ``<output_dir>/time_to_accuracy.json`` after every run; returns all its rows (old and new)."""
    bench = ctx.bench
    settings = TimeToAccuracySettings.from_arguments(bench)
    path = os.path.join(bench.output_dir, f"{JSON_NAME}.json")
    _, rows = load_rows(bench.output_dir, JSON_NAME)
    sitting = new_sitting_id()
    grid = strategy_grid(bench.strategy_names, bench.training_keep_values)
    noises, seeds = bench.tta_noise_values, bench.seed_values
    cells = [(name, spec, noise, seed) for name, spec in bench.dataset_specs() for noise in noises for seed in seeds]
    data_cache: dict[str, Data] = {}
    for number, (name, spec, noise, seed) in enumerate(cells, 1):
        plan = runs_to_make(rows, (name, noise, seed), grid)
        label = f"time-to-accuracy cell {number}/{len(cells)} {name} noise={noise} seed={seed}"
        if not plan:
            ctx.progress(f"{label}: every run recorded, skipped")
            continue
        if name not in data_cache:
            data_cache[name] = Data(spec, ctx.tokenizer, bench.seq_len)
        cell_settings = dataclasses.replace(settings, learning_rate=bench.tta_learning_rate(name))
        cell = Cell.from_data(name, data_cache[name], noise, seed, cell_settings)
        budget = None
        for strategy, keep in plan:
            row = train_cell_run(
                cell, strategy, keep, cell_settings, ctx.tokenizer, ctx.model_path, ctx.scratch_dir, budget=budget
            )
            gc.collect()
            if budget is None:
                budget = (row["budget_s"], row["target"])
            row.update(sitting=sitting, machine=machine)
            rows.append(row)
            write_json(path, machine, rows, verbose=False)
            reached = row["time_to_target_s"]
            ctx.progress(
                f"{label} {strategy}@{keep}: {row['steps']}/{row['planned_steps']} steps in {row['train_s']:.1f} s "
                f"(budget {row['budget_s']:.1f} s), final acc {row['final_accuracy']:.4f}, target "
                f"{row['target']:.4f} " + ("not reached" if reached is None else f"reached at {reached:.1f} s")
            )
    write_json(path, machine, rows)
    return rows


# ---- statistics for the report ----------------------------------------------------------------------


def _time(row: dict[str, Any]) -> float:
    value = row["time_to_target_s"]
    return math.inf if value is None else float(value)


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def _ratio(numerator: float, denominator: float) -> float:
    if math.isnan(numerator) or math.isnan(denominator) or (math.isinf(numerator) and math.isinf(denominator)):
        return math.nan
    if denominator == 0:
        return math.nan
    return numerator / denominator


def paired_runs(
    rows: list[dict[str, Any]],
    dataset: str,
    noise: float,
    strategy: str,
    keep: float,
    baseline_keep: float | None = None,
    baseline: str = BUDGET_STRATEGY,
) -> list[tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]]:
    """Per seed: ``(run, baseline, full)``: the run of ``strategy`` at ``keep`` from the latest sitting that has it with
    the ``baseline`` strategy (the random subset) at ``baseline_keep`` (default ``keep``) and the full batch (else the
    latest sitting that has it), and that sitting's baseline and full-batch runs (``None`` where it has none)."""
    baseline_keep = keep if baseline_keep is None else baseline_keep
    target, paired, full = _pair(strategy, keep), _pair(baseline, baseline_keep), _pair(FULL_BATCH, 1.0)
    cell_rows = [r for r in rows if r["dataset"] == dataset and r["label_noise"] == noise]
    out = []
    for seed in sorted({r["seed"] for r in cell_rows}):
        by_sitting: dict[str, dict[tuple[str, float], dict[str, Any]]] = defaultdict(dict)
        for r in cell_rows:
            if r["seed"] == seed:
                by_sitting[r.get("sitting") or ""][_pair(r["strategy"], r["keep"])] = r
        sittings = sorted(s for s, runs in by_sitting.items() if target in runs)
        if not sittings:
            continue
        complete = [s for s in sittings if paired in by_sitting[s] and full in by_sitting[s]]
        runs = by_sitting[(complete or sittings)[-1]]
        out.append((runs[target], runs.get(paired), runs.get(full)))
    return out


def _vs(pairs: list[tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]], median: float) -> float:
    """``median`` over the median time to target of the pairs' baseline runs."""
    return _ratio(median, _median([_time(b) for _, b, _ in pairs if b is not None]))


def comparison_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset, noise and keep, for the full batch, every per-batch strategy at that keep (in registration order)
    and every dataset-level strategy (at keep 1.0, in every keep's group): the median over seeds of the time to
    target (``inf`` if most runs never reached it) and its ratios to the medians of the random subset's (at the
    group's keep), the full batch's and, for dataset-level strategies, ``random-prune``'s runs of the same sittings
    (:func:`paired_runs`; ``vs_random_prune`` is NaN for the others), how many runs reached the target, and the
    medians of the final accuracy, budget, target, steps made and planned, and time to target as a share of the
    budget."""
    table = []
    for dataset, noise in sorted({(r["dataset"], r["label_noise"]) for r in rows}):
        group = [r for r in rows if r["dataset"] == dataset and r["label_noise"] == noise]
        whole = strategy_order(r["strategy"] for r in group if prunes_dataset(r["strategy"]))
        batch_rows = [r for r in group if r["strategy"] != FULL_BATCH and not prunes_dataset(r["strategy"])]
        keeps = sorted({r["keep"] for r in batch_rows}, reverse=True) or ([1.0] if whole else [])
        for keep in keeps:
            names = strategy_order(r["strategy"] for r in batch_rows if r["keep"] == keep)
            for strategy in [FULL_BATCH, *names, *whole]:
                at = 1.0 if strategy == FULL_BATCH or strategy in whole else keep
                pairs = paired_runs(group, dataset, noise, strategy, at, baseline_keep=keep)
                if not pairs:
                    continue
                runs = [run for run, _, _ in pairs]
                median = _median([_time(r) for r in runs])
                vs_prune = math.nan
                if strategy in whole:
                    vs_prune = _vs(paired_runs(group, dataset, noise, strategy, 1.0, 1.0, PRUNING_BASELINE), median)
                table.append(
                    {
                        "dataset": dataset,
                        "label_noise": noise,
                        "keep": keep,
                        "strategy": strategy,
                        "runs": len(runs),
                        "reached": sum(r["time_to_target_s"] is not None for r in runs),
                        "median_time_to_target_s": median,
                        "vs_random": _vs(pairs, median),
                        "vs_full_batch": _ratio(median, _median([_time(f) for _, _, f in pairs if f is not None])),
                        "vs_random_prune": vs_prune,
                        "median_final_accuracy": _median([r["final_accuracy"] for r in runs]),
                        "median_budget_s": _median([r["budget_s"] for r in runs]),
                        "median_target": _median([r["target"] for r in runs]),
                        "median_steps": _median([r["steps"] for r in runs]),
                        "median_planned_steps": _median([r.get("planned_steps") or r["steps"] for r in runs]),
                        "median_share_of_budget": _median([_time(r) / r["budget_s"] for r in runs]),
                    }
                )
    return table


def pruning_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset, noise and dataset-level strategy (the runs :func:`selected_runs` picks): the medians over seeds of
    the share of the examples its epochs left out, of the steps it made against the full batch's, of its final
    accuracy, and, under label noise, of the share of mislabelled examples among those its pruned epochs visited
    and in the training subset."""
    runs = selected_runs(rows)
    key = ("dataset", "label_noise", "seed", "sitting")
    fulls = {tuple(r.get(k) for k in key): r for r in runs if r["strategy"] == FULL_BATCH}
    out = []
    for dataset, noise, strategy in sorted({(r["dataset"], r["label_noise"], r["strategy"]) for r in runs}):
        if not prunes_dataset(strategy):
            continue
        group = [r for r in runs if (r["dataset"], r["label_noise"], r["strategy"]) == (dataset, noise, strategy)]
        steps = []
        for r in group:
            full = fulls.get(tuple(r.get(k) for k in key))
            if full is not None:
                steps.append(r["steps"] / full["steps"])
        shares = [r["flipped_share_visited"] for r in group if r.get("flipped_share_visited") is not None]
        out.append(
            {
                "dataset": dataset,
                "label_noise": noise,
                "strategy": strategy,
                "runs": len(group),
                "median_pruned_fraction": _median([r["pruned_fraction"] for r in group if r.get("pruned_fraction")]),
                "median_steps_vs_full": _median(steps),
                "median_final_accuracy": _median([r["final_accuracy"] for r in group]),
                "median_flipped_share_visited": _median(shares),
                "median_flipped_share_train": _median(
                    [r["flipped_labels"] / r["train_examples"] for r in group if r.get("train_examples")]
                ),
            }
        )
    return out


def first_to_target(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset, noise and keep of :func:`comparison_table`: the strategy that reached the target first
    (``winner``, ``None`` if no strategy's median reached it) and the ``runner_up``, with their median times to
    target (``*_s``) and ratios to the random subset's (``*_vs_random``), the winner's lead in seconds (``lead_s``)
    and as a ratio of the two ratios (``lead_ratio`` = winner / runner-up, below 1).

    Strategies are ranked by their ratio to the random subset of their own sittings (times compare only within a
    sitting); those without one (no random subset beside them, or neither reached the target) follow, by median time.
    """
    out = []
    for key in dict.fromkeys((e["dataset"], e["label_noise"], e["keep"]) for e in table):
        entries = [e for e in table if (e["dataset"], e["label_noise"], e["keep"]) == key]

        def rank(entry: dict[str, Any]) -> tuple[int, float, float, str]:
            ratio, seconds = entry["vs_random"], entry["median_time_to_target_s"]
            comparable = not math.isnan(ratio) and not math.isinf(ratio) and math.isfinite(seconds)
            return (0 if comparable else 1, ratio if comparable else 0.0, seconds, entry["strategy"])

        entries.sort(key=rank)
        winner = entries[0] if entries and math.isfinite(entries[0]["median_time_to_target_s"]) else None
        runner_up = entries[1] if winner is not None and len(entries) > 1 else None
        result = {
            "dataset": key[0],
            "label_noise": key[1],
            "keep": key[2],
            "winner": None,
            "winner_s": math.nan,
            "winner_vs_random": math.nan,
            "runner_up": None,
            "runner_up_s": math.nan,
            "runner_up_vs_random": math.nan,
            "lead_s": math.nan,
            "lead_ratio": math.nan,
        }
        if winner is not None:
            result.update(
                winner=winner["strategy"],
                winner_s=winner["median_time_to_target_s"],
                winner_vs_random=winner["vs_random"],
            )
        if runner_up is not None:
            result.update(
                runner_up=runner_up["strategy"],
                runner_up_s=runner_up["median_time_to_target_s"],
                runner_up_vs_random=runner_up["vs_random"],
                lead_s=runner_up["median_time_to_target_s"] - winner["median_time_to_target_s"],
                lead_ratio=_ratio(winner["vs_random"], runner_up["vs_random"]),
            )
        out.append(result)
    return out


def selected_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs the report plots: per dataset, noise, seed, strategy and keep, the run :func:`paired_runs` picks
    (the full batch's beside the random subset at the largest keep)."""
    chosen = []
    for dataset, noise in sorted({(r["dataset"], r["label_noise"]) for r in rows}):
        group = [r for r in rows if (r["dataset"], r["label_noise"]) == (dataset, noise)]
        keeps = [r["keep"] for r in group if r["strategy"] != FULL_BATCH and not prunes_dataset(r["strategy"])]
        for strategy, keep in sorted({_pair(r["strategy"], r["keep"]) for r in group}):
            whole = strategy == FULL_BATCH or prunes_dataset(strategy)
            baseline_keep = max(keeps, default=1.0) if whole else keep
            chosen += [run for run, _, _ in paired_runs(group, dataset, noise, strategy, keep, baseline_keep)]
    return chosen
