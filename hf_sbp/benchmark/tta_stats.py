"""The statistics of the time-to-accuracy benchmark, as plain functions on its rows: times to target, per-seed
pairing with the same sitting's baselines, bootstrap intervals over seeds, verdicts, and how large a difference the
verdicts can resolve.

A row is one training run (see :data:`hf_sbp.benchmark.time_to_accuracy.ROW_KEYS`); its ``curve`` is a list of
evaluations ``[mark, train_s, cost, accuracy]``: ``mark`` the fraction of the budget the evaluation was due at,
``train_s`` the training seconds (evaluation excluded) and ``cost`` the forward-equivalents spent when it ran.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from .common import FULL_BATCH, RANDOM_SUBSET

CLOCKS = ("wall", "cost")
"""The two clocks: training seconds, and forward-equivalents (a scoring forward over n rows costs n, a training
step on k rows 3k, evaluation excluded), which no drift of the machine's speed changes."""
ACCURACY_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
"""The fractions of the budget at which accuracies are compared."""
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
"""A fixed seed, so that the summary recomputes exactly from the rows."""
MIN_SEEDS_FOR_VERDICT = 5
"""Fewer seeds give no verdict (``too few seeds``). With n seeds the 95% percentile interval of the median spans the
smallest to the largest seed's value (for n <= 5), so it excludes a tie exactly when every seed falls on one side:
with no real difference that happens with probability 2^(1 - n), 6% for 5 seeds but 25% for 3."""
TOO_FEW_SEEDS = "too few seeds"
FASTER, SLOWER, NO_DIFFERENCE = "faster", "slower", "no difference"
"""The time-ratio verdicts (:func:`ratio_verdict`): the first two when the interval excludes a tie (the report acts on
them); ``no difference`` is also the accuracy verdict (:func:`difference_verdict`) when the interval holds 0."""
RESOLUTION_POWER = 0.8
"""The probability with which :func:`resolution` asks the verdicts to call a true difference."""
REFERENCE_RATIO = 0.9
"""The difference the benchmark is asked to resolve: a time ratio of 0.9 (the target 10% sooner)."""
_CLOCK_COLUMN = {"wall": 1, "cost": 2}
_EPS = 1e-9


def run_pair(strategy: str, keep: float) -> tuple[str, float]:
    """The key of a run within its seed's sitting: ``(strategy, keep)``, the keep rounded so that it compares."""
    return (strategy, round(float(keep), 6))


def budget_of(row: dict[str, Any], clock: str) -> float:
    """The run's budget on ``clock``: the full batch's training seconds, or its forward-equivalents."""
    return float(row["budget_s"] if clock == "wall" else row["budget_cost"])


def time_to_target(row: dict[str, Any], target: float, clock: str = "wall") -> float | None:
    """The ``clock`` reading of the run's first evaluation at or above ``target``, or ``None`` if none is."""
    column = _CLOCK_COLUMN[clock]
    for entry in row["curve"]:
        if entry[3] >= target - _EPS:
            return float(entry[column])
    return None


def censored_time(row: dict[str, Any], target: float, clock: str = "wall") -> tuple[float, bool]:
    """``(time, censored)``: the time to target on ``clock``, or the budget with ``censored`` true when the run never
    reached the target (it counts as having needed the whole budget: a bound, not a measurement)."""
    reached = time_to_target(row, target, clock)
    if reached is None:
        return budget_of(row, clock), True
    return reached, False


def accuracy_at(row: dict[str, Any], fraction: float) -> float:
    """The accuracy the run had at ``fraction`` of the budget: its last evaluation due at or before that mark (a run
    that ended earlier, as a pruned one can, keeps its final accuracy)."""
    value = math.nan
    for entry in row["curve"]:
        if entry[0] <= fraction + _EPS:
            value = float(entry[3])
    return value


def percentile_interval(
    values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, float]:
    """The median of ``values`` and the 95% percentile bootstrap interval of the median: ``{"median", "ci_low",
    "ci_high"}`` (NaNs for no values). With five values the interval spans from the smallest to the largest (a
    resampled median equals the smallest with probability 0.058 > 0.025), so it excludes a tie only when every seed
    agrees."""
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if data.size == 0:
        return {"median": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, data.size, size=(resamples, data.size))
    medians = np.median(data[draws], axis=1)
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(medians, [alpha, 1 - alpha], method="inverted_cdf")
    return {"median": float(np.median(data)), "ci_low": float(low), "ci_high": float(high)}


def ratio_verdict(interval: dict[str, float]) -> str:
    """``faster`` if the interval of a time ratio lies below 1, ``slower`` if above, else ``no difference``."""
    if interval["ci_high"] < 1 - _EPS:
        return FASTER
    if interval["ci_low"] > 1 + _EPS:
        return SLOWER
    return NO_DIFFERENCE


def difference_verdict(interval: dict[str, float]) -> str:
    """``higher`` if the interval of an accuracy difference lies above 0, ``lower`` if below, else ``no
    difference``."""
    if interval["ci_low"] > _EPS:
        return "higher"
    if interval["ci_high"] < -_EPS:
        return "lower"
    return NO_DIFFERENCE


def _verdict(rule, interval: dict[str, float], seeds: int) -> str | None:
    if seeds == 0:
        return None
    return rule(interval) if seeds >= MIN_SEEDS_FOR_VERDICT else TOO_FEW_SEEDS


def seed_units(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, float, int, str], dict[tuple[str, float], Any]]:
    """The runs per (dataset, label noise, seed, sitting), by (strategy, keep); the repeated full batch of the drift
    check (``repeat`` true) under the key ``("none#repeat", 1.0)``."""
    units: dict[tuple[str, float, int, str], dict[tuple[str, float], Any]] = defaultdict(dict)
    for row in rows:
        key = (row["dataset"], float(row["label_noise"]), int(row["seed"]), row.get("sitting") or "")
        name = row["strategy"] + ("#repeat" if row.get("repeat") else "")
        units[key][run_pair(name, row["keep"])] = row
    return units


def paired_seeds(
    rows: Iterable[dict[str, Any]], dataset: str, noise: float, strategy: str, keep: float, baseline_keep: float
) -> list[tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]]:
    """Per seed, ``(run, random, full)`` from the latest sitting that holds the run and the full batch (the budget
    and target come from it), preferring one that also holds the random subset at ``baseline_keep``."""
    by_seed: dict[int, list[tuple[str, dict]]] = defaultdict(list)
    for (d, n, seed, sitting), runs in seed_units(rows).items():
        if d == dataset and n == float(noise):
            by_seed[seed].append((sitting, runs))
    out = []
    wanted, random_key, full_key = (
        run_pair(strategy, keep),
        run_pair(RANDOM_SUBSET, baseline_keep),
        run_pair(FULL_BATCH, 1.0),
    )
    for seed in sorted(by_seed):
        usable = sorted((s, r) for s, r in by_seed[seed] if wanted in r and full_key in r)
        if not usable:
            continue
        complete = [(s, r) for s, r in usable if random_key in r]
        _, runs = (complete or usable)[-1]
        out.append((runs[wanted], runs.get(random_key), runs[full_key]))
    return out


def time_ratios(
    triples: Sequence[tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]], baseline: str, clock: str = "wall"
) -> list[float]:
    """Per seed of ``triples`` (:func:`paired_seeds`), the run's time to the seed's target over the ``baseline``'s
    (``"random"`` or ``"full"``) on ``clock``, censored times counting as the budget; a seed without that baseline is
    left out."""
    ratios = []
    for run, random, full in triples:
        other = random if baseline == "random" else full
        if other is None:
            continue
        mine, _ = censored_time(run, full["target"], clock)
        theirs, _ = censored_time(other, full["target"], clock)
        ratios.append(mine / theirs if theirs > 0 else math.nan)
    return ratios


def resolution(groups: Iterable[Sequence[float]], seeds: int = MIN_SEEDS_FOR_VERDICT) -> dict[str, Any] | None:
    """How large a difference the verdicts can resolve, from the scatter of per-seed time ratios; ``None`` without a
    group of two seeds or more.

    ``groups`` holds each strategy's ratios to one baseline over its seeds (not the baseline's own, which are all 1).
    Returns ``log_sd``, the pooled within-strategy standard deviation ``s`` of the log ratios (each strategy about
    its own mean, so true differences between strategies do not count as scatter; censored seeds count as the
    budget, which narrows it, so the figures below are if anything optimistic), with ``strategies`` and ``seeds``
    pooled; ``detectable_ratio``, the true ratio at or below which all of ``seeds`` seeds fall below 1 with
    probability :data:`RESOLUTION_POWER`, ``exp(-s z)`` with ``z = Phi^-1(power^(1 / seeds))``: what a `faster`
    verdict needs with at most 5 seeds, whose interval spans the smallest to the largest seed (`slower` mirrors it
    at ``1 / detectable_ratio``); and ``seeds_for_reference_ratio``, about how many seeds a verdict needs to call
    :data:`REFERENCE_RATIO` with that probability, from the normal approximation of the median (standard error
    ``sqrt(pi / 2) s / sqrt(n)``): ``n = ((z_(1 - alpha / 2) + z_power) sqrt(pi / 2) s / ln(1 / ratio))^2``."""
    logs = [np.log(np.asarray([v for v in group if not math.isnan(v)], dtype=float)) for group in groups]
    logs = [values for values in logs if values.size >= 2]
    if not logs:
        return None
    dof = sum(values.size - 1 for values in logs)
    sd = math.sqrt(sum(float(((values - values.mean()) ** 2).sum()) for values in logs) / dof)
    normal = NormalDist()
    z_power = normal.inv_cdf(RESOLUTION_POWER)
    z_level = normal.inv_cdf(1 - (1 - CONFIDENCE) / 2)
    needed = ((z_level + z_power) * math.sqrt(math.pi / 2) * sd / math.log(1 / REFERENCE_RATIO)) ** 2
    return {
        "log_sd": sd,
        "strategies": len(logs),
        "seeds": dof + len(logs),
        "detectable_ratio": math.exp(-sd * normal.inv_cdf(RESOLUTION_POWER ** (1 / seeds))),
        "verdict_seeds": seeds,
        "seeds_for_reference_ratio": max(seeds, math.ceil(needed)),
    }


def summary_row(
    rows: list[dict[str, Any]], dataset: str, noise: float, strategy: str, keep: float, baseline_keep: float
) -> dict[str, Any] | None:
    """One row of ``time_to_accuracy_summary.json`` for ``strategy`` at ``keep`` (see the module docstring of
    :mod:`hf_sbp.benchmark.time_to_accuracy` for the fields); ``None`` without any paired seed."""
    triples = paired_seeds(rows, dataset, noise, strategy, keep, baseline_keep)
    if not triples:
        return None
    out: dict[str, Any] = {
        "dataset": dataset,
        "label_noise": noise,
        "strategy": strategy,
        "keep": keep,
        "seeds": len(triples),
        "schedule": triples[0][0].get("schedule"),
    }
    for clock in CLOCKS:
        suffix = "" if clock == "wall" else "_cost"
        times, censored = [], 0
        for run, _, full in triples:
            value, cut = censored_time(run, full["target"], clock)
            times.append(value / budget_of(full, clock))
            censored += cut
        out[f"time_to_target_share{suffix}"] = percentile_interval(times)
        out[f"censored{suffix}"] = censored
        for name in ("random", "full"):
            ratios = time_ratios(triples, name, clock)
            interval = percentile_interval(ratios)
            out[f"time_ratio_vs_{name}{suffix}"] = interval
            out[f"verdict_vs_{name}{suffix}"] = _verdict(ratio_verdict, interval, len(ratios))
    for name, pick in (("random", 1), ("full", 2)):
        for fraction in ACCURACY_FRACTIONS:
            diffs = [
                accuracy_at(t[0], fraction) - accuracy_at(t[pick], fraction) for t in triples if t[pick] is not None
            ]
            label = "T" if fraction == 1.0 else f"{round(fraction * 100)}pct"
            interval = percentile_interval(diffs)
            out[f"acc_diff_vs_{name}_at_{label}"] = interval
        out[f"acc_verdict_vs_{name}_at_T"] = _verdict(difference_verdict, out[f"acc_diff_vs_{name}_at_T"], len(diffs))
    out["final_accuracy"] = percentile_interval([accuracy_at(t[0], 1.0) for t in triples])
    out["clocks_disagree"] = any(
        out[f"verdict_vs_{name}"] is not None and out[f"verdict_vs_{name}"] != out[f"verdict_vs_{name}_cost"]
        for name in ("random", "full")
    )
    upfront = [t[0]["il_s"] / t[2]["budget_s"] for t in triples if t[0].get("il_s")]
    out["il_share_of_budget"] = float(np.median(upfront)) if upfront else None
    shares = [t[0]["flipped_share_backprop"] for t in triples if t[0].get("flipped_share_backprop") is not None]
    out["flipped_share_backprop"] = float(np.median(shares)) if shares else None
    trains = [t[0]["flipped_labels"] / t[0]["train_examples"] for t in triples if t[0].get("train_examples")]
    out["flipped_share_train"] = float(np.median(trains)) if trains else None
    return out


def drift_ratios(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, noise, seed, sitting) with a repeated full batch: the ratio of the repeat's training time to the
    first full batch's (1: the machine ran at the same speed at the end of the seed's runs as at their start)."""
    out = []
    for (dataset, noise, seed, sitting), runs in sorted(seed_units(rows).items()):
        first, repeat = runs.get(run_pair(FULL_BATCH, 1.0)), runs.get(run_pair(FULL_BATCH + "#repeat", 1.0))
        if first is not None and repeat is not None:
            ratio = repeat["train_s"] / first["train_s"]
            out.append({"dataset": dataset, "label_noise": noise, "seed": seed, "sitting": sitting, "drift": ratio})
    return out


def median_curves(
    triples: list[tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]],
) -> list[dict[str, float]]:
    """The run's accuracy at every evaluation mark, over the seeds of ``triples``: per mark, its fraction, the
    median training seconds and the median, smallest and largest accuracy."""
    marks = sorted({round(entry[0], 6) for run, _, _ in triples for entry in run["curve"]})
    out = []
    for mark in marks:
        accuracies = [accuracy_at(run, mark) for run, _, _ in triples]
        seconds = [mark * full["budget_s"] for _, _, full in triples]
        accuracies = [a for a in accuracies if not math.isnan(a)]
        if accuracies:
            out.append(
                {
                    "mark": mark,
                    "train_s": float(np.median(seconds)),
                    "median": float(np.median(accuracies)),
                    "low": float(np.min(accuracies)),
                    "high": float(np.max(accuracies)),
                }
            )
    return out
