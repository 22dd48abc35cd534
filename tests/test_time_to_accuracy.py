"""The time-to-accuracy part of the benchmark (budget callback, schedule sizing, resuming, rows and report) and the
throughput part's LoRA mode, on a fake clock, hand-made results and a tiny model (the measurements themselves are
run by hand: ``python scripts/benchmark.py time-to-accuracy --quick``)."""

import json
import math
import os
import sys

import pytest
import torch
from transformers import AutoTokenizer, TrainerControl, TrainerState

import hf_sbp.benchmark
from hf_sbp.benchmark import common, report, throughput
from hf_sbp.benchmark import time_to_accuracy as tta
from hf_sbp.pruning import EpochPlan

sys.path.insert(0, os.path.dirname(__file__))
from glue_fixtures import save_tiny_model, single_sentence_rows, write_rows  # noqa: E402
from tiny_models import tiny_bert  # noqa: E402

# ---- schedule sizing and calibration ----------------------------------------------------------------


def test_schedule_steps_fills_the_budget_with_whole_steps():
    assert tta.schedule_steps(60.0, 1.0) == 60
    assert tta.schedule_steps(60.0, 0.5) == 120  # a step half as long: twice the steps
    assert tta.schedule_steps(60.0, 0.7, startup_s=1.0) == 84  # 59 / 0.7 = 84.3
    assert tta.schedule_steps(0.3, 0.1) == 3  # exactly three steps, despite 0.3 / 0.1 = 2.9999999999999996
    assert tta.schedule_steps(1.0, 5.0) == 1  # at least one step
    for bad in ({"budget_s": 60.0, "step_s": 0.0}, {"budget_s": 0.0, "step_s": 1.0}):
        with pytest.raises(ValueError):
            tta.schedule_steps(**bad)
    with pytest.raises(ValueError, match="startup_s"):
        tta.schedule_steps(60.0, 1.0, startup_s=-1.0)


def test_warmup_is_the_same_fraction_of_every_schedule():
    assert tta.warmup_steps(60) == 6
    assert tta.warmup_steps(120) == 12
    assert tta.warmup_steps(84) == 9  # 8.4, rounded up as TrainingArguments rounds a fractional warmup
    assert tta.warmup_steps(5) == 1


def test_calibration_drops_the_warm_up_step_and_takes_the_median():
    # Train begins at 10 s; steps end at 12 (warm-up: 2 s), then after 0.5, 0.6, 0.4 and 0.5 s.
    step_s, startup_s = tta.calibrated_step(10.0, [12.0, 12.5, 13.1, 13.5, 14.0])
    assert step_s == pytest.approx(0.5)
    assert startup_s == pytest.approx(1.5)  # the first step's 2 s less one ordinary step
    assert tta.calibrated_step(0.0, [0.1, 0.6])[1] == 0.0  # a first step faster than the rest: no startup
    with pytest.raises(ValueError, match="warm-up step"):
        tta.calibrated_step(0.0, [1.0])


def test_time_to_target_is_the_first_evaluation_at_or_above_the_target():
    curve = [[5.0, 0.50], [10.0, 0.70], [15.0, 0.65], [20.0, 0.72]]
    assert tta.time_to_target(curve, 0.70) == 10.0
    assert tta.time_to_target(curve, 0.71) == 20.0
    assert tta.time_to_target(curve, 0.80) is None


# ---- the budget callback on a fake clock --------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def drive(callback, clock, step_s, max_steps):
    """Run the callback through a training loop whose steps take ``step_s`` seconds on ``clock``."""
    state, control = TrainerState(), TrainerControl()
    state.max_steps = max_steps
    callback.on_train_begin(None, state, control)
    while state.global_step < max_steps and not control.should_training_stop:
        clock.now += step_s
        state.global_step += 1
        callback.on_step_end(None, state, control)
    return state, control


def test_budget_callback_stops_at_the_budget_with_evaluation_excluded():
    clock = FakeClock()
    accuracies = iter([0.5, 0.6, 0.7, 0.8])

    def evaluate():
        clock.now += 100.0  # each evaluation takes 100 s of wall clock, far more than the budget
        return next(accuracies)

    callback = tta.BudgetCallback(evaluate, budget_s=10.0, eval_interval_s=2.5, clock=clock)
    state, control = drive(callback, clock, step_s=1.0, max_steps=50)
    # Steps of 1 s: the marks at 2.5, 5 and 7.5 s are passed at 3, 5 and 8 s; the budget is reached at step 10.
    assert state.global_step == 10 and control.should_training_stop
    assert callback.curve == [[3.0, 0.5], [5.0, 0.6], [8.0, 0.7], [10.0, 0.8]]
    assert callback.train_s == 10.0 and callback.eval_s == 400.0
    assert callback.stopped_by_budget


def test_budget_callback_without_budget_evaluates_every_n_steps_and_at_the_end():
    clock = FakeClock()
    calls = []
    callback = tta.BudgetCallback(
        lambda: len(calls) + 0.5, eval_every_steps=5, clock=clock, on_step=lambda: calls.append(1)
    )
    state, control = drive(callback, clock, step_s=2.0, max_steps=12)
    assert state.global_step == 12 and not control.should_training_stop  # the schedule ended, not the callback
    assert [t for t, _ in callback.curve] == [10.0, 20.0, 24.0]
    assert len(calls) == 12 and not callback.stopped_by_budget


def test_a_schedule_that_ends_at_the_budget_is_evaluated_once_and_not_cut_off():
    clock = FakeClock()
    callback = tta.BudgetCallback(lambda: 0.9, budget_s=6.0, eval_interval_s=2.0, clock=clock)
    state, _ = drive(callback, clock, step_s=1.0, max_steps=6)
    assert state.global_step == 6
    assert [t for t, _ in callback.curve] == [2.0, 4.0, 6.0]
    assert not callback.stopped_by_budget


def test_the_callback_needs_one_evaluation_schedule():
    with pytest.raises(ValueError, match="exactly one"):
        tta.BudgetCallback(lambda: 0.0, budget_s=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        tta.BudgetCallback(lambda: 0.0, eval_interval_s=1.0, eval_every_steps=2)


# ---- resuming ---------------------------------------------------------------------------------------


def recorded(*pairs, cell=("d", 0.0, 0)):
    return [{"dataset": cell[0], "label_noise": cell[1], "seed": cell[2], "strategy": s, "keep": k} for s, k in pairs]


GRID = [("none", 1.0), ("gradmatch", 0.5), ("random", 0.5)]


def test_runs_to_make_skips_recorded_runs_and_reruns_the_baselines_beside_new_ones():
    cell = ("d", 0.0, 0)
    assert tta.runs_to_make([], cell, GRID) == GRID
    everything = recorded(*GRID)
    assert tta.runs_to_make(everything, cell, GRID) == []
    assert tta.runs_to_make(everything, ("d", 0.2, 0), GRID) == GRID  # another cell
    # A strategy added later: the full batch and the random subset run again beside it.
    assert tta.runs_to_make(everything, cell, [*GRID, ("loss", 0.5)]) == [("none", 1.0), ("random", 0.5), ("loss", 0.5)]
    # Interrupted after the full batch and the random subset: all of the cell's runs again.
    assert tta.runs_to_make(recorded(("none", 1.0), ("random", 0.5)), cell, GRID) == GRID
    # The random subset was recorded before but is not requested now: it still runs beside the new strategy.
    assert tta.runs_to_make(everything, cell, [("none", 1.0), ("loss", 0.5)]) == [
        ("none", 1.0), ("loss", 0.5), ("random", 0.5),
    ]  # fmt: skip
    # Neither requested nor recorded: no random subset.
    assert tta.runs_to_make([], cell, [("none", 1.0), ("loss", 0.5)]) == [("none", 1.0), ("loss", 0.5)]


# ---- end to end on a tiny model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tta")
    model = save_tiny_model(str(folder / "model"))
    train = write_rows(str(folder / "train.csv"), single_sentence_rows(64, 0))
    validation = write_rows(str(folder / "validation.csv"), single_sentence_rows(32, 1))
    return model, train, validation


def tiny_args(files, output_dir, strategies):
    model, train, validation = files
    return [
        "time-to-accuracy", "--model_name_or_path", model, "--train_file", train, "--validation_file", validation,
        "--output_dir", str(output_dir), "--strategies", strategies, "--seeds", "0", "--noises", "0",
        "--tta_train_examples", "32", "--batch_size", "8", "--seq_len", "16", "--tta_eval_samples", "16",
        "--tta_eval_points", "3", "--tta_calibration_steps", "2", "--device", "cpu", "--tta_learning_rates",
        "other=1e-5, train=3e-4",
    ]  # fmt: skip


def test_time_to_accuracy_rows_and_resuming_on_a_tiny_model(tmp_path, tiny_files):
    hf_sbp.benchmark.main(tiny_args(tiny_files, tmp_path, "random,gradmatch"))
    path = tmp_path / "time_to_accuracy.json"
    payload = json.loads(path.read_text())
    rows = {r["strategy"]: r for r in payload["rows"]}
    assert list(rows) == ["none", "random", "gradmatch"]  # the full batch first: it sets the budget
    full = rows["none"]
    for row in rows.values():
        assert list(row) == list(tta.ROW_KEYS)
        assert (row["dataset"], row["label_noise"], row["seed"]) == ("train", 0.0, 0)
        assert row["budget_s"] == full["budget_s"] and row["target"] == full["target"]
        assert row["machine"]["device"] == "cpu" and row["sitting"] == full["sitting"]
        times = [t for t, _ in row["curve"]]
        assert times == sorted(times) and times[-1] == pytest.approx(row["train_s"])
        assert row["final_accuracy"] == row["curve"][-1][1]
        assert row["time_to_target_s"] == tta.time_to_target(row["curve"], row["target"])
        assert row["train_examples"] == 32 and row["eval_samples"] == 16 and row["epochs"] == 3
        assert row["learning_rate"] == 3e-4  # this dataset's entry of --tta_learning_rates
    # The full batch: 3 epochs of 32 examples in batches of 8, evaluated every 12 / 3 steps.
    assert full["steps"] == full["planned_steps"] == 12 and full["backprop_examples"] == 96
    assert [len(full["curve"]), full["scoring_forward_examples"], full["calibration_s"]] == [3, 0, 0.0]
    assert full["budget_s"] == full["train_s"] and full["target"] == pytest.approx(0.99 * full["final_accuracy"])
    assert full["time_to_target_s"] is not None and full["time_to_target_s"] <= full["budget_s"]
    for name in ("random", "gradmatch"):
        row = rows[name]
        assert row["calibration_s"] > 0 and row["step_s"] > 0
        assert row["warmup_steps"] == tta.warmup_steps(row["planned_steps"])
        # Either the schedule ran to its end within the budget, or the budget stopped it once spent.
        if row["stopped_by_budget"]:
            assert row["steps"] < row["planned_steps"] and row["train_s"] >= row["budget_s"]
        else:
            assert row["steps"] == row["planned_steps"]
        if name == "random":
            assert row["backprop_examples"] == 4 * row["steps"]  # keep 0.5 of 8
        else:  # OMP may stop before k rows once the residual is negligible (a long run on a loaded machine)
            assert row["steps"] <= row["backprop_examples"] <= 4 * row["steps"]
    assert rows["random"]["scoring_forward_examples"] == 0
    assert rows["gradmatch"]["scoring_forward_examples"] == 8 * rows["gradmatch"]["steps"]
    text = (tmp_path / "README.md").read_text()
    assert "## Time to accuracy" in text and (tmp_path / "time_to_accuracy.png").stat().st_size > 1000

    # A rerun skips the recorded runs; a strategy added later runs with the full batch and the random subset.
    hf_sbp.benchmark.main(tiny_args(tiny_files, tmp_path, "random,gradmatch"))
    assert json.loads(path.read_text())["rows"] == payload["rows"]
    hf_sbp.benchmark.main(tiny_args(tiny_files, tmp_path, "random,gradmatch,loss"))
    extended = json.loads(path.read_text())["rows"]
    assert extended[:3] == payload["rows"]
    assert [r["strategy"] for r in extended[3:]] == ["none", "random", "loss"]
    assert len({r["sitting"] for r in extended[3:]}) == 1 and extended[3]["sitting"] > full["sitting"]
    assert extended[5]["budget_s"] == extended[3]["budget_s"] != full["budget_s"]


# ---- the report -------------------------------------------------------------------------------------


def tta_row(strategy, seed, reached_s, sitting, budget_s=60.0, keep=0.5, target=0.8):
    """A hand-made row whose curve crosses ``target`` at ``reached_s`` (``None``: never)."""
    times = [budget_s * (i + 1) / 12 for i in range(12)]
    curve = [[t, target + 0.05 if reached_s is not None and t >= reached_s else target - 0.05] for t in times]
    return {
        "dataset": "d", "label_noise": 0.0, "seed": seed, "strategy": strategy,
        "keep": 1.0 if strategy == "none" else keep, "budget_s": budget_s, "target": target, "curve": curve,
        "time_to_target_s": reached_s, "final_accuracy": curve[-1][1], "steps": 60, "backprop_examples": 100,
        "scoring_forward_examples": 0, "sitting": sitting, "machine": {"device": "cpu"},
    }  # fmt: skip


def hand_made_rows():
    rows = []
    for seed, (full, random, gradmatch) in enumerate([(50.0, 30.0, 20.0), (60.0, 40.0, None), (55.0, 35.0, 25.0)]):
        rows += [tta_row("none", seed, full, "A"), tta_row("random", seed, random, "A")]
        rows.append(tta_row("gradmatch", seed, gradmatch, "A"))
    return rows


def test_report_compares_medians_over_seeds_with_the_random_subset(tmp_path):
    common.write_json(str(tmp_path / "time_to_accuracy.json"), {"device": "cpu"}, hand_made_rows())
    text = open(report.write_report(str(tmp_path))).read()
    # Medians: none 55 s, random 35 s, gradmatch 25 s (20, 25 and never); ratios 55/35, 25/35 and 25/55.
    assert "| d | 0.0 | 0.5 | none | 3/3 | 55.0 | 1.57x | 1.00x |" in text
    assert "| d | 0.0 | 0.5 | gradmatch | 2/3 | 25.0 | 0.71x | 0.45x |" in text
    assert "| d | 0.0 | 0.5 | random | 3/3 | 35.0 | 1.00x | 0.64x |" in text
    assert "gradmatch@0.5 first, in 25.0 s (median), 0.71x the random subset's time; next random@0.5 in 35.0 s" in text
    assert "![time_to_accuracy.png](time_to_accuracy.png)" in text
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 1000
    assert "No CUDA GPU was available" in text


def test_report_compares_times_only_within_a_sitting(tmp_path):
    # Sitting B, on a machine twice as slow, adds loss beside new full-batch and random runs.
    rows = hand_made_rows()
    for seed in range(3):
        rows += [tta_row("none", seed, 110.0, "B", 120.0), tta_row("random", seed, 70.0, "B", 120.0)]
        rows.append(tta_row("loss", seed, 35.0 + seed, "B", 120.0))
    table = {e["strategy"]: e for e in tta.comparison_table(rows)}
    assert table["loss"]["median_time_to_target_s"] == 36.0
    assert table["loss"]["vs_random"] == pytest.approx(36.0 / 70.0)  # B's random subset, not A's
    assert table["gradmatch"]["vs_random"] == pytest.approx(25.0 / 35.0)  # A's
    assert table["random"]["median_budget_s"] == 120.0  # the latest sitting's runs
    # loss took more seconds than gradmatch, but less of its own sitting's random subset's time.
    (first,) = tta.first_to_target(tta.comparison_table(rows))
    assert (first["winner"], first["runner_up"]) == ("loss", "gradmatch")
    assert first["lead_ratio"] == pytest.approx((36.0 / 70.0) / (25.0 / 35.0))


def test_report_skips_time_to_accuracy_without_its_file(tmp_path):
    overhead = [{"batch_size": 64, "seq_len": 64, "keep": 0.5, "device": "cpu", "forward_s": 0.5, "selection_s": 0.002}]
    common.write_json(str(tmp_path / "overhead.json"), {"device": "cpu"}, overhead)
    text = open(report.write_report(str(tmp_path))).read()
    assert "Time to accuracy" not in text and not (tmp_path / "time_to_accuracy.png").exists()


def test_no_strategy_reaching_the_target_is_reported_as_such():
    rows = [tta_row("none", 0, 50.0, "A"), tta_row("random", 0, None, "A"), tta_row("gradmatch", 0, None, "A")]
    table = {e["strategy"]: e for e in tta.comparison_table(rows)}
    assert math.isinf(table["random"]["median_time_to_target_s"]) and math.isnan(table["gradmatch"]["vs_random"])
    (first,) = tta.first_to_target(list(table.values()))
    assert first["winner"] == "none" and first["runner_up"] in ("random", "gradmatch")


# ---- LoRA throughput --------------------------------------------------------------------------------


def test_lora_trains_only_the_adapters_and_the_head():
    pytest.importorskip("peft")
    model = throughput.lora_model(tiny_bert(), r=8)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable if "lora_A" in name} == {"query", "value"}
    assert any("classifier.modules_to_save" in name for name in trainable)


def test_lora_throughput_rows_are_added_beside_full_fine_tuning(tmp_path, tiny_files, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.setattr(throughput, "peak_memory_mb", lambda bench, strategy, keep: 1.0)  # no child processes
    full = [
        {"strategy": "none", "keep": 1.0, "device": "cpu", "step_s": 1.0, "full_step_s": 1.0, "peak_mem_mb": 300.0},
        {"strategy": "random", "keep": 0.5, "device": "cpu", "step_s": 0.5, "full_step_s": 1.0, "peak_mem_mb": 300.0},
        {"strategy": "gradmatch", "keep": 0.5, "device": "cpu", "step_s": 0.8, "full_step_s": 1.0,
         "peak_mem_mb": 300.0, "ideal_ratio": 0.833},
        {"strategy": "scoring_forward", "keep": 1.0, "device": "cpu", "step_s": 0.25, "full_step_s": 1.0,
         "peak_mem_mb": None},
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
    gradmatch = next(r for r in lora if r["strategy"] == "gradmatch")
    assert gradmatch["ideal_ratio"] == pytest.approx(1.0)  # (1 + 2 keep) / 2: with LoRA keep 0.5 saves nothing
    text = (tmp_path / "README.md").read_text()
    assert "### Break-even keep" in text
    # Full fine-tuning: 1 - 0.25 / 1.0; the gradmatch step (0.8 at keep 0.5) grows by 1.0 per unit of keep.
    assert "| full fine-tuning | 1.000 | 0.250 | 0.250 | 3.00 | 0.75 | 0.70 (gradmatch at 0.5) |" in text
    assert "| LoRA |" in text
    # A later full fine-tuning run keeps the LoRA rows.
    assert throughput.merge_rows(rows, full[:2]) == [*lora, *full[:2]]


def test_the_peak_memory_process_measures_lora_too():
    bench = hf_sbp.benchmark.cli.parse_arguments(["throughput", "--peft", "lora", "--lora_r", "4"])
    command = throughput.peak_memory_command(bench, "gradmatch", 0.5)
    assert command[command.index("--peft") + 1] == "lora" and command[command.index("--lora_r") + 1] == "4"
    plain = throughput.peak_memory_command(hf_sbp.benchmark.cli.parse_arguments(["throughput"]), "gradmatch", 0.5)
    assert "--peft" not in plain


def test_bad_time_to_accuracy_and_peft_arguments_are_rejected():
    with pytest.raises(ValueError, match="peft='bogus'"):
        hf_sbp.benchmark.main(["throughput", "--peft", "bogus"])
    with pytest.raises(ValueError, match="--tta_eval_points"):
        hf_sbp.benchmark.main(["time-to-accuracy", "--tta_eval_points", "0"])
    quick = hf_sbp.benchmark.cli.parse_arguments(["time-to-accuracy", "--quick"])
    assert quick.tta_noise_values == [0.0] and quick.seed_values == [0] and len(quick.dataset_specs()) == 1
    full = hf_sbp.benchmark.cli.parse_arguments(["time-to-accuracy"])
    assert full.tta_noise_values == [0.0, 0.2] and full.seed_values == [0, 1, 2]
    assert full.tta_learning_rate("bbc-news") == 5e-5 and full.tta_learning_rate("tweets") == full.learning_rate
    with pytest.raises(ValueError, match="'bbc-news:5e-5' is invalid"):
        hf_sbp.benchmark.main(["time-to-accuracy", "--tta_learning_rates", "bbc-news:5e-5"])
    assert "time-to-accuracy" in common.PARTS  # `all` runs it


def test_schedule_of_a_cached_strategy_has_a_cold_epoch_then_warm_steps():
    # An epoch of 20 steps at 0.7 s (14 s after 1 s of start-up), then 45 s at 0.5 s: 90 steps.
    assert tta.schedule_steps(60.0, 0.7, 1.0, warm_step_s=0.5, cold_steps=20) == 20 + 90
    # A budget inside the cold epoch: cold steps only, as without a warm step time.
    assert tta.schedule_steps(10.0, 0.7, 1.0, warm_step_s=0.5, cold_steps=20) == tta.schedule_steps(10.0, 0.7, 1.0)


def test_a_cached_strategy_is_calibrated_after_its_first_epoch(tmp_path, tiny_files):
    hf_sbp.benchmark.main(tiny_args(tiny_files, tmp_path, "stale-loss"))
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "time_to_accuracy.json").read_text())["rows"]}
    stale, full = rows["stale-loss"], rows["none"]
    assert full["warm_step_s"] is None
    assert stale["warm_step_s"] > 0
    # 32 examples in batches of 8: a cold epoch of 4 steps, then warm steps until the budget.
    expected = tta.schedule_steps(full["budget_s"], stale["step_s"], stale["startup_s"], stale["warm_step_s"], 4)
    assert stale["planned_steps"] == expected
    # After the first epoch rows are scored only when stale: fewer than one scored row per row of the batches (unless
    # the budget, set by the full batch's run on a machine busier then, ended the run inside the first epoch).
    if stale["steps"] > 4:
        assert stale["scoring_forward_examples"] < stale["steps"] * 8


# ---- dataset-level strategies -----------------------------------------------------------------------


def test_runs_to_make_brings_every_keeps_random_subset_and_random_prune_beside_a_pruning_run():
    cell = ("d", 0.0, 0)
    grid = common.strategy_grid(["random", "gradmatch", "infobatch", "random-prune"], [0.5, 0.25])
    assert grid[-2:] == [("infobatch", 1.0), ("random-prune", 1.0)]  # whole batches, once
    everything = recorded(*grid)
    assert tta.runs_to_make(everything, cell, grid) == []
    without_infobatch = [r for r in everything if r["strategy"] != "infobatch"]
    assert tta.runs_to_make(without_infobatch, cell, grid) == [
        ("none", 1.0), ("random", 0.5), ("random", 0.25), ("infobatch", 1.0), ("random-prune", 1.0),
    ]  # fmt: skip


def test_report_compares_a_pruning_strategy_with_every_baseline_of_its_sitting(tmp_path):
    rows = []
    for seed, (full, random, infobatch, prune) in enumerate([(50, 30, 20, 40), (60, 40, 25, 45), (55, 35, 22, None)]):
        rows += [tta_row("none", seed, full, "A"), tta_row("random", seed, random, "A")]
        rows.append(tta_row("infobatch", seed, infobatch, "A", keep=1.0))
        rows.append(tta_row("random-prune", seed, prune, "A", keep=1.0))
    for row in rows:
        row.update(flipped_labels=10, train_examples=100, pruned_fraction=None, flipped_share_visited=None)
        if row["strategy"] in ("infobatch", "random-prune"):
            infobatch = row["strategy"] == "infobatch"
            row.update(pruned_fraction=0.3, flipped_share_visited=0.13 if infobatch else 0.1, steps=45)
    table = {e["strategy"]: e for e in tta.comparison_table(rows)}
    assert set(table) == {"none", "random", "infobatch", "random-prune"} and table["infobatch"]["keep"] == 0.5
    assert table["infobatch"]["vs_random"] == pytest.approx(22 / 35)
    assert table["infobatch"]["vs_full_batch"] == pytest.approx(22 / 55)
    assert table["infobatch"]["vs_random_prune"] == pytest.approx(22 / 45)  # random-prune: 40, 45, never
    assert math.isnan(table["random"]["vs_random_prune"])
    common.write_json(str(tmp_path / "time_to_accuracy.json"), {"device": "cpu"}, rows)
    text = open(report.write_report(str(tmp_path))).read()
    assert "| d | 0.0 | 0.5 | infobatch | 3/3 | 22.0 | 0.63x | 0.40x | 0.49x |" in text
    assert "- **d, noise 0.0, keep 0.5**: infobatch (0.63x, 0.40x, 0.49x)" in text
    # 45 steps against the full batch's 60; 13% of the visited examples mislabelled against 10% of the data.
    assert "| d | 0.0 | infobatch | 3 | 0.300 | 0.75 | 0.8500 | 0.130 | 0.100 |" in text


def test_a_pruning_strategy_runs_the_full_batchs_epochs_without_calibration(tmp_path, tiny_files):
    arguments = tiny_args(tiny_files, tmp_path, "infobatch")
    arguments[arguments.index("--noises") + 1] = "0.3"
    hf_sbp.benchmark.main(arguments)
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "time_to_accuracy.json").read_text())["rows"]}
    infobatch, full = rows["infobatch"], rows["none"]
    # Under noise: the share of mislabelled rows among those the pruned epochs visited (none for the full batch).
    assert full["flipped_share_visited"] is None and full["flipped_labels"] > 0
    assert 0.0 <= infobatch["flipped_share_visited"] <= 1.0
    assert (infobatch["keep"], infobatch["schedule"], full["schedule"]) == (1.0, "epochs", "steps")
    assert infobatch["calibration_s"] == 0.0 and infobatch["warmup_steps"] == full["warmup_steps"]
    # 3 epochs of 32 examples, the first whole (4 steps), the others pruned: fewer steps than the full batch's 12;
    # the budget stops it only if this machine got slower since the full batch's run.
    if not infobatch["stopped_by_budget"]:
        assert infobatch["steps"] == infobatch["planned_steps"] and 4 + 2 <= infobatch["steps"] < 12
        assert infobatch["backprop_examples"] == round(96 * (1 - infobatch["pruned_fraction"]))
    assert infobatch["steps"] < infobatch["backprop_examples"] <= 8 * infobatch["steps"]  # a pruned epoch may end short
    assert full["pruned_fraction"] is None


def test_cell_knows_which_labels_the_noise_flipped(tiny_files):
    model, train, validation = tiny_files
    bench = common.BenchmarkArguments(
        command="time-to-accuracy", model_name_or_path=model, train_file=train, validation_file=validation
    )
    ((name, spec),) = bench.dataset_specs()
    data = common.Data(spec, AutoTokenizer.from_pretrained(model), 16)
    settings = tta.TimeToAccuracySettings(train_examples=32)
    noisy = tta.Cell.from_data(name, data, 0.4, 3, settings)
    clean = tta.Cell.from_data(name, data, 0.0, 3, settings)
    differ = [i for i, (a, b) in enumerate(zip(noisy.train["labels"], clean.train["labels"], strict=True)) if a != b]
    assert noisy.flipped == differ and len(differ) == noisy.flipped_labels > 0 and clean.flipped == []


def test_plan_recorder_measures_the_share_of_flipped_rows_visited():
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


def test_report_says_when_a_pruning_strategys_baseline_never_reached_the_target(tmp_path):
    rows = []
    for seed, prune in enumerate([None, None, 40]):
        rows += [tta_row("none", seed, 50, "A"), tta_row("random", seed, 30, "A")]
        rows += [tta_row("infobatch", seed, 25, "A", keep=1.0), tta_row("random-prune", seed, prune, "A", keep=1.0)]
    for row in rows:
        row.update(flipped_labels=0, train_examples=100, pruned_fraction=None, flipped_share_visited=None)
    table = {e["strategy"]: e for e in tta.comparison_table(rows)}
    assert table["infobatch"]["vs_random_prune"] == 0.0  # 25 s against a median of never
    common.write_json(str(tmp_path / "time_to_accuracy.json"), {"device": "cpu"}, rows)
    text = open(report.write_report(str(tmp_path))).read()
    assert "| d | 0.0 | 0.5 | infobatch | 3/3 | 25.0 | 0.83x | 0.50x | baseline not reached |" in text
