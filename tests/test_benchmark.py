"""The benchmark's report logic on synthetic results, its arguments and its strategy handling (the measurements
themselves are run by hand: ``python scripts/benchmark.py all --quick``)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import hf_sbp.benchmark
from hf_sbp import SelectionStrategy, register_strategy
from hf_sbp.benchmark import common, report, throughput, training
from hf_sbp.strategies import registered_strategies


@register_strategy("bench-test-first-rows")
class FirstRows(SelectionStrategy):
    """A user strategy defined outside the package: the first k rows."""

    def select(self, batch, k):
        return torch.arange(k), torch.ones(k)


def test_accuracy_at_takes_the_last_evaluation_within_the_budget():
    curve = [[10.0, 0.5], [20.0, 0.6], [30.0, 0.7]]
    assert training.accuracy_at(curve, 25.0) == 0.6
    assert training.accuracy_at(curve, 30.0) == 0.7
    assert math.isnan(training.accuracy_at(curve, 5.0))


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
        run("loss", 0.5, 0, 120.0, [0.6, 0.7, 0.9]),  # first evaluation at 40 s: none within the budget
    ]
    table = {r["strategy"]: r for r in training.equal_budget_table(rows)}
    assert list(table) == ["none", "gradmatch", "loss", "random"]  # registration order
    assert table["random"]["budget_s"] == 35.0
    assert table["random"]["mean"] == pytest.approx((0.7 + 0.6) / 2)  # 40 s run: 0.6 at 26.7 s, 0.8 at 40 s
    assert table["gradmatch"]["mean"] == pytest.approx((0.55 + 0.45) / 2)
    assert table["none"]["mean"] == pytest.approx(0.6) and table["none"]["runs"] == 1
    assert math.isnan(table["loss"]["mean"]) and table["loss"]["runs"] == 0


def test_equal_budget_table_needs_the_random_subset_and_lists_only_strategies_run():
    rows = [run("gradmatch", 0.5, 0, 60.0, [0.5, 0.6]), run("none", 1.0, 0, 90.0, [0.6, 0.7])]
    assert training.equal_budget_table(rows) == []
    rows.append(run("random", 0.5, 0, 30.0, [0.5, 0.6]))
    assert {r["strategy"] for r in training.equal_budget_table(rows)} == {"none", "gradmatch", "random"}


def test_report_writes_tables_and_plots(tmp_path):
    machine = {"cpu_model": "test", "device": "cpu"}
    rows = [run("random", 0.5, 0, 30.0, [0.5, 0.6, 0.7]), run("gradmatch", 0.5, 0, 60.0, [0.55, 0.65, 0.75]),
            run("none", 1.0, 0, 90.0, [0.6, 0.7, 0.9])]  # fmt: skip
    common.write_json(str(tmp_path / "training.json"), machine, rows)
    overhead = [{"batch_size": 64, "seq_len": 64, "keep": 0.5, "device": "cpu", "forward_s": 0.5, "selection_s": 0.002}]
    common.write_json(str(tmp_path / "overhead.json"), machine, overhead)
    (tmp_path / "summary.md").write_text("# My summary\n\nHand-written conclusions.")
    path = report.write_report(str(tmp_path))
    text = open(path).read()
    assert text.startswith("# My summary")
    assert "| 64 | 64 | 0.5 | cpu | 500.0 | 2.00 | 0.40% |" in text
    assert "Accuracy at an equal wall-clock budget" in text
    for png in ("accuracy_vs_time.png", "accuracy_vs_backprop.png"):
        assert (tmp_path / png).stat().st_size > 1000
        assert f"![{png}]({png})" in text
    assert json.loads((tmp_path / "training.json").read_text())["machine"] == machine
    assert not list(tmp_path.glob("*.tmp"))


def test_report_plots_strategies_that_are_not_built_in(tmp_path):
    # A registered user strategy and one whose module is not imported (a name only in the results).
    rows = [run(name, 0.5, 0, 30.0, [0.5, 0.6, 0.7]) for name in ("random", "bench-test-first-rows", "not-imported")]
    common.write_json(str(tmp_path / "training.json"), {}, rows)
    text = open(report.write_report(str(tmp_path))).read()
    assert "| d | 0.0 | 0.5 | 30.0 | not-imported | 0.7000 ± 0.0000 | 1 |" in text
    grad = [{"strategy": "not-imported", "keep": 0.5, "layer": "last", "step": 0, "rel_error": 0.25}]
    common.write_json(str(tmp_path / "grad_match.json"), {}, grad)
    assert "| last | 0.5 | not-imported | 0.250 |" in open(report.write_report(str(tmp_path))).read()


def test_plot_colours_come_from_the_registry():
    colors = report.strategy_colors(["not-imported"])
    assert set(colors) == set(registered_strategies()) | {"not-imported"}
    assert colors["none"] == report.FULL_BATCH_COLOR
    selective = [colors[name] for name in common.selective_strategies()] + [colors["not-imported"]]
    assert len(set(selective)) == len(selective) and report.FULL_BATCH_COLOR not in selective
    # The built-in strategies keep the colours of the published plots.
    assert (colors["gradmatch"], colors["loss"], colors["random"]) == ("tab:green", "tab:orange", "tab:blue")


def test_strategies_default_to_every_registered_selective_strategy():
    bench = hf_sbp.benchmark.cli.parse_arguments(["training"])
    assert bench.strategy_names == list(common.selective_strategies())
    assert "none" not in bench.strategy_names and "bench-test-first-rows" in bench.strategy_names
    assert common.selective_strategies()[:3] == ("gradmatch", "loss", "random")
    bench = hf_sbp.benchmark.cli.parse_arguments(["throughput", "--strategies", "random, gradmatch,random"])
    assert bench.strategy_names == ["random", "gradmatch"]
    assert common.strategy_grid(bench.strategy_names, [0.5, 0.25]) == [
        ("none", 1.0), ("random", 0.5), ("gradmatch", 0.5), ("random", 0.25), ("gradmatch", 0.25),
    ]  # fmt: skip


def test_bad_benchmark_arguments_are_rejected_before_running():
    with pytest.raises(ValueError, match="keep=1.5"):
        hf_sbp.benchmark.main(["training", "--keeps", "1.5"])
    with pytest.raises(ValueError, match="command='bogus'"):
        hf_sbp.benchmark.main(["bogus"])
    with pytest.raises(ValueError, match="--strategies names 'bogus', which is not a registered strategy"):
        hf_sbp.benchmark.main(["training", "--strategies", "random,bogus"])
    with pytest.raises(ValueError, match="'none', which selects no subset"):
        hf_sbp.benchmark.main(["training", "--strategies", "none"])
    with pytest.raises(ValueError, match="sbp_strategy_modules names 'no_such_module_xyz'"):
        hf_sbp.benchmark.main(["training", "--sbp_strategy_modules", "no_such_module_xyz"])


def test_strategy_modules_are_imported_and_passed_to_the_peak_memory_process(tmp_path, monkeypatch):
    (tmp_path / "bench_user_strategies.py").write_text(
        "import torch\nfrom hf_sbp import SelectionStrategy, register_strategy\n\n\n"
        "@register_strategy('bench-test-last-rows')\nclass LastRows(SelectionStrategy):\n"
        "    def select(self, batch, k):\n        return torch.arange(batch.n - k, batch.n), torch.ones(k)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bench = hf_sbp.benchmark.cli.parse_arguments(
        ["throughput", "--sbp_strategy_modules", "bench_user_strategies", "--strategies", "bench-test-last-rows"]
    )
    assert bench.strategy_names == ["bench-test-last-rows"]
    command = throughput.peak_memory_command(bench, "bench-test-last-rows", 0.5)
    assert command[1:4] == ["-m", "hf_sbp.benchmark", "_peak_memory"]
    assert command[command.index("--sbp_strategy_modules") + 1] == "bench_user_strategies"
    assert command[command.index("--memory_strategy") + 1] == "bench-test-last-rows"


def test_the_script_and_the_module_are_the_same_command():
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark.py")
    for command in ([sys.executable, script, "--help"], [sys.executable, "-m", "hf_sbp.benchmark", "-h"]):
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        assert "--strategies" in out and "about 15 minutes on 2 CPU cores" in out and "time-to-accuracy" in out
