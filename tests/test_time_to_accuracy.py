"""The time-to-accuracy part of the benchmark (wall-clock schedule, evaluation marks, resuming, statistics, the
generated summary) on a fake clock, hand-made rows and a tiny model, and the throughput part's LoRA mode (the
measurements themselves are run by hand: ``python scripts/benchmark.py time-to-accuracy --quick``)."""

import itertools
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState, get_linear_schedule_with_warmup

import hf_sbp.benchmark
from hf_sbp.benchmark import common, throughput, tta_grid, tta_report, tta_stats, wall_clock
from hf_sbp.benchmark import time_to_accuracy as tta

sys.path.insert(0, os.path.dirname(__file__))
from glue_fixtures import save_tiny_model, single_sentence_rows, write_rows  # noqa: E402
from tiny_models import tiny_bert  # noqa: E402

# ---- the schedule -------------------------------------------------------------------------------------


def test_the_time_schedule_is_transformers_linear_schedule_of_the_budget_fraction():
    # The reference: transformers' own linear schedule over 200 steps with 20 warm-up steps, read at step s, against
    # the time schedule at t / T = s / 200.
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    reference = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=20, num_training_steps=200)
    for step in range(0, 201):
        expected = reference.lr_lambdas[0](step)
        assert wall_clock.linear_warmup_decay(step / 200, 0.1) == pytest.approx(expected, abs=1e-12)
    assert wall_clock.linear_warmup_decay(1.3) == 0.0 and wall_clock.linear_warmup_decay(-0.1) == 0.0
    with pytest.raises(ValueError, match="warmup_fraction=1.0"):
        wall_clock.linear_warmup_decay(0.5, 1.0)
    assert wall_clock.warmup_steps(240) == 24 and wall_clock.warmup_steps(84) == 9  # 8.4 rounded up


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class AdvanceClock(TrainerCallback):
    """Every step takes ``step_s`` seconds of the fake clock, spent at its start."""

    def __init__(self, clock, step_s):
        self.clock, self.step_s, self.rates = clock, step_s, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.now += self.step_s
        self.rates.append(kwargs["optimizer"].param_groups[0]["lr"])


def tiny_dataset(rows=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 90, size=(rows, 8)).tolist()
    return Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * 8] * rows, "labels": [i % 2 for i in range(rows)]}
    )


def test_a_budgeted_run_follows_the_time_schedule_and_stops_within_one_step_of_the_budget(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_model(str(tmp_path / "m")))
    clock, step_s, budget_s, peak = FakeClock(), 0.7, 10.0, 1e-3
    trainer = common.evaluating_trainer(
        tiny_bert(), strategy="random", keep=0.5, seed=0, steps=1000, warmup_steps=0, batch_size=8,
        eval_batch_size=8, learning_rate=peak, device="cpu", train=tiny_dataset(), validation=None,
        tokenizer=tokenizer, output_dir=str(tmp_path / "out"), trainer_class=wall_clock.WallClockScheduleTrainer,
    )  # fmt: skip
    evaluations = []

    def evaluate():
        evaluations.append(clock.now)
        clock.now += 100.0  # far longer than the budget: evaluation must stay off the training clock
        return 0.5

    marks = wall_clock.MarkedRun(evaluate, 4, wall_clock.TrainingClock(clock), lambda: 3.0, budget_s=budget_s)
    trainer.schedule_fraction = marks.fraction
    advance = AdvanceClock(clock, step_s)
    trainer.add_callback(advance)  # before the marks: the step's time is spent before the run's step end
    trainer.add_callback(marks)
    trainer.train()
    steps = trainer.state.global_step
    assert steps == math.ceil(budget_s / step_s)  # 15 steps: the first step end at or past 10 s (10.5 s)
    assert marks.stopped_by_budget and marks.curve[-1][1] == pytest.approx(steps * step_s)
    # Step j (1-based) trains at the rate set after step j - 1, at t = (j - 1) * 0.7 s of training time.
    for j, rate in enumerate(advance.rates, 1):
        assert rate == pytest.approx(peak * wall_clock.linear_warmup_decay((j - 1) * step_s / budget_s), rel=1e-9)
    # Marks at 2.5, 5, 7.5 and 10 s, evaluated at the step ends at or after them: 2.8, 5.6, 7.7 and 10.5 s.
    assert [entry[0] for entry in marks.curve] == [0.25, 0.5, 0.75, 1.0]
    assert [entry[1] for entry in marks.curve] == pytest.approx([2.8, 5.6, 7.7, 10.5])
    assert [entry[2] for entry in marks.curve] == [12.0, 24.0, 33.0, 45.0]  # the cost clock: 3 per step
    assert len(evaluations) == 4


def drive(callback, clock, step_s, max_steps):
    """Run ``callback`` through a training loop whose steps take ``step_s`` seconds on ``clock``."""
    state, control = TrainerState(), TrainerControl()
    state.max_steps = max_steps
    callback.on_train_begin(None, state, control)
    while state.global_step < max_steps and not control.should_training_stop:
        clock.now += step_s
        state.global_step += 1
        callback.on_step_end(None, state, control)
    callback.on_train_end(None, state, control)
    return state, control


def test_the_full_batch_is_evaluated_at_fractions_of_its_steps_and_sets_the_budget():
    clock = FakeClock()
    marks = wall_clock.MarkedRun(lambda: 0.5, 4, wall_clock.TrainingClock(clock), lambda: 96.0, steps=10)
    state, control = drive(marks, clock, 2.0, 10)
    assert not control.should_training_stop and not marks.stopped_by_budget
    # round(10 i / 4) = 2 (2.5 rounds to even), 5, 8 (7.5 rounds to even), 10
    assert [(m, t) for m, t, _, _ in marks.curve] == [(0.25, 4.0), (0.5, 10.0), (0.75, 16.0), (1.0, 20.0)]
    assert wall_clock.mark_steps(3, 6) == [1, 1, 2, 2, 2, 3]  # more marks than steps: several at once


def test_a_run_that_ends_before_the_budget_is_evaluated_at_its_end():
    clock = FakeClock()
    marks = wall_clock.MarkedRun(lambda: 0.7, 4, wall_clock.TrainingClock(clock), lambda: 1.0, budget_s=10.0)
    drive(marks, clock, 1.0, 6)  # a pruned run: 6 steps of 1 s against a budget of 10 s
    assert [(m, t) for m, t, _, _ in marks.curve] == [(0.25, 3.0), (0.5, 5.0), (0.6, 6.0)]
    assert not marks.stopped_by_budget


def test_work_done_before_training_is_charged_to_both_clocks():
    clock = FakeClock()
    marks = wall_clock.MarkedRun(
        lambda: 0.5, 2, wall_clock.TrainingClock(clock), lambda: 10.0, budget_s=10.0, upfront=lambda: (4.0, 300.0)
    )
    drive(marks, clock, 1.0, 100)
    # 4 s of irreducible losses, then steps of 1 s: the marks at 5 and 10 s fall after 1 and 6 steps.
    assert [(m, t, c) for m, t, c, _ in marks.curve] == [(0.5, 5.0, 310.0), (1.0, 10.0, 360.0)]


def test_marked_run_rejects_bad_settings():
    clock = wall_clock.TrainingClock(FakeClock())
    with pytest.raises(ValueError, match="exactly one"):
        wall_clock.MarkedRun(lambda: 0.0, 4, clock, lambda: 0.0)
    with pytest.raises(ValueError, match="marks=0"):
        wall_clock.MarkedRun(lambda: 0.0, 0, clock, lambda: 0.0, steps=3)
    with pytest.raises(ValueError, match="budget_s=0"):
        wall_clock.MarkedRun(lambda: 0.0, 4, clock, lambda: 0.0, budget_s=0)


def test_the_evaluator_matches_trainers_accuracy(tmp_path):
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_model(str(tmp_path / "m")))
    rows = tokenizer([f"word {'x ' * (i % 7)} end" for i in range(40)])
    data = Dataset.from_dict({**rows, "labels": [i % 2 for i in range(40)]})
    model = tiny_bert()
    model.train()
    trainer = common.evaluating_trainer(
        model, strategy="none", keep=1.0, seed=0, steps=1, warmup_steps=0, batch_size=8, eval_batch_size=7,
        learning_rate=1e-3, device="cpu", train=data, validation=data, tokenizer=tokenizer,
        output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    reference = trainer.evaluate()["eval_accuracy"]  # Trainer's own loop: unsorted, padded per batch of 7
    model.train()
    evaluator = wall_clock.AccuracyEvaluator(model, data, tokenizer, batch_size=16)
    assert evaluator() == pytest.approx(reference) and model.training  # the mode is restored
    assert trainer.data_collator.__class__ is DataCollatorWithPadding


# ---- resuming -------------------------------------------------------------------------------------------


def recorded(*pairs, unit=("d", 0.0, 0), sitting="A"):
    return [
        {"dataset": unit[0], "label_noise": unit[1], "seed": unit[2], "strategy": s, "keep": k, "sitting": sitting}
        for s, k in pairs
    ]


GRID = [("none", 1.0), ("random", 0.5), ("loss", 0.5), ("gradmatch", 0.5)]


def test_runs_to_make_rotates_the_order_and_repeats_the_full_batch():
    unit = ("d", 0.0, 0)
    full, repeat = ("none", 1.0, False), ("none", 1.0, True)
    assert tta_grid.runs_to_make([], unit, GRID) == [full, ("random", 0.5, False), ("loss", 0.5, False),
                                                ("gradmatch", 0.5, False), repeat]  # fmt: skip
    assert tta_grid.runs_to_make([], unit, GRID, rotation=1) == [full, ("loss", 0.5, False), ("gradmatch", 0.5, False),
                                                            ("random", 0.5, False), repeat]  # fmt: skip
    assert tta_grid.runs_to_make(recorded(*GRID), unit, GRID) == []
    assert tta_grid.runs_to_make(recorded(*GRID), ("d", 0.2, 0), GRID)[1:-1] == [(s, k, False) for s, k in GRID[1:]]
    # A strategy added later: the full batch and the random subset run again beside it, in a new sitting.
    assert tta_grid.runs_to_make(recorded(*GRID), unit, [*GRID, ("stale-loss", 0.5)]) == [
        full, ("random", 0.5, False), ("stale-loss", 0.5, False), repeat
    ]  # fmt: skip
    # Runs recorded without their sitting's full batch (interrupted before it was written) do not count.
    assert len(tta_grid.runs_to_make(recorded(*GRID[1:]), unit, GRID)) == 5
    # Nor runs recorded without their baseline in their sitting: they pair with nothing.
    without_random = recorded(("none", 1.0), ("loss", 0.5), ("gradmatch", 0.5)) + recorded(*GRID[:2], sitting="B")
    assert tta_grid.runs_to_make(without_random, unit, GRID) == [
        full, ("random", 0.5, False), ("loss", 0.5, False), ("gradmatch", 0.5, False), repeat
    ]  # fmt: skip


def test_runs_to_make_brings_every_keeps_random_subset_and_random_prune_beside_a_pruning_run():
    grid = common.strategy_grid(["random", "gradmatch", "infobatch", "random-prune"], [0.5, 0.25])
    assert grid[-2:] == [("infobatch", 1.0), ("random-prune", 1.0)]  # whole batches, once
    without_infobatch = [r for r in recorded(*grid) if r["strategy"] != "infobatch"]
    assert [p[:2] for p in tta_grid.runs_to_make(without_infobatch, ("d", 0.0, 0), grid)] == [
        ("none", 1.0), ("random", 0.5), ("random", 0.25), ("infobatch", 1.0), ("random-prune", 1.0), ("none", 1.0),
    ]  # fmt: skip


def test_a_sitting_brings_its_own_baselines_whatever_strategies_names():
    # A sitting of `--strategies loss,stale-loss` once ran without the random subset: no verdict against random.
    assert tta_grid.with_baselines(["loss", "stale-loss"]) == ["random", "loss", "stale-loss"]
    assert tta_grid.with_baselines(["infobatch"]) == ["random", "infobatch", "random-prune"]
    assert tta_grid.with_baselines(["gradmatch", "random"]) == ["gradmatch", "random"]
    assert tta_grid.with_baselines(["none"]) == ["none"]
    grid = common.strategy_grid(tta_grid.with_baselines(["loss"]), [0.5])
    assert [p[:2] for p in tta_grid.runs_to_make([], ("d", 0.0, 0), grid)] == [
        ("none", 1.0), ("random", 0.5), ("loss", 0.5), ("none", 1.0),
    ]  # fmt: skip


# ---- the statistics -------------------------------------------------------------------------------------


def test_the_bootstrap_interval_matches_the_exact_resampling_distribution():
    values = [0.8, 1.1, 0.9]
    # Every one of the 27 equally likely resamples of 3 seeds, and its median: the exact bootstrap distribution.
    medians = sorted(float(np.median(draw)) for draw in itertools.product(values, repeat=3))
    cdf = {m: sum(x <= m for x in medians) / 27 for m in medians}
    low = min(m for m in medians if cdf[m] >= 0.025)
    high = min(m for m in medians if cdf[m] >= 0.975)
    interval = tta_stats.percentile_interval(values)
    assert (interval["median"], interval["ci_low"], interval["ci_high"]) == (0.9, low, high)
    assert (low, high) == (0.8, 1.1)
    assert math.isnan(tta_stats.percentile_interval([])["median"])
    assert tta_stats.percentile_interval(values) == interval  # seeded: the summary recomputes exactly


def test_verdicts_need_the_interval_to_exclude_a_tie():
    assert tta_stats.ratio_verdict({"median": 0.8, "ci_low": 0.7, "ci_high": 0.95}) == "faster"
    assert tta_stats.ratio_verdict({"median": 1.2, "ci_low": 1.05, "ci_high": 1.4}) == "slower"
    assert tta_stats.ratio_verdict({"median": 0.8, "ci_low": 0.7, "ci_high": 1.0}) == "no difference"
    assert tta_stats.difference_verdict({"median": 0.02, "ci_low": 0.01, "ci_high": 0.03}) == "higher"
    assert tta_stats.difference_verdict({"median": 0.0, "ci_low": -0.01, "ci_high": 0.03}) == "no difference"


def curve_row(strategy, seed, reached_at, budget_s=100.0, keep=0.5, sitting="A", target=0.8, marks=4, **extra):
    """A hand-made row evaluated at ``marks`` fractions of the budget, below ``target`` until the fraction
    ``reached_at`` (``None``: never) and above it from then on; its cost clock runs at 3 per second."""
    curve = []
    for i in range(1, marks + 1):
        mark = i / marks
        accuracy = target + 0.05 if reached_at is not None and mark >= reached_at - 1e-9 else target - 0.05
        curve.append([mark, mark * budget_s, 3.0 * mark * budget_s, accuracy])
    row = {
        "dataset": "d", "label_noise": 0.0, "seed": seed, "strategy": strategy,
        "keep": 1.0 if strategy == "none" else keep, "repeat": False, "schedule": "time", "protocol": tta.PROTOCOL,
        "sitting": sitting, "budget_s": budget_s, "budget_cost": 3.0 * budget_s, "target": target, "curve": curve,
        "train_s": budget_s, "wall_s": 10.0, "flipped_labels": 0, "train_examples": 100, "epochs": 3,
        "batch_size": 32, "max_seq_length": 64, "eval_points": marks, "eval_samples": 1000, "learning_rate": 1e-4,
    }  # fmt: skip
    row.update(extra)
    return row


def hand_made_rows(seeds=5):
    """Per seed: the full batch reaches the target at 3/4 of its budget, random at 2/4, gradmatch at 1/4 (seed 4:
    never), and a repeat of the full batch whose training time is 1.1 times the first's."""
    rows = []
    for seed in range(seeds):
        rows += [curve_row("none", seed, 0.75), curve_row("random", seed, 0.5)]
        rows.append(curve_row("gradmatch", seed, 0.25 if seed < 4 else None))
        rows.append(curve_row("none", seed, 0.75, repeat=True, train_s=110.0))
    return rows


def test_the_summary_pairs_every_seed_with_its_own_baselines():
    summary = tta_grid.summarize(hand_made_rows())
    rows = {r["strategy"]: r for r in summary["rows"]}
    assert list(rows) == ["none", "gradmatch", "random"]  # the full batch, then registration order
    gradmatch = rows["gradmatch"]
    assert gradmatch["seeds"] == 5 and gradmatch["censored"] == 1
    # Per seed: 25 / 50 s against random (seed 4: censored at the budget, 100 / 50), 25 / 75 s against the full batch.
    assert gradmatch["time_ratio_vs_random"]["median"] == pytest.approx(0.5)
    assert gradmatch["time_ratio_vs_random"]["ci_high"] == pytest.approx(2.0)  # the censored seed
    assert gradmatch["verdict_vs_random"] == "no difference"
    assert rows["random"]["time_ratio_vs_full"] == pytest.approx({"median": 2 / 3, "ci_low": 2 / 3, "ci_high": 2 / 3})
    assert rows["random"]["verdict_vs_full"] == "faster" and rows["none"]["verdict_vs_random"] == "slower"
    # The cost clock runs at 3 per second on every run here: the same ratios, so the same verdicts.
    assert rows["random"]["time_ratio_vs_full_cost"]["median"] == pytest.approx(2 / 3)
    assert not any(r["clocks_disagree"] for r in rows.values())
    # Accuracy at 25% of T: gradmatch is above target, random and the full batch below (0.85 - 0.75).
    assert gradmatch["acc_diff_vs_random_at_25pct"]["median"] == pytest.approx(0.1)
    assert gradmatch["acc_diff_vs_random_at_T"]["median"] == pytest.approx(0.0)
    assert gradmatch["time_to_target_share"]["median"] == pytest.approx(0.25)
    assert summary["drift"]["seeds"] == 5 and summary["drift"]["median"] == pytest.approx(1.1)
    assert summary["grid_wall_s"] == pytest.approx(20 * 10.0) and summary["runs"] == 20


def test_fewer_than_five_seeds_give_no_verdict():
    rows = {r["strategy"]: r for r in tta_grid.summarize(hand_made_rows(seeds=3))["rows"]}
    assert rows["random"]["verdict_vs_full"] == tta_stats.TOO_FEW_SEEDS
    assert rows["random"]["time_ratio_vs_full"]["median"] == pytest.approx(2 / 3)


def test_times_compare_only_within_a_sitting():
    rows = hand_made_rows()
    # Sitting B, on a machine twice as slow, adds loss beside new full-batch and random runs of every seed.
    for seed in range(5):
        rows += [curve_row("none", seed, 0.75, 200.0, sitting="B"), curve_row("random", seed, 0.75, 200.0, sitting="B")]
        rows.append(curve_row("loss", seed, 0.25, 200.0, sitting="B"))
    summary = {r["strategy"]: r for r in tta_grid.summarize(rows)["rows"]}
    assert summary["loss"]["time_ratio_vs_random"]["median"] == pytest.approx(1 / 3)  # B's random subset, not A's
    assert summary["gradmatch"]["time_ratio_vs_random"]["median"] == pytest.approx(0.5)  # A's


def pooled_log_sd(groups):
    """The pooled within-group standard deviation of the logs, written out: sum of squares over degrees of freedom."""
    logs = [np.log(group) for group in groups if len(group) > 1]
    return math.sqrt(sum(((g - g.mean()) ** 2).sum() for g in logs) / sum(len(g) - 1 for g in logs))


def test_the_resolution_pools_the_scatter_of_each_strategy_about_its_own_mean():
    groups = [[0.5, 0.8, 1.0, 1.3], [2.0, 2.2], [0.9], [1.1, float("nan"), 1.4]]  # [0.9]: one seed, no scatter
    found = tta_stats.resolution(groups)
    assert found["log_sd"] == pytest.approx(pooled_log_sd([groups[0], groups[1], [1.1, 1.4]]))
    assert (found["strategies"], found["seeds"], found["verdict_seeds"]) == (3, 8, 5)
    assert tta_stats.resolution([[0.9], []]) is None
    # A strategy twice as fast as another adds nothing: each is centred on its own mean.
    assert tta_stats.resolution([[0.5, 0.55], [1.0, 1.1]])["log_sd"] == pytest.approx(pooled_log_sd([[1.0, 1.1]]))


def test_the_detectable_ratio_is_called_faster_by_the_bootstrap_verdict_as_often_as_promised():
    sd = 0.2
    detectable = tta_stats.resolution([[math.exp(sd), math.exp(-sd)]])  # one pair: log_sd = sqrt(2) sd
    assert detectable["log_sd"] == pytest.approx(math.sqrt(2) * sd)
    sd, ratio = detectable["log_sd"], detectable["detectable_ratio"]
    rng = np.random.default_rng(1)
    calls = [
        tta_stats.ratio_verdict(tta_stats.percentile_interval(np.exp(rng.normal(math.log(ratio), sd, 5)), 1000))
        for _ in range(2000)
    ]
    assert calls.count("faster") / len(calls) == pytest.approx(tta_stats.RESOLUTION_POWER, abs=0.03)


def test_the_seeds_for_the_reference_ratio_give_the_promised_power():
    # The scatter for which 19.5 seeds are needed (20 rounded up), then 20 seeds simulated at the reference ratio.
    z = 1.959964 + 0.841621
    sd = math.log(1 / tta_stats.REFERENCE_RATIO) * math.sqrt(19.5) / (z * math.sqrt(math.pi / 2))
    assert tta_stats.resolution([[math.exp(sd / math.sqrt(2)), math.exp(-sd / math.sqrt(2))]])[
        "seeds_for_reference_ratio"
    ] == 20  # fmt: skip
    rng = np.random.default_rng(2)
    draws = np.exp(rng.normal(math.log(tta_stats.REFERENCE_RATIO), sd, (600, 20)))
    calls = [tta_stats.ratio_verdict(tta_stats.percentile_interval(seeds, 2000)) for seeds in draws]
    assert calls.count("faster") / len(calls) == pytest.approx(tta_stats.RESOLUTION_POWER, abs=0.08)


def test_the_summary_gives_each_cell_the_resolution_of_its_verdicts():
    cell = tta_grid.summarize(hand_made_rows())["cells"][0]["resolution"]
    # Against random: the full batch (75 / 50 s every seed) and gradmatch (25 / 50 s, the censored seed 100 / 50 s).
    assert cell["vs_random"]["log_sd"] == pytest.approx(pooled_log_sd([[1.5] * 5, [0.5] * 4 + [2.0]]))
    # Against the full batch: random (50 / 75 s) and gradmatch (25 / 75 s, censored 100 / 75 s).
    assert cell["vs_full"]["log_sd"] == pytest.approx(pooled_log_sd([[2 / 3] * 5, [1 / 3] * 4 + [4 / 3]]))
    assert cell["vs_random"]["strategies"] == cell["vs_full"]["strategies"] == 2


# ---- the generated summary ------------------------------------------------------------------------------


def test_the_summary_report_prints_the_numbers_of_the_summary_json(tmp_path):
    rows = hand_made_rows()
    common.write_json(str(tmp_path / "time_to_accuracy.json"), {"device": "cpu"}, rows)
    tta_grid.write_summary(str(tmp_path), {"device": "cpu", "cpu_model": "test"}, rows)
    summary = json.loads((tmp_path / "time_to_accuracy_summary.json").read_text())
    text = open(tta_report.render_summary(str(tmp_path))).read()
    for row in summary["rows"]:
        line = next(line for line in text.splitlines() if line.startswith(f"| {tta_report._label(row)} |"))
        ratio = row["time_ratio_vs_random"]
        assert f"| {ratio['median']:.2f} [{ratio['ci_low']:.2f}, {ratio['ci_high']:.2f}] |" in line
        assert f"| {row['verdict_vs_full']} |" in line and f"| {row['seeds']} | {row['censored']} |" in line
    assert "| gradmatch@0.5 | 5 | 1 | 0.25 [0.25, 1.00] | 0.50 [0.50, 2.00] | no difference |" in text
    assert "median 1.100, from 1.100 to 1.100 over 5 seeds" in text
    assert "20 runs, 0.1 h of wall clock" in text
    assert "100 training examples x 3 epochs in batches of 32" in text and "median budget T 100.0 s" in text
    assert (tmp_path / "tta_d_noise0.png").stat().st_size > 1000 and "![accuracy" in text
    resolution = summary["cells"][0]["resolution"]
    for key, name in (("vs_random", "the random subset"), ("vs_full", "the full batch")):
        found = resolution[key]
        pooled = f"({found['strategies']} strategies, {found['seeds']} seeds)"
        assert f"{found['log_sd']:.2f} against {name} {pooled}" in text
        assert f"{found['detectable_ratio']:.2f} against {name}" in text
        assert f"{found['seeds_for_reference_ratio']} seeds against {name}" in text


def test_the_readme_block_is_rewritten_from_the_summary_and_nothing_else(tmp_path):
    rows = hand_made_rows()
    common.write_json(str(tmp_path / "time_to_accuracy.json"), {"device": "cpu"}, rows)
    tta_grid.write_summary(str(tmp_path), {"device": "cpu"}, rows)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{tta_report.README_START}\nold\n{tta_report.README_END}\n\n## After\n")
    assert tta_report.update_readme(str(readme), str(tmp_path))
    text = readme.read_text()
    assert text.startswith("# Title\n\n") and text.endswith("\n\n## After\n") and "old" not in text
    # gradmatch: 0.5 the random subset's time (no difference: the censored seed), 1/3 the full batch's (faster).
    assert "| gradmatch@0.5 | 0.50 no difference / 0.33 no difference (5) |" in text
    assert "| random@0.5 | 1.00 no difference / 0.67 faster (5) |" in text
    assert "![accuracy against training time](time_to_accuracy.png)" in text
    resolution = json.loads((tmp_path / "time_to_accuracy_summary.json").read_text())["cells"][0]["resolution"]
    ratios = f"{resolution['vs_random']['detectable_ratio']:.2f} / {resolution['vs_full']['detectable_ratio']:.2f}"
    assert "**What the grid can resolve:** with 5 seeds" in text and f"at or below d, noise 0: {ratios}" in text
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no block")
    assert not tta_report.update_readme(str(plain), str(tmp_path)) and plain.read_text() == "no block"


def test_the_resolution_line_leaves_out_cells_without_verdicts():
    def cell(dataset, ratio):
        found = {"detectable_ratio": ratio, "verdict_seeds": 5, "seeds_for_reference_ratio": 80}
        return {"dataset": dataset, "label_noise": 0.0, "resolution": {"vs_random": found, "vs_full": found}}

    def row(dataset, verdict):
        return {"dataset": dataset, "label_noise": 0.0, "verdict_vs_full": verdict}

    summary = {"cells": [cell("d", 0.6), cell("e", 0.4)], "rows": [row("d", "faster"), row("e", "too few seeds")]}
    line = tta_report.resolution_line(summary)
    assert "at or below d, noise 0: 0.60 / 0.60 (the scatter" in line and "e, noise" not in line
    assert tta_report.resolution_line({**summary, "rows": [row("e", "too few seeds")]}) == ""


def test_the_bottom_line_names_only_strategies_faster_than_both_baselines():
    def row(strategy, against_random, against_full, dataset="d"):
        return {"strategy": strategy, "schedule": "time", "keep": 0.5, "dataset": dataset, "label_noise": 0.0,
                "verdict_vs_random": against_random, "verdict_vs_full": against_full}  # fmt: skip

    few = [row("loss", "too few seeds", "too few seeds")]
    assert "no cell has enough seeds" in tta_report.bottom_line(few)
    mixed = [
        row("random", None, "faster"),
        row("loss", "faster", "no difference"),
        row("gradmatch", "no difference", "faster"),
        row("rho-loss", "slower", "slower", dataset="e"),
        row("importance", "slower", "faster"),
    ]
    line = tta_report.bottom_line(mixed)
    assert "no strategy is `faster` than both" in line and "(d, noise 0; e, noise 0)" in line
    assert line.endswith(
        "The random subset alone is `faster` than the full batch: `random@0.5` (d, noise 0). "
        "Slower than both: `rho-loss@0.5` (e, noise 0)."
    )
    assert "random subset alone" not in tta_report.bottom_line([row("random", None, "no difference"), *mixed[1:]])
    line = tta_report.bottom_line([*mixed, row("stale-loss", "faster", "faster", dataset="e")])
    assert "both the random subset and the full batch: `stale-loss@0.5` (e, noise 0)." in line
    assert "`loss" not in line and "`gradmatch" not in line and "`importance" not in line


def test_the_committed_readme_block_is_what_the_committed_summary_renders():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = os.path.join(root, "README.md")
    results = os.path.join(root, common.DEFAULT_OUTPUT_DIR)
    with open(readme) as handle:
        text = handle.read()
    assert tta_report.README_START in text and tta_report.README_END in text
    with open(os.path.join(results, f"{tta.SUMMARY_NAME}.json")) as handle:
        summary = json.load(handle)
    block = text.split(tta_report.README_START)[1].split(tta_report.README_END)[0]
    expected = tta_report.readme_block(summary, "docs/benchmarks/time_to_accuracy.png")
    assert tta_report.README_START + block + tta_report.README_END == expected, (
        "README.md's results block differs from what docs/benchmarks/time_to_accuracy_summary.json renders: run "
        "`python scripts/benchmark.py report`."
    )
    # The summary itself recomputes from the committed rows.
    with open(os.path.join(results, f"{tta.JSON_NAME}.json")) as handle:
        rows = json.load(handle)["rows"]
    recomputed = tta_grid.summarize(rows)
    assert json.dumps(recomputed["rows"]) == json.dumps(summary["rows"])  # as text: NaN equals NaN


def test_the_report_skips_the_summary_without_its_file(tmp_path):
    assert tta_report.render_summary(str(tmp_path)) is None


# ---- end to end on a tiny model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tta")
    model = save_tiny_model(str(folder / "model"))
    train = write_rows(str(folder / "train.csv"), single_sentence_rows(64, 0))
    validation = write_rows(str(folder / "validation.csv"), single_sentence_rows(12, 1))
    return model, train, validation


def tiny_args(files, output_dir, strategies, seeds="0"):
    model, train, validation = files
    return [
        "time-to-accuracy", "--model_name_or_path", model, "--train_file", train, "--validation_file", validation,
        "--output_dir", str(output_dir), "--strategies", strategies, "--seeds", seeds, "--noises", "0.2",
        "--tta_train_examples", "32", "--batch_size", "8", "--seq_len", "16", "--tta_eval_samples", "16",
        "--tta_min_eval_samples", "16", "--tta_eval_points", "4", "--tta_min_steps", "16", "--device", "cpu",
        "--tta_learning_rates", "other=1e-5, train=3e-4", "--tta_seed_limits", "infobatch=1",
    ]  # fmt: skip


def test_time_to_accuracy_rows_summary_and_resuming_on_a_tiny_model(tmp_path, tiny_files):
    hf_sbp.benchmark.main(tiny_args(tiny_files, tmp_path, "random,gradmatch,infobatch", seeds="0,1"))
    path = tmp_path / "time_to_accuracy.json"
    payload = json.loads(path.read_text())
    first = [r for r in payload["rows"] if r["seed"] == 0]
    assert [(r["strategy"], r["repeat"]) for r in first] == [
        ("none", False), ("random", False), ("gradmatch", False), ("infobatch", False), ("random-prune", False),
        ("none", True),
    ]  # fmt: skip  # random-prune unasked: infobatch's baseline comes with it
    second = [(r["strategy"], r["repeat"]) for r in payload["rows"] if r["seed"] == 1]
    assert second == [("none", False), ("gradmatch", False), ("random", False), ("none", True)]  # rotated, 1 seed
    full = first[0]
    for row in payload["rows"]:
        assert list(row) == list(tta.ROW_KEYS) and row["protocol"] == tta.PROTOCOL
        assert row["learning_rate"] == 3e-4 and row["eval_points"] == 4
        # 12 validation rows topped up to 16 from the training split, which then has 60: 32 drawn per seed.
        assert row["eval_samples"] == 16 and row["train_examples"] == 32
        assert row["epochs"] == 4  # 3 epochs of 4 steps make 12 < --tta_min_steps 16
        marks = [entry[0] for entry in row["curve"]]
        times = [entry[1] for entry in row["curve"]]
        assert times == sorted(times) and times[-1] == pytest.approx(row["train_s"])
        assert row["final_accuracy"] == row["curve"][-1][3]
        # Marks in order; a step longer than a quarter of the budget (a loaded machine) passes two at once.
        assert marks == sorted(set(marks)) and set(marks[:-1]) <= {0.25, 0.5, 0.75} and marks[-1] <= 1.0
    assert full["schedule"] == "steps" and full["steps"] == full["planned_steps"] == 16
    assert full["budget_s"] == full["train_s"] and full["target"] == pytest.approx(0.99 * full["final_accuracy"])
    assert full["budget_cost"] == 3 * 16 * 8 and full["scoring_forward_examples"] == 0
    # The full batch backpropagates every row once per epoch: its mislabelled share is the training subset's.
    assert 0 < full["flipped_labels"] and full["flipped_share_backprop"] == pytest.approx(full["flipped_labels"] / 32)
    random, gradmatch, infobatch = first[1], first[2], first[3]
    assert random["schedule"] == gradmatch["schedule"] == "time" and infobatch["schedule"] == "epochs"
    assert random["budget_s"] == full["budget_s"] and random["planned_steps"] is None
    for row in (random, gradmatch):  # stopped at the first step end at or past the budget
        assert row["stopped_by_budget"] and row["train_s"] >= row["budget_s"]
    assert random["backprop_examples"] == 4 * random["steps"] and random["scoring_forward_examples"] == 0
    assert gradmatch["scoring_forward_examples"] == 8 * gradmatch["steps"]
    cost = gradmatch["curve"][-1][2]
    assert cost == gradmatch["scoring_forward_examples"] + 3 * gradmatch["backprop_examples"]
    assert first[5]["budget_s"] == first[5]["train_s"] != full["budget_s"]  # the repeat measures its own time
    summary = json.loads((tmp_path / "time_to_accuracy_summary.json").read_text())
    assert {r["strategy"] for r in summary["rows"]} == {"none", "random", "gradmatch", "infobatch", "random-prune"}
    assert summary["drift"]["seeds"] == 2 and summary["runs"] == 10
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "report.md").is_file()

    # A rerun skips the recorded runs; a strategy added later runs with the full batch and the random subset.
    hf_sbp.benchmark.main(tiny_args(tiny_files, tmp_path, "random,gradmatch", seeds="0,1"))
    assert json.loads(path.read_text())["rows"] == payload["rows"]
    hf_sbp.benchmark.main(tiny_args(tiny_files, tmp_path, "random,rho-loss"))
    extended = json.loads(path.read_text())["rows"]
    assert extended[:10] == payload["rows"]
    assert [(r["strategy"], r["repeat"]) for r in extended[10:]] == [
        ("none", False), ("random", False), ("rho-loss", False), ("none", True)
    ]  # fmt: skip
    rho = extended[12]
    # Its irreducible losses (two IL models on 16 rows each for 1 epoch, then a forward over the 32) count on both
    # clocks from the start: its first evaluation comes after them.
    assert rho["il_s"] > 0 and rho["il_cost"] == 32 * (3 + 1) and rho["curve"][0][1] >= rho["il_s"]
    assert extended[11]["il_s"] == 0.0 and extended[11]["il_cost"] == 0.0
    assert len({r["sitting"] for r in extended[10:]}) == 1 and extended[10]["sitting"] > full["sitting"]


def test_the_unit_knows_which_labels_the_noise_flipped(tiny_files):
    from transformers import AutoTokenizer

    model, train, validation = tiny_files
    spec = common.DataTrainingArguments(train_file=train, validation_file=validation)
    data = common.Data(spec, AutoTokenizer.from_pretrained(model), 16)
    settings = tta.TimeToAccuracySettings(train_examples=40, eval_samples=30, min_eval_samples=20)
    cell = tta.Cell.from_data("d", data, 0.5, 3, settings)
    clean = tta.Cell.from_data("d", data, 0.0, 3, settings)
    assert len(cell.validation) == 20 and len(cell.train) == 40  # 12 validation rows + 8 moved from training
    assert clean.validation["input_ids"] == cell.validation["input_ids"]  # the validation sample ignores the seed
    noisy, labels = np.asarray(cell.train["labels"]), np.asarray(clean.train["labels"])
    assert cell.flipped == np.flatnonzero(noisy != labels).tolist() and 0 < len(cell.flipped) < 40
    moved = {tuple(ids) for ids in cell.validation["input_ids"]}
    assert not moved & {tuple(ids) for ids in cell.train["input_ids"]}  # no validation row is trained on


def test_plan_recorder_measures_the_share_of_flipped_rows_visited():
    from hf_sbp.core.pruning import EpochPlan

    class History:
        current = None

    class Trainer:
        pruning_history = History()

    recorder = tta.PlanRecorder(Trainer())
    for epoch, order, pruned in [(0, [0, 1, 2, 3], 0), (1, [0, 1], 2), (2, [2, 3, 1], 1)]:
        Trainer.pruning_history.current = EpochPlan(epoch, torch.tensor(order), torch.ones(4), pruned, True, 0)
        recorder.on_step_begin(None, None, None)
        recorder.on_step_begin(None, None, None)  # a later step of the same epoch changes nothing
    assert recorder.visited == {1: [0, 1], 2: [2, 3, 1]}  # the unpruned first epoch is left out
    assert recorder.flipped_share([1, 3]) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_bad_time_to_accuracy_arguments_are_rejected():
    with pytest.raises(ValueError, match="--tta_eval_points=-1"):
        hf_sbp.benchmark.main(["time-to-accuracy", "--tta_eval_points", "-1"])
    with pytest.raises(ValueError, match="'infobatch:3' is invalid"):
        hf_sbp.benchmark.main(["time-to-accuracy", "--tta_seed_limits", "infobatch:3"])
    with pytest.raises(ValueError, match="'bbc-news:5e-5' is invalid"):
        hf_sbp.benchmark.main(["time-to-accuracy", "--tta_learning_rates", "bbc-news:5e-5"])
    quick = hf_sbp.benchmark.cli.parse_arguments(["time-to-accuracy", "--quick"])
    assert quick.tta_noise_values == [0.0] and quick.tta_seed_values == [0, 1] and len(quick.dataset_specs()) == 1
    assert (quick.tta_eval_points, quick.tta_train_examples, quick.tta_min_steps) == (12, 640, 60)
    assert quick.tta_strategy_names == ["random", "gradmatch"]
    full = hf_sbp.benchmark.cli.parse_arguments(["time-to-accuracy"])
    assert full.tta_noise_values == [0.0, 0.2] and full.tta_seed_values == [0, 1, 2, 3, 4]
    assert (full.tta_eval_points, full.tta_eval_samples, full.tta_min_steps) == (24, 1000, 240)
    assert full.tta_seed_limit("infobatch") == 3 and full.tta_seed_limit("loss") == 5
    assert full.tta_learning_rate("bbc-news") == 5e-5 and full.tta_learning_rate("tweets") == full.learning_rate
    assert "time-to-accuracy" in common.PARTS  # `all` runs it


# ---- LoRA throughput --------------------------------------------------------------------------------


def test_lora_trains_only_the_adapters_and_the_head():
    pytest.importorskip("peft")
    model = throughput.lora_model(tiny_bert(), r=8)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable if "lora_A" in name} == {"query", "value"}
    assert any("classifier.modules_to_save" in name for name in trainable)


def test_lora_throughput_rows_are_added_beside_full_fine_tuning(tmp_path, tiny_files):
    pytest.importorskip("peft")
    full = [
        {"strategy": "none", "keep": 1.0, "device": "cpu", "step_s": 1.0, "full_step_s": 1.0},
        {"strategy": "random", "keep": 0.5, "device": "cpu", "step_s": 0.5, "full_step_s": 1.0},
        {"strategy": "gradmatch", "keep": 0.5, "device": "cpu", "step_s": 0.8, "full_step_s": 1.0,
         "ideal_ratio": 0.833},
        {"strategy": "scoring_forward", "keep": 1.0, "device": "cpu", "step_s": 0.25, "full_step_s": 1.0},
    ]  # fmt: skip
    for row in full:
        row["ratio_to_full"] = row["step_s"]
    common.write_json(str(tmp_path / "throughput.json"), {"device": "cpu"}, full)
    model, train, validation = tiny_files
    hf_sbp.benchmark.main(
        ["throughput", "--peft", "lora", "--model_name_or_path", model, "--train_file", train, "--validation_file",
         validation, "--output_dir", str(tmp_path), "--strategies", "random,gradmatch", "--keeps", "0.5",
         "--repeats", "2", "--batch_size", "8", "--seq_len", "16", "--device", "cpu"]
    )  # fmt: skip
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert rows[:4] == full  # the full fine-tuning rows stay
    lora = rows[4:]
    assert sorted(r["strategy"] for r in lora) == ["gradmatch", "none", "random", "scoring_forward"]
    for row in lora:
        assert row["peft"] == "lora" and row["lora_r"] == 8
        assert set(full[0]) | {"ratio_to_full"} <= set(row) and row["step_s"] > 0
        assert "peak_mem_mb" not in row  # the CPU's resident memory is the allocator's; CUDA rows have a peak
        assert (row["strategy"] == "scoring_forward") == ("saved_activations_mb" not in row)
    gradmatch = next(r for r in lora if r["strategy"] == "gradmatch")
    assert gradmatch["ideal_ratio"] == pytest.approx(1.0)  # (1 + 2 keep) / 2: with LoRA keep 0.5 saves nothing
    text = (tmp_path / "report.md").read_text()
    assert "### Break-even keep" in text
    # Full fine-tuning: 1 - 0.25 / 1.0; the gradmatch step (0.8 at keep 0.5) grows by 1.0 per unit of keep.
    assert "| full fine-tuning | 1.000 | 0.250 | 0.250 | 3.00 | 0.75 | 0.70 (gradmatch at 0.5) |" in text
    assert "| LoRA |" in text
    # A later full fine-tuning run keeps the LoRA rows.
    assert throughput.merge_rows(rows, full[:2]) == [*lora, *full[:2]]


def test_the_grid_waits_while_the_pause_file_exists(tmp_path):
    assert tta_grid.wait_while_paused(str(tmp_path), print, sleep=pytest.fail) == 0.0  # no file: no wait, no sleep
    pause = tmp_path / tta_grid.PAUSE_NAME
    pause.write_text("")
    sleeps, messages = [], []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 3:  # someone removes the file while the grid waits
            pause.unlink()

    assert tta_grid.wait_while_paused(str(tmp_path), messages.append, poll_s=0.5, sleep=sleep) >= 0.0
    assert sleeps == [0.5, 0.5, 0.5] and not pause.exists()
    assert "paused" in messages[0] and str(pause) in messages[0] and "resumed" in messages[1]


def test_a_strategy_variant_runs_its_strategy_with_its_settings(tmp_path):
    label = "rho-loss[sbp_il_model=linear_probe;sbp_il_epochs=2]"
    assert common.parse_variant(label) == ("rho-loss", {"sbp_il_model": "linear_probe", "sbp_il_epochs": 2})
    assert common.parse_variant("rho-loss") == ("rho-loss", {})
    assert common.parse_strategies(f"random,{label}") == ["random", label]
    assert common.run_keep(label, 0.5) == 0.5 and not common.prunes_dataset(label)
    assert common.strategy_order([label, "stale-rho-loss", "rho-loss", "random"]) == [
        "random", "rho-loss", label, "stale-rho-loss"
    ]  # fmt: skip
    trainer = common.make_trainer(tiny_bert(3), label, 0.5, 4, "cpu", str(tmp_path))
    assert trainer.strategy.name == "rho-loss" and trainer.sbp_args.sbp_il_model == "linear_probe"
    assert trainer.sbp_args.sbp_il_epochs == 2
    for bad in ("rho-loss[sbp_keep=0.3]", "rho-loss[il_model=linear_probe]", "rho-loss[sbp_il_model]"):
        with pytest.raises(ValueError, match="sbp_key=value"):
            common.parse_variant(bad)
    with pytest.raises(ValueError, match="not a registered strategy"):
        common.parse_strategies("nonsense[sbp_seed=1]")
    grid = hf_sbp.benchmark.cli.parse_arguments(["time-to-accuracy"])
    assert grid.tta_strategy_names[-1] == "rho-loss[sbp_il_model=linear_probe]"
    assert "rho-loss[sbp_il_model=linear_probe]" not in grid.strategy_names  # the other parts: as named
    mine = hf_sbp.benchmark.cli.parse_arguments(["time-to-accuracy", "--strategies", "random,loss"])
    assert mine.tta_strategy_names == ["random", "loss"]
