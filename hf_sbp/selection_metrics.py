"""The selection metrics the trainer logs: their keys, how each is reduced, each step's record, and their
accumulation.

Per logging interval the trainer merges ``sbp/<name>`` into its training logs; over the whole run it adds
``train_sbp/<name>`` to the end-of-training summary (and to ``train()``'s returned metrics). Every key and its
reduction is declared once, here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._utils import is_number

PREFIX = "sbp/"
RUN_PREFIX = "train_"
"""The whole-run value of ``sbp/x`` is logged as ``train_sbp/x``, as ``Trainer`` names its run summary."""

MEAN = "mean"
"""Averaged over the steps (and processes) that reported a value."""
STEPS = "steps"
"""A count of steps on which every process agrees (selection depends only on the step number): summed over steps,
averaged over processes."""
EVENTS = "events"
"""A count of per-process events: summed over steps and over processes."""

BACKPROP_FRACTION = "sbp/backprop_fraction"
SCORING_TIME_SHARE = "sbp/scoring_time_share"
SELECTION_TIME_SHARE = "sbp/selection_time_share"
GRAD_MATCH_ERROR = "sbp/grad_match_error"
SCORED_FRACTION = "sbp/scored_fraction"
SCORING_SKIPPED = "sbp/scoring_skipped"
SELECTIVE_STEPS = "sbp/selective_steps"
FALLBACK_STEPS = "sbp/fallback_steps"
IMPORTANCE_SAMPLING = "sbp/importance_sampling"
VARIANCE_REDUCTION = "sbp/variance_reduction"

METRICS: dict[str, str] = {
    BACKPROP_FRACTION: MEAN,  # rows backpropagated / rows in the batch
    SCORING_TIME_SHARE: MEAN,  # share of the step's time in the no-grad scoring forward
    SELECTION_TIME_SHARE: MEAN,  # share in everything else selection adds (residuals, Gram, OMP, gathering)
    GRAD_MATCH_ERROR: MEAN,  # relative last-layer gradient-match error of the weighted subset (scored steps only)
    SCORED_FRACTION: MEAN,  # rows the scoring pass covered / rows in the batch (strategies that score)
    SCORING_SKIPPED: MEAN,  # share of steps that skipped the scoring pass on cached statistics (stale-*)
    SELECTIVE_STEPS: STEPS,  # steps inside the selection schedule
    FALLBACK_STEPS: EVENTS,  # steps that trained on the full batch because the scores were not finite
    IMPORTANCE_SAMPLING: MEAN,  # importance: share of steps with the switch on (scored and sampled)
    VARIANCE_REDUCTION: MEAN,  # importance: the smoothed variance-reduction estimate tau the switch compares
}
"""Every selection metric and its reduction, in a fixed order (every process reduces the same tensor)."""

KEYS = tuple(METRICS)

PRUNED_FRACTION = "sbp/pruned_fraction"
"""Dataset-level strategies, logged once per epoch as it starts: the share of the training set it leaves out; over
the whole run (``train_sbp/pruned_fraction``): examples left out / (epochs x training set)."""
EPOCH_EXAMPLES = "sbp/epoch_examples"
"""Logged once per epoch as it starts: the examples it visits; over the whole run, the examples all epochs visited."""
IL_SECONDS = "sbp/il_seconds"
"""``rho-loss``: the wall-clock seconds of the irreducible losses (their models' training and forward), spent when
``train()`` starts and outside ``train_runtime``; in the run summary only (``train_sbp/il_seconds``)."""
EPOCH_PRUNED = "sbp/epoch_pruned"
"""Logged once per epoch as it starts: the examples it leaves out; over the whole run, their sum."""


def run_key(key: str) -> str:
    """The name of ``key``'s whole-run value in the training summary (``train_sbp/...``)."""
    return RUN_PREFIX + key


@dataclass
class SelectionRecord:
    """What the trainer did to select the rows of one batch."""

    batch_size: int
    subset_size: int
    scored: bool
    selective: bool = True
    scoring_s: float = 0.0
    selection_s: float = 0.0
    grad_match_error: float = math.nan
    fallback: bool = False
    problem_type: str | None = None
    scored_rows: int | None = None
    """Rows the scoring pass covered; ``None`` means all of them when ``scored``, none otherwise."""
    scoring_strategy: bool = False
    """Whether the strategy scores at all (``needs_scoring``), so that the scoring fractions are logged."""
    strategy_metrics: dict[str, float] = field(default_factory=dict)
    """The strategy's own metrics for this step (:meth:`~hf_sbp.SelectionStrategy.step_metrics`), keys of
    :data:`METRICS`."""

    def metrics(self, step_s: float) -> dict[str, float]:
        """This step's values of the selection metrics, for a step that took ``step_s`` seconds in all."""
        return {
            BACKPROP_FRACTION: self.subset_size / self.batch_size,
            SCORING_TIME_SHARE: self.scoring_s / step_s if step_s > 0 else math.nan,
            SELECTION_TIME_SHARE: self.selection_s / step_s if step_s > 0 else math.nan,
            GRAD_MATCH_ERROR: self.grad_match_error,
            SCORED_FRACTION: self.scored_fraction if self.scoring_strategy else math.nan,
            SCORING_SKIPPED: float(not self.scored) if self.scoring_strategy else math.nan,
            SELECTIVE_STEPS: float(self.selective),
            FALLBACK_STEPS: float(self.fallback),
            **self.strategy_metrics,
        }

    @property
    def flops_factor(self) -> float:
        """The step's forward + backward FLOPs relative to a full batch's: the scoring forward over the rows it
        covers (a third of a training step's per row) plus forward and backward over the subset."""
        return self.scored_fraction / 3.0 + self.subset_size / self.batch_size

    @property
    def scored_fraction(self) -> float:
        """The share of the batch's rows that the scoring pass covered."""
        if not self.scored:
            return 0.0
        return 1.0 if self.scored_rows is None else self.scored_rows / self.batch_size


class SelectionMetrics:
    """Accumulates the per-step selection metrics, per logging interval and over the whole run."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new run)."""
        size = len(KEYS)
        self._interval = torch.zeros(2, size, dtype=torch.float64)  # sums, counts
        self._run = torch.zeros(2, size, dtype=torch.float64)

    def add(self, values: Mapping[str, float]) -> None:
        """Record one step's values; missing or NaN values (e.g. no match error without scoring) are skipped."""
        for position, key in enumerate(KEYS):
            value = values.get(key)
            if value is None or value != value:
                continue
            for totals in (self._interval, self._run):
                totals[0, position] += value
                totals[1, position] += 1

    def reduce(
        self,
        whole_run: bool = False,
        world_size: int = 1,
        sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """The metrics since the last interval reduction (which resets them), or over the whole run.

        Args:
            whole_run: the run's totals instead of the current interval's.
            world_size: the number of processes.
            sum_across_processes: sums a tensor over processes (every process must call this together);
                ``None`` for a single process.
        """
        totals = self._run.clone() if whole_run else self._interval.clone()
        if not whole_run:
            self._interval.zero_()
        if sum_across_processes is not None and world_size > 1:
            totals = sum_across_processes(totals)
        sums, counts = totals[0], totals[1]
        metrics = {}
        for position, (key, reduction) in enumerate(METRICS.items()):
            if counts[position] == 0:
                continue
            if reduction == STEPS:
                metrics[key] = float(sums[position]) / max(world_size, 1)
            elif reduction == EVENTS:
                metrics[key] = float(sums[position])
            else:
                metrics[key] = float(sums[position] / counts[position])
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The whole-run totals (the interval's restart at a checkpoint's next log anyway)."""
        return {"keys": list(KEYS), "run": self._run.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = dict(zip(state["keys"], state["run"].T, strict=True))
        self._run = torch.stack([saved.get(key, torch.zeros(2, dtype=torch.float64)) for key in KEYS], dim=1).to(
            torch.float64
        )


def selection_statistics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The selection metrics over a run, from ``trainer.state.log_history``.

    Each training log holds the ``sbp/*`` means over its logging interval; the run's means weight each interval by
    its number of steps (the ``step`` difference to the previous training log). ``sbp/selective_steps`` and
    ``sbp/fallback_steps`` are summed. Keys: ``logged_intervals``, ``logged_steps``, ``mean_backprop_fraction``,
    ``mean_scoring_time_share``, ``mean_selection_time_share``, ``mean_selecting_time_share`` (their sum),
    ``mean_grad_match_error``, ``selective_steps``, ``fallback_steps``; a mean is ``None`` when never logged.
    """
    means = {key: "mean_" + key.removeprefix(PREFIX) for key, kind in METRICS.items() if kind == MEAN}
    sums = {key: 0.0 for key in means}
    weights = {key: 0.0 for key in means}
    totals = {key: 0.0 for key, kind in METRICS.items() if kind != MEAN}
    intervals, steps, previous_step = 0, 0, 0
    for entry in log_history:
        if not any(key in entry for key in (*means, *totals)):
            if "loss" in entry and "step" in entry:
                previous_step = int(entry["step"])
            continue
        step = int(entry.get("step", previous_step + 1))
        weight = max(step - previous_step, 1)
        previous_step = step
        intervals += 1
        steps += weight
        for key in means:
            value = entry.get(key)
            if is_number(value) and math.isfinite(value):
                sums[key] += weight * value
                weights[key] += weight
        for key in totals:
            if is_number(entry.get(key)):
                totals[key] += entry[key]
    stats: dict[str, Any] = {"logged_intervals": intervals, "logged_steps": steps}
    for key, name in means.items():
        stats[name] = sums[key] / weights[key] if weights[key] > 0 else None
    # The end-of-training summary holds the same metrics over every step of the run, the last partial
    # logging interval included: prefer them.
    summary = next((entry for entry in reversed(log_history) if run_key(SELECTIVE_STEPS) in entry), None)
    stats["whole_run"] = summary is not None
    if summary is not None:
        stats["logged_steps"] = int(summary.get("step", steps))
        for key, name in means.items():
            value = summary.get(run_key(key))
            stats[name] = value if is_number(value) and math.isfinite(value) else stats[name]
        for key in totals:
            if is_number(summary.get(run_key(key))):
                totals[key] = summary[run_key(key)]
    scoring, selection = stats["mean_scoring_time_share"], stats["mean_selection_time_share"]
    stats["mean_selecting_time_share"] = (
        None if scoring is None and selection is None else (scoring or 0) + (selection or 0)
    )
    stats["selective_steps"] = int(round(totals[SELECTIVE_STEPS]))
    stats["fallback_steps"] = int(round(totals[FALLBACK_STEPS]))
    return stats
