"""The time-to-accuracy runs' clocks: a training clock that pauses for evaluation, a learning-rate schedule that is a
function of that clock, evaluation marks at fixed fractions of the budget, and a cheap evaluator."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from ..trainer import SelectiveBackpropTrainer

WARMUP_FRACTION = 0.1
"""Every run's learning rate warms up linearly over this fraction of its schedule, then decays linearly to 0."""
_EPS = 1e-9


def linear_warmup_decay(fraction: float, warmup_fraction: float = WARMUP_FRACTION) -> float:
    """The learning-rate factor at ``fraction`` of a schedule: ``fraction / warmup_fraction`` during the warm-up, then
    ``(1 - fraction) / (1 - warmup_fraction)`` down to 0 at the end (and after it). ``transformers``' ``linear``
    schedule is this function of ``step / steps`` (with ``warmup_steps = ceil(warmup_fraction * steps)``); the
    budgeted runs use it of ``t / T``."""
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction={warmup_fraction!r} is invalid; it must be in [0, 1).")
    fraction = max(0.0, fraction)
    if fraction < warmup_fraction:
        return fraction / warmup_fraction
    return max(0.0, (1.0 - fraction) / (1.0 - warmup_fraction))


def warmup_steps(steps: int, fraction: float = WARMUP_FRACTION) -> int:
    """Warm-up steps of a ``steps``-step schedule: ``ceil(fraction * steps)``, as ``TrainingArguments`` rounds a
    fractional ``warmup_steps``."""
    return math.ceil(fraction * steps - _EPS)


class TrainingClock:
    """Training time: runs between :meth:`start` and :meth:`pause`, so evaluations can be left out of it.

    Args:
        clock: the time source (``time.perf_counter``; a fake one in tests; one that waits for the device's queued
            work on CUDA).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._spent = 0.0
        self._since: float | None = None

    def start(self) -> None:
        """Start (or resume) counting."""
        if self._since is None:
            self._since = self.clock()

    def pause(self) -> None:
        """Stop counting until the next :meth:`start`."""
        if self._since is not None:
            self._spent += self.clock() - self._since
            self._since = None

    def credit(self, seconds: float) -> None:
        """Count ``seconds`` spent outside the clock's sight (work done once before training, such as computing
        RHO-LOSS's irreducible losses) as training time."""
        self._spent += seconds

    def elapsed(self) -> float:
        """The training seconds so far (read live while running)."""
        running = 0.0 if self._since is None else self.clock() - self._since
        return self._spent + running


class WallClockScheduleTrainer(SelectiveBackpropTrainer):
    """A :class:`~hf_sbp.SelectiveBackpropTrainer` whose learning rate is :func:`linear_warmup_decay` of its own
    training time over a budget: set :attr:`schedule_fraction` (a callable returning ``t / T``) before ``train()``.
    Without it the trainer is the plain one (``args.lr_scheduler_type``)."""

    schedule_fraction: Callable[[], float] | None = None

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.schedule_fraction is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            fraction = self.schedule_fraction
            # LambdaLR passes its step count, which a time schedule ignores: the factor is read off the clock at
            # every scheduler step (right after each optimizer step, so it sets the next step's rate).
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer if optimizer is not None else self.optimizer, lambda _: linear_warmup_decay(fraction())
            )
        return self.lr_scheduler


def mark_steps(steps: int, marks: int) -> list[int]:
    """The step at which each of a ``steps``-step run's ``marks`` marks falls due: ``round(i * steps / marks)`` for
    ``i = 1 .. marks``, at least 1 (several marks fall due at once when there are fewer steps than marks)."""
    return [max(1, round(i * steps / marks)) for i in range(1, marks + 1)]


class MarkedRun(TrainerCallback):
    """Evaluates a run at fixed fractions of its budget, keeps its training clock and cost clock, and stops it.

    With ``budget_s`` (a budgeted run) mark ``i`` of ``marks`` falls due at ``i / marks * budget_s`` training seconds
    and is evaluated at the first step end at or after it; the run stops at the first step end at or after
    ``budget_s``. With ``steps`` (the full batch, which defines the budget) mark ``i`` falls after step
    :func:`mark_steps`. Either way a run that ends first (its schedule's last step) is evaluated then, with the
    share of the budget it reached as its mark. The clock pauses during evaluations.

    The curve holds ``[mark, train_s, cost, accuracy]`` per evaluation.

    Args:
        evaluate: returns the current validation accuracy.
        marks: evaluation marks per run.
        clock: the run's training clock.
        step_cost: returns the forward-equivalents the step that just ended spent.
        budget_s: the training seconds allowed (a budgeted run).
        steps: the run's steps (the full batch).
        upfront: returns ``(seconds, cost)`` of work the run did once before training started (0 for most
            strategies), charged to both clocks when training begins.
    """

    def __init__(
        self,
        evaluate: Callable[[], float],
        marks: int,
        clock: TrainingClock,
        step_cost: Callable[[], float],
        budget_s: float | None = None,
        steps: int | None = None,
        upfront: Callable[[], tuple[float, float]] | None = None,
    ) -> None:
        if (budget_s is None) == (steps is None):
            raise ValueError("give exactly one of budget_s (a budgeted run) and steps (the full batch).")
        if marks < 1:
            raise ValueError(f"marks={marks!r} is invalid; a run needs at least one evaluation mark.")
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"budget_s={budget_s!r} is invalid; the budget must be positive.")
        self.evaluate = evaluate
        self.marks = marks
        self.clock = clock
        self.step_cost = step_cost
        self.budget_s = budget_s
        self.steps = steps
        self._due_steps = mark_steps(steps, marks) if steps is not None else []
        self.next_mark = 1
        self.cost = 0.0
        self.curve: list[list[float]] = []
        self.eval_s = 0.0
        self.stopped_by_budget = False
        self.upfront = upfront

    def fraction(self) -> float:
        """The share of the budget spent (a budgeted run's schedule position)."""
        return self.clock.elapsed() / self.budget_s if self.budget_s else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.upfront is not None:
            seconds, cost = self.upfront()
            self.clock.credit(seconds)
            self.cost += cost
        self.clock.start()

    def _due_mark(self, step: int, train_s: float) -> float | None:
        """The latest mark that fell due by now (``None`` if none did), advancing past every mark that did."""
        due = None
        while self.next_mark <= self.marks:
            if self.budget_s is not None:
                reached = train_s >= self.next_mark / self.marks * self.budget_s - _EPS
            else:
                reached = step >= self._due_steps[self.next_mark - 1]
            if not reached:
                break
            due = self.next_mark / self.marks
            self.next_mark += 1
        return due

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.pause()
        self.cost += float(self.step_cost())
        train_s = self.clock.elapsed()
        mark = self._due_mark(state.global_step, train_s)
        over = self.budget_s is not None and train_s >= self.budget_s - _EPS
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        if mark is None and (over or last):
            mark = min(1.0, train_s / self.budget_s) if self.budget_s else 1.0
        if mark is not None:
            started = time.perf_counter()
            self.curve.append([mark, train_s, self.cost, float(self.evaluate())])
            self.eval_s += time.perf_counter() - started
        if over:
            self.stopped_by_budget = True
            control.should_training_stop = True
        self.clock.start()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.clock.pause()


class AccuracyEvaluator:
    """Validation accuracy, cheaply: the examples sorted by length and collated once into batches padded to each
    batch's longest row, a forward without autograd in eval mode, argmax against the labels.

    Args:
        model: the model being trained (evaluated in place; its training mode is restored).
        dataset: tokenised rows with ``labels``.
        tokenizer: pads the batches.
        batch_size: rows per forward.
        device: where the model is.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        dataset: Any,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 256,
        device: str = "cpu",
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the validation sample is empty; the benchmark needs validation examples to evaluate.")
        self.model = model
        collate = DataCollatorWithPadding(tokenizer)
        columns = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "token_type_ids", "labels")]
        rows = [{c: dataset[i][c] for c in columns} for i in range(len(dataset))]
        rows.sort(key=lambda row: len(row["input_ids"]))
        self.batches = []
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            self.batches.append({k: v.to(device) for k, v in batch.items()})
        self.examples = len(rows)

    def __call__(self) -> float:
        was_training = self.model.training
        self.model.eval()
        right = 0
        with torch.inference_mode():
            for batch in self.batches:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logits = self.model(**inputs).logits
                right += int((logits.argmax(-1) == batch["labels"]).sum())
        self.model.train(was_training)
        return right / self.examples
