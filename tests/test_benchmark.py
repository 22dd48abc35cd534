"""The benchmark's report logic on synthetic results (the measurements themselves are run by hand)."""

import importlib.util
import json
import math
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark.py")
spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
sys.modules["benchmark"] = benchmark  # dataclasses resolve their module by name
spec.loader.exec_module(benchmark)


def test_accuracy_at_takes_the_last_evaluation_within_the_budget():
    curve = [[10.0, 0.5], [20.0, 0.6], [30.0, 0.7]]
    assert benchmark.accuracy_at(curve, 25.0) == 0.6
    assert benchmark.accuracy_at(curve, 30.0) == 0.7
    assert math.isnan(benchmark.accuracy_at(curve, 5.0))


def run(strategy, keep, seed, time_s, accuracies):
    step = time_s / len(accuracies)
    return {
        "dataset": "d", "strategy": strategy, "keep": keep, "label_noise": 0.0, "seed": seed,
        "test_accuracy": accuracies[-1], "train_time_s": time_s, "backprop_examples": 100,
        "curve": [[step * (i + 1), a] for i, a in enumerate(accuracies)], "curve_backprop_examples": [1, 2, 3],
    }  # fmt: skip


def test_equal_budget_table_uses_the_random_runs_median_time():
    rows = [
        run("random", 0.5, 0, 30.0, [0.5, 0.6, 0.7]),
        run("random", 0.5, 1, 40.0, [0.5, 0.6, 0.8]),
        run("gradmatch", 0.5, 0, 60.0, [0.55, 0.65, 0.75]),  # evaluations at 20, 40, 60 s
        run("gradmatch", 0.5, 1, 60.0, [0.45, 0.75, 0.85]),
        run("none", 1.0, 0, 90.0, [0.6, 0.7, 0.9]),  # evaluations at 30, 60, 90 s
    ]
    table = {r["strategy"]: r for r in benchmark.equal_budget_table(rows)}
    assert table["random"]["budget_s"] == 35.0
    assert table["random"]["mean"] == pytest.approx((0.7 + 0.6) / 2)  # 40 s run: 0.6 at 26.7 s, 0.8 at 40 s
    assert table["gradmatch"]["mean"] == pytest.approx((0.55 + 0.45) / 2)
    assert table["none"]["mean"] == pytest.approx(0.6) and table["none"]["runs"] == 1
    assert math.isnan(table["loss"]["mean"]) and table["loss"]["runs"] == 0


def test_report_writes_tables_and_plots(tmp_path):
    machine = {"cpu_model": "test", "device": "cpu"}
    rows = [run("random", 0.5, 0, 30.0, [0.5, 0.6, 0.7]), run("gradmatch", 0.5, 0, 60.0, [0.55, 0.65, 0.75]),
            run("none", 1.0, 0, 90.0, [0.6, 0.7, 0.9])]  # fmt: skip
    benchmark.write_json(str(tmp_path / "training.json"), machine, rows)
    overhead = [{"batch_size": 64, "seq_len": 64, "keep": 0.5, "device": "cpu", "forward_s": 0.5, "selection_s": 0.002}]
    benchmark.write_json(str(tmp_path / "overhead.json"), machine, overhead)
    (tmp_path / "summary.md").write_text("# My summary\n\nHand-written conclusions.")
    path = benchmark.write_report(str(tmp_path))
    text = open(path).read()
    assert text.startswith("# My summary")
    assert "| 64 | 64 | 0.5 | cpu | 500.0 | 2.00 | 0.40% |" in text
    assert "Accuracy at an equal wall-clock budget" in text
    for png in ("accuracy_vs_time.png", "accuracy_vs_backprop.png"):
        assert (tmp_path / png).stat().st_size > 1000
        assert f"![{png}]({png})" in text
    assert json.loads((tmp_path / "training.json").read_text())["machine"] == machine
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_benchmark_arguments_are_rejected_before_running():
    with pytest.raises(ValueError, match="keep=1.5"):
        benchmark.main(["training", "--keeps", "1.5"])
    with pytest.raises(ValueError, match="command='bogus'"):
        benchmark.main(["bogus"])
