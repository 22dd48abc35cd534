"""The time-to-accuracy grid (:func:`run_time_to_accuracy`): every unit's runs (:func:`.time_to_accuracy.train_run`),
appended to ``time_to_accuracy.json`` after every run; a rerun skips what is recorded, and a unit left incomplete is
run again (its baselines with it) in the new sitting; a pause file holds the grid between runs; and the summary,
``time_to_accuracy_summary.json`` (:func:`summarize`, the statistics of :mod:`.tta_stats`)."""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .common import (
    FULL_BATCH,
    PRUNING_BASELINE,
    RANDOM_SUBSET,
    BenchmarkContext,
    Data,
    load_rows,
    prunes_dataset,
    strategy_grid,
    strategy_order,
    write_json,
)
from .time_to_accuracy import (
    CELL_KEYS,
    JSON_NAME,
    PROTOCOL,
    SUMMARY_NAME,
    TARGET_FRACTION,
    Cell,
    TimeToAccuracySettings,
    train_run,
)
from .tta_stats import drift_ratios, paired_seeds, resolution, run_pair, summary_row, time_ratios

# ---- the grid and resuming --------------------------------------------------------------------------


def _baselines(pair: tuple[str, float], batch_keeps: list[float]) -> list[tuple[str, float]]:
    """The runs that the verdicts of ``pair`` = (strategy, keep) pair with, in its own sitting: the random subset at
    its keep, or at every per-batch keep and ``random-prune`` for a dataset-level strategy."""
    strategy, keep = pair
    found = [run_pair(RANDOM_SUBSET, keep)]
    if prunes_dataset(strategy):
        found = [run_pair(RANDOM_SUBSET, k) for k in batch_keeps] + [run_pair(PRUNING_BASELINE, 1.0)]
    return [b for b in found if b != pair]


def runs_to_make(
    existing: Iterable[dict[str, Any]], unit: tuple[str, float, int], grid: list[tuple[str, float]], rotation: int = 0
) -> list[tuple[str, float, bool]]:
    """The ``(strategy, keep, repeat)`` runs to make for ``unit`` = (dataset, label noise, seed) in a new sitting.

    Nothing when every (strategy, keep) of ``grid`` is recorded in a sitting that also holds the unit's full batch
    and the run's baselines of the grid (:func:`_baselines`): a run without them gives no verdict. Otherwise the
    missing runs, with their baselines, in the grid's order rotated by ``rotation`` places (the seed's index: no
    strategy always runs first or last), after the full batch (it sets the budget) and before the full batch's
    repeat (the drift check)."""
    unit_rows = [r for r in existing if (r["dataset"], r["label_noise"], r["seed"]) == unit]
    wanted = [run_pair(s, k) for s, k in grid if s != FULL_BATCH]
    batch_keeps = sorted({k for s, k in wanted if not prunes_dataset(s)})
    sittings: dict[Any, set[tuple[str, float]]] = {}
    for r in unit_rows:
        if not r.get("repeat"):
            sittings.setdefault(r.get("sitting"), set()).add(run_pair(r["strategy"], r["keep"]))
    done = set()
    for pairs in sittings.values():
        if run_pair(FULL_BATCH, 1.0) in pairs:
            done |= {p for p in pairs if all(b in pairs for b in _baselines(p, batch_keeps) if b in wanted)}
    missing = [pair for pair in wanted if pair not in done]
    if not missing:
        return []
    plan = set(missing)
    for pair in missing:
        plan.update(b for b in _baselines(pair, batch_keeps) if b in wanted)
    ordered = [pair for pair in wanted if pair in plan]
    shift = rotation % len(ordered)
    ordered = ordered[shift:] + ordered[:shift]
    return [(FULL_BATCH, 1.0, False)] + [(s, k, False) for s, k in ordered] + [(FULL_BATCH, 1.0, True)]


def with_baselines(strategies: list[str]) -> list[str]:
    """``strategies`` and the baselines their verdicts are paired with, whether or not ``--strategies`` names them:
    the random subset beside any selective strategy, and ``random-prune`` beside a dataset-level one (every
    comparison is made within one sitting, so a sitting without them could give no verdict against random)."""
    names = list(dict.fromkeys(strategies))
    if any(prunes_dataset(s) for s in names) and PRUNING_BASELINE not in names:
        names.append(PRUNING_BASELINE)
    if any(s != FULL_BATCH for s in names) and RANDOM_SUBSET not in names:
        names.insert(0, RANDOM_SUBSET)
    return names


def new_sitting_id() -> str:
    """An id of this invocation, its start time in UTC (``2025-01-31T12:34:56.789012Z``): ids sort by time."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def current_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the current protocol (:data:`PROTOCOL`)."""
    return [r for r in rows if r.get("protocol") == PROTOCOL]


PAUSE_NAME = "time_to_accuracy.pause"
"""While a file of this name is in the output folder, the grid waits before its next run: the machine is then free
for tests or builds without ending the sitting (the runs before and after the pause pair as one sitting's; the
unit's full-batch repeat still measures the machine's drift across it)."""


def wait_while_paused(
    output_dir: str, progress: Callable[[str], None], poll_s: float = 10.0, sleep: Callable[[float], None] = time.sleep
) -> float:
    """Wait while :data:`PAUSE_NAME` exists in ``output_dir``; returns the seconds waited (0 without the file)."""
    path = os.path.join(output_dir, PAUSE_NAME)
    if not os.path.exists(path):
        return 0.0
    progress(f"paused before the next run: remove {path} to go on")
    started = time.perf_counter()
    while os.path.exists(path):
        sleep(poll_s)
    waited = time.perf_counter() - started
    progress(f"resumed after {waited:.0f} s")
    return waited


def run_time_to_accuracy(ctx: BenchmarkContext, machine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every dataset x noise x seed unit (cells outermost, seeds inside: a cell reaches the seeds a verdict needs
    before the next cell starts, instead of every cell reaching them only at the grid's end), each
    run of :func:`runs_to_make`, appended to ``time_to_accuracy.json`` after every run and summarised in
    ``time_to_accuracy_summary.json`` after every unit; returns all its rows."""
    bench = ctx.bench
    settings = TimeToAccuracySettings.from_arguments(bench)
    path = os.path.join(bench.output_dir, f"{JSON_NAME}.json")
    rows = current_rows(load_rows(bench.output_dir, JSON_NAME)[1])
    sitting = new_sitting_id()
    specs = bench.dataset_specs()
    units = [(i, seed, name, spec, noise) for name, spec in specs for noise in bench.tta_noise_values
             for i, seed in enumerate(bench.tta_seed_values)]  # fmt: skip
    data_cache: dict[str, Data] = {}
    for number, (index, seed, name, spec, noise) in enumerate(units, 1):
        unit_strategies = [s for s in bench.tta_strategy_names if index < bench.tta_seed_limit(s)]
        unit_grid = strategy_grid(with_baselines(unit_strategies), bench.training_keep_values)
        plan = runs_to_make(rows, (name, noise, seed), unit_grid, rotation=index)
        label = f"time-to-accuracy unit {number}/{len(units)} {name} noise={noise} seed={seed}"
        if not plan:
            ctx.progress(f"{label}: every run recorded, skipped")
            continue
        if name not in data_cache:
            data_cache[name] = Data(spec, ctx.tokenizer, bench.seq_len)
        unit_settings = dataclasses.replace(settings, learning_rate=bench.tta_learning_rate(name))
        cell = Cell.from_data(name, data_cache[name], noise, seed, unit_settings)
        budget = None
        for strategy, keep, repeat in plan:
            wait_while_paused(bench.output_dir, ctx.progress)
            args = (cell, strategy, keep, unit_settings, ctx.tokenizer, ctx.model_path, ctx.scratch_dir)
            row = train_run(*args, budget=None if repeat else budget)
            gc.collect()  # the run's model and trainer, before the next one loads
            if budget is None:
                budget = {key: row[key] for key in ("budget_s", "budget_cost", "target")}
            row.update(repeat=repeat, sitting=sitting, machine=machine)
            rows.append(row)
            write_json(path, machine, rows, verbose=False)
            reached = row["time_to_target_s"]
            ctx.progress(
                f"{label} {strategy}@{keep}{' (repeat)' if repeat else ''}: {row['steps']} steps in "
                f"{row['train_s']:.1f} s (budget {budget['budget_s']:.1f} s), final acc {row['final_accuracy']:.4f}, "
                f"target {budget['target']:.4f} " + ("not reached" if reached is None else f"at {reached:.1f} s")
            )
        write_summary(bench.output_dir, machine, rows)
    write_json(path, machine, rows)
    write_summary(bench.output_dir, machine, rows)
    return rows


# ---- the summary ------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The statistics of ``rows`` (see :mod:`.tta_stats`): per (dataset, noise, keep group), a row per strategy in
    registration order (the full batch, the per-batch strategies at the group's keep, the dataset-level ones at
    keep 1.0 compared with the random subset at the largest per-batch keep), the drift of every seed, and the grid's
    wall time (every run's, loading and evaluation included); per cell its sizes (:data:`CELL_KEYS`), the
    median budget and target, and the resolution of its verdicts against each baseline (:func:`.tta_stats.resolution`
    of the strategies' per-seed time ratios)."""
    rows = current_rows(rows)
    out, cells = [], []
    for dataset, noise in sorted({(r["dataset"], float(r["label_noise"])) for r in rows}):
        group = [r for r in rows if r["dataset"] == dataset and float(r["label_noise"]) == noise and not r["repeat"]]
        fulls = [r for r in group if r["strategy"] == FULL_BATCH]
        if fulls:
            cells.append(
                {
                    "dataset": dataset,
                    "label_noise": noise,
                    **{key: fulls[0].get(key) for key in CELL_KEYS},
                    "median_budget_s": float(np.median([r["budget_s"] for r in fulls])),
                    "median_target": float(np.median([r["target"] for r in fulls])),
                }
            )
        batch = [r for r in group if r["strategy"] != FULL_BATCH and not prunes_dataset(r["strategy"])]
        keeps = sorted({float(r["keep"]) for r in batch}, reverse=True) or [1.0]
        whole = strategy_order(r["strategy"] for r in group if prunes_dataset(r["strategy"]))
        entries = [(FULL_BATCH, 1.0, keeps[0])]
        for keep in keeps:
            entries += [(s, keep, keep) for s in strategy_order(r["strategy"] for r in batch if r["keep"] == keep)]
        entries += [(s, 1.0, keeps[0]) for s in whole]
        scatter: dict[str, list[list[float]]] = {"random": [], "full": []}
        for strategy, keep, baseline_keep in entries:
            entry = summary_row(group, dataset, noise, strategy, keep, baseline_keep)
            if entry is not None:
                out.append(entry)
            # Each strategy's ratios to a baseline, but the baseline's own (all 1): the scatter of the resolution.
            triples = paired_seeds(group, dataset, noise, strategy, keep, baseline_keep)
            if (strategy, keep) != (RANDOM_SUBSET, baseline_keep):
                scatter["random"].append(time_ratios(triples, "random"))
            if strategy != FULL_BATCH:
                scatter["full"].append(time_ratios(triples, "full"))
        if fulls:
            cells[-1]["resolution"] = {f"vs_{baseline}": resolution(groups) for baseline, groups in scatter.items()}
    drift = drift_ratios(rows)
    values = [d["drift"] for d in drift]
    return {
        "protocol": PROTOCOL,
        "target_fraction": TARGET_FRACTION,
        "grid_wall_s": float(sum(r.get("wall_s") or 0.0 for r in rows)),
        "runs": len(rows),
        "cells": cells,
        "drift": {
            "seeds": len(values),
            "median": float(np.median(values)) if values else None,
            "min": float(np.min(values)) if values else None,
            "max": float(np.max(values)) if values else None,
            "per_seed": drift,
        },
        "rows": out,
    }


def write_summary(output_dir: str, machine: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Write ``time_to_accuracy_summary.json`` (the machine and :func:`summarize` of ``rows``) atomically."""
    path = os.path.join(output_dir, f"{SUMMARY_NAME}.json")
    payload = summarize(rows)
    write_json(path, machine, payload.pop("rows"), verbose=False, extra=payload)
    return path
