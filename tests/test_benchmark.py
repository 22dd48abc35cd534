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
from hf_sbp.benchmark import common, report, throughput
from hf_sbp.strategies import registered_strategies


@register_strategy("bench-test-first-rows")
class FirstRows(SelectionStrategy):
    """A user strategy defined outside the package: the first k rows."""

    def select(self, batch, k):
        return torch.arange(k), torch.ones(k)


def tiny_data_args(folder, train_rows: int, validation_rows: int) -> list[str]:
    """``scripts/benchmark.py`` arguments: a tiny random model and single-sentence CSV files, written to ``folder``."""
    from glue_fixtures import save_tiny_model, single_sentence_rows, write_rows

    model = save_tiny_model(str(folder / "model"))
    train = write_rows(str(folder / "train.csv"), single_sentence_rows(train_rows, seed=0))
    validation = write_rows(str(folder / "validation.csv"), single_sentence_rows(validation_rows, seed=1))
    return ["--model_name_or_path", model, "--train_file", train, "--validation_file", validation]


def test_report_writes_a_table_per_json_file(tmp_path):
    machine = {"cpu_model": "test", "device": "cpu"}
    overhead = [{"batch_size": 64, "seq_len": 64, "keep": 0.5, "device": "cpu", "forward_s": 0.5, "selection_s": 0.002}]
    common.write_json(str(tmp_path / "overhead.json"), machine, overhead)
    path = report.write_report(str(tmp_path))
    assert path == str(tmp_path / "report.md")
    text = open(path).read()
    assert text.startswith("# Benchmark tables")
    assert not (tmp_path / "summary.md").exists()  # no time-to-accuracy summary: no summary.md
    assert "| 64 | 64 | 0.5 | cpu | numba | 500.0 | 2.00 | 0.40% |" in text  # rows before omp_impl: the Numba loop
    assert "## Gradient match" not in text  # a part without its file has no section
    assert f"`overhead`: {json.dumps(machine)}" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_report_tables_strategies_that_are_not_built_in(tmp_path):
    # A registered user strategy and one whose module is not imported (a name only in the results).
    grad = [
        {"strategy": name, "keep": 0.5, "layer": "last", "step": 0, "rel_error": 0.25}
        for name in ("random", "bench-test-first-rows", "not-imported")
    ]
    common.write_json(str(tmp_path / "grad_match.json"), {}, grad)
    text = open(report.write_report(str(tmp_path))).read()
    assert "| classification | last | 0.5 | not-imported | 0.250 | 0.250 | - |" in text
    assert "| classification | last | 0.5 | bench-test-first-rows | 0.250 | 0.250 | - |" in text


def test_plot_colours_come_from_the_registry():
    from hf_sbp.benchmark import palette

    colors = palette.strategy_colors(["not-imported"])
    assert set(colors) == set(registered_strategies()) | {"not-imported"}
    assert colors["none"] == palette.FULL_BATCH_COLOR
    selective = [colors[name] for name in common.selective_strategies()] + [colors["not-imported"]]
    assert len(set(selective)) == len(selective) and palette.FULL_BATCH_COLOR not in selective
    # The built-in strategies keep the colours of the published plots.
    assert (colors["gradmatch"], colors["loss"], colors["random"]) == ("tab:green", "tab:orange", "tab:blue")


def test_strategies_default_to_every_registered_selective_strategy():
    bench = hf_sbp.benchmark.cli.parse_arguments(["throughput"])
    assert bench.strategy_names == list(common.selective_strategies())
    assert "none" not in bench.strategy_names and "bench-test-first-rows" in bench.strategy_names
    assert common.selective_strategies()[:3] == ("gradmatch", "loss", "random")
    bench = hf_sbp.benchmark.cli.parse_arguments(["throughput", "--strategies", "random, gradmatch,random"])
    assert bench.strategy_names == ["random", "gradmatch"]
    assert common.strategy_grid(bench.strategy_names, [0.5, 0.25]) == [
        ("none", 1.0), ("random", 0.5), ("gradmatch", 0.5), ("random", 0.25), ("gradmatch", 0.25),
    ]  # fmt: skip


def test_throughput_and_grad_match_measure_the_probe_variants_unless_strategies_are_named():
    bench = hf_sbp.benchmark.cli.parse_arguments(["grad-match"])
    variants = ["gradmatch[sbp_scoring_max_length=16]", "gradmatch[sbp_scoring_max_length=32]"]
    assert bench.probe_strategy_names == [*common.selective_strategies(), *variants]
    assert bench.strategy_names == list(common.selective_strategies())  # the padding and time-to-accuracy parts'
    bench = hf_sbp.benchmark.cli.parse_arguments(["throughput", "--strategies", "random"])
    assert bench.probe_strategy_names == ["random"]
    with pytest.raises(ValueError, match="--probe_variants names 'bogus'"):
        hf_sbp.benchmark.cli.parse_arguments(["throughput", "--probe_variants", "bogus[sbp_seed=1]"])


def test_grad_match_measures_a_shortened_scoring_pass_as_a_variant(tmp_path):
    """``gradmatch[sbp_scoring_max_length=L]`` in the grad-match part: with L at least the rows' width the subset is
    plain gradmatch's (same errors as its default weight mode), with L below it a subset of its own."""
    out = tmp_path / "out"
    hf_sbp.benchmark.main(
        ["grad-match", "--quick", *tiny_data_args(tmp_path, train_rows=64, validation_rows=32), "--output_dir",
         str(out), "--batch_size", "8", "--seq_len", "16", "--train_steps", "1", "--device", "cpu", "--strategies",
         "gradmatch,gradmatch[sbp_scoring_max_length=64],gradmatch[sbp_scoring_max_length=3]"]
    )  # fmt: skip
    rows = json.loads((out / "grad_match.json").read_text())["rows"]

    def errors(strategy, mode):
        found = {(r["task"], r["layer"], r["step"]): r["rel_errors"] for r in rows
                 if r["strategy"] == strategy and r["weight_normalization"] == mode}  # fmt: skip
        assert len(found) == 2 * 2 * 2  # tasks x layers x steps
        return [error for key in sorted(found) for error in found[key]]

    assert errors("gradmatch[sbp_scoring_max_length=64]", None) == pytest.approx(errors("gradmatch", "none"))
    assert errors("gradmatch[sbp_scoring_max_length=3]", None) != pytest.approx(errors("gradmatch", "none"))
    assert "| gradmatch[sbp_scoring_max_length=3] |" in (out / "report.md").read_text()


def test_bad_benchmark_arguments_are_rejected_before_running():
    with pytest.raises(ValueError, match="keep=1.5"):
        hf_sbp.benchmark.main(["throughput", "--keeps", "1.5"])
    with pytest.raises(ValueError, match="command='bogus'"):
        hf_sbp.benchmark.main(["bogus"])
    with pytest.raises(ValueError, match="--strategies names 'bogus', which is not a registered strategy"):
        hf_sbp.benchmark.main(["throughput", "--strategies", "random,bogus"])
    with pytest.raises(ValueError, match="'none', which selects no subset"):
        hf_sbp.benchmark.main(["throughput", "--strategies", "none"])
    with pytest.raises(ValueError, match="sbp_strategy_modules names 'no_such_module_xyz'"):
        hf_sbp.benchmark.main(["throughput", "--sbp_strategy_modules", "no_such_module_xyz"])


def test_strategy_modules_are_imported_so_that_their_strategies_can_be_named(tmp_path, monkeypatch):
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
    assert bench.strategy_modules == ["bench_user_strategies"]


def test_the_script_and_the_module_are_the_same_command():
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark.py")
    for command in ([sys.executable, script, "--help"], [sys.executable, "-m", "hf_sbp.benchmark", "-h"]):
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        assert "--strategies" in out and "every part, short" in out and "time-to-accuracy" in out  # cli.USAGE


# ---- grad-match: the measured gradient, the weight modes and the regression task ----------------------------------


def per_example_gradients(model, batch, loss_of):
    """Every example's gradient of its own loss, by autograd one row at a time (the reference)."""
    rows = []
    for i in range(batch["labels"].shape[0]):
        model.zero_grad(set_to_none=True)
        logits = model(
            input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
        ).logits
        loss_of(logits, batch["labels"][i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double())
    return torch.stack(rows)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_trained_gradient_is_the_weighted_subset_mean_of_per_example_gradients(task):
    from tiny_models import collated, tiny_bert, tiny_dataset

    from hf_sbp.benchmark import grad_match

    regression = task == "regression"
    model = tiny_bert(1 if regression else 3).eval()
    data = tiny_dataset(12, labels=[0.3 * i - 1.0 for i in range(12)] if regression else None)
    batch = collated(data, range(12))
    if regression:
        batch["labels"] = batch["labels"].float()

        def loss_of(logits, labels):
            return (logits.squeeze(-1) - labels) ** 2
    else:

        def loss_of(logits, labels):
            return torch.nn.functional.cross_entropy(logits, labels)

    reference = per_example_gradients(model, batch, lambda z, y: loss_of(z, y).sum())
    indices, weights = torch.tensor([1, 4, 7, 10]), torch.tensor([0.5, 2.0, 0.25, 3.0])
    grad_match.trained_gradient(model, batch, indices, weights, grad_match.PROBLEM_TYPES[task])
    # (1/m) sum_S w_i g_i: the weights are not normalised by their sum, so the magnitude counts.
    expected = (weights.double()[:, None] * reference[indices]).sum(0) / 4
    assert torch.allclose(grad_match.flat_grad(model), expected, rtol=1e-4, atol=1e-7)
    grad_match.trained_gradient(model, batch, torch.arange(12), torch.ones(12), grad_match.PROBLEM_TYPES[task])
    assert torch.allclose(grad_match.flat_grad(model), reference.mean(0), rtol=1e-4, atol=1e-7)


def test_relative_error_splits_into_cosine_and_norm_ratio():
    from hf_sbp.benchmark import grad_match

    target = torch.tensor([3.0, 4.0], dtype=torch.float64)
    out = grad_match.relative_error(2 * target, target)  # the right direction, twice the length
    assert out == pytest.approx({"rel_error": 1.0, "cosine": 1.0, "norm_ratio": 2.0})
    out = grad_match.relative_error(torch.tensor([-4.0, 3.0], dtype=torch.float64), target)
    assert out == pytest.approx({"rel_error": math.sqrt(2), "cosine": 0.0, "norm_ratio": 1.0})


@pytest.mark.parametrize("mode", ["subset_size", "none", "sum_constrained"])
def test_last_layer_error_of_each_weight_mode_is_the_logged_error(tmp_path, mode):
    """The trainer's Gram-matrix estimate of the trained gradient's error (``sbp/grad_match_error``) against the
    last layer's autograd gradient, as the benchmark measures it, for a regression model."""
    from tiny_models import collated, tiny_bert, tiny_dataset

    from hf_sbp.benchmark import grad_match

    model = tiny_bert(1, seed=1).eval()
    model.config.problem_type = "regression"
    data = tiny_dataset(16, labels=[1.0 + 0.2 * i for i in range(16)])
    batch = collated(data, range(16))
    batch["labels"] = batch["labels"].float()
    trainer = common.make_trainer(model, "gradmatch", 0.5, 16, "cpu", str(tmp_path), sbp_weight_normalization=mode)
    indices, weights = trainer.select_batch(model, batch)
    model.eval()
    head = ["classifier.weight", "classifier.bias"]
    grad_match.trained_gradient(model, batch, torch.arange(16), torch.ones(16), "regression")
    full = grad_match.flat_grad(model, head)
    grad_match.trained_gradient(model, batch, indices, weights, "regression")
    error = grad_match.relative_error(grad_match.flat_grad(model, head), full)["rel_error"]
    assert error == pytest.approx(trainer.last_selection.grad_match_error, rel=1e-3, abs=1e-5)
    # Only 'none' keeps OMP's magnitude; the other modes make the weights sum to the subset size.
    if mode != "none":
        assert float(weights.sum()) == pytest.approx(indices.numel(), rel=1e-5)


def test_measured_strategies_expand_gradmatch_into_its_weight_modes():
    from hf_sbp.benchmark import grad_match
    from hf_sbp.config import WEIGHT_NORMALIZATIONS

    pairs = grad_match.measured_strategies(["random", "gradmatch", "loss"])
    assert pairs == [("random", None), *[("gradmatch", m) for m in WEIGHT_NORMALIZATIONS], ("loss", None)]


def test_measured_strategies_leave_out_those_that_need_an_example_cache(monkeypatch):
    from hf_sbp.benchmark import grad_match

    # The held-out probe batches carry no dataset index, so a strategy that selects from cached statistics cannot run.
    monkeypatch.setattr(grad_match, "strategy_class", lambda name: type(name, (), {"uses_example_cache": "c" in name}))
    assert grad_match.measured_strategies(["random", "cached", "loss"]) == [("random", None), ("loss", None)]


def test_regression_data_has_a_continuous_target_from_class_and_length():
    from datasets import Dataset

    from hf_sbp.benchmark import grad_match

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (400,), generator=gen).tolist()
    classes = torch.randint(0, 3, (400,), generator=gen).tolist()
    split = Dataset.from_dict({"input_ids": [[5] * n for n in lengths], "labels": classes})
    data = object.__new__(common.Data)
    data.splits, data.num_labels, data.label_names = {"train": split, "validation": split}, 3, ["a", "b", "c"]
    out = grad_match.regression_data(data)
    assert out.num_labels == 1 and data.num_labels == 3  # a copy: the classification data is unchanged
    assert out.splits["train"].features["labels"].dtype == "float32"
    y = torch.tensor(out.splits["train"]["labels"], dtype=torch.float64)
    assert not torch.equal(y, torch.tensor(classes, dtype=torch.float64))
    # What is left after the class is the length term plus noise: correlated with the log length, zero-mean.
    rest = y - torch.tensor(classes, dtype=torch.float64)
    log_len = torch.log(torch.tensor(lengths, dtype=torch.float64))
    assert torch.corrcoef(torch.stack([rest, log_len]))[0, 1] > 0.8
    assert abs(float(rest.mean())) < 0.1
    assert torch.equal(y, torch.tensor(grad_match.regression_data(data).splits["train"]["labels"], dtype=torch.float64))


def test_report_shows_the_grad_match_tasks_and_weight_modes(tmp_path):
    def row(task, strategy, mode, step, errors):
        return {"task": task, "strategy": strategy, "weight_normalization": mode, "keep": 0.5, "layer": "full",
                "step": step, "rel_error": sum(errors) / len(errors), "rel_errors": errors}  # fmt: skip

    rows = [row("regression", "random", None, s, [0.4, 0.6]) for s in (0, 10)]
    rows += [
        row("regression", "gradmatch", m, s, [e, e]) for s in (0, 10) for m, e in (("none", 0.1), ("subset_size", 0.9))
    ]
    rows += [row("classification", "gradmatch", "none", 0, [0.2, 0.3, 0.7])]
    common.write_json(str(tmp_path / "grad_match.json"), {}, rows)
    text = open(report.write_report(str(tmp_path))).read()
    assert "| regression | full | 0.5 | gradmatch (subset_size) | 0.900 | 0.900 | 0.900 | 0.900 |" in text
    assert "| regression | full | 0.5 | gradmatch (none) | 0.100 | 0.100 | 0.100 | 0.100 |" in text
    assert "| regression | full | 0.5 | random | 0.500 | 0.500 | 0.500 | 0.500 |" in text
    assert "| classification | full | 0.5 | gradmatch (none) | 0.400 | - | 0.400 | 0.300 |" in text
    # The modes follow sbp_weight_normalization's order, beside the other strategies in registration order.
    assert text.index("gradmatch (subset_size)") < text.index("gradmatch (none)") < text.index("| random |")


def test_padding_part_quick_writes_its_rows(tmp_path):
    out = tmp_path / "out"
    hf_sbp.benchmark.main(
        ["padding", "--quick", *tiny_data_args(tmp_path, train_rows=64, validation_rows=32), "--output_dir", str(out),
         "--batch_size", "8", "--repeats", "2", "--train_steps", "2", "--device", "cpu"]
    )  # fmt: skip
    padding = json.loads((out / "padding.json").read_text())["rows"]
    assert [row["strategy"] for row in padding] == ["gradmatch", "loss", "random"]
    for row in padding:
        assert row["mean_pad_tokens_trimmed"] <= row["mean_pad_tokens_untrimmed"]
        assert row["mean_columns_trimmed"] <= row["mean_columns_untrimmed"] <= row["mean_batch_columns"]
        assert row["step_s_trimmed"] > 0 and row["step_s_untrimmed"] > 0 and row["full_step_s"] > 0
        assert "python scripts/benchmark.py padding --quick" in row["command"]


# ---- overhead: the timing helpers ------------------------------------------------------------------------------------


def test_overhead_reuses_the_scoring_pass_and_times_omp_without_changing_the_selection(tmp_path):
    from tiny_models import collated, tiny_bert, tiny_dataset

    from hf_sbp.benchmark import overhead

    model = tiny_bert(3).eval()
    data = tiny_dataset(24)
    batches = [collated(data, range(12)), collated(data, range(12, 24))]
    trainer = common.make_trainer(model, "gradmatch", 0.5, 12, "cpu", str(tmp_path))
    expected = [trainer.select_batch(model, batch) for batch in batches]
    calls, omp_times, scores = [], [], {}
    score_batch = trainer.score_batch
    trainer.score_batch = lambda m, inputs: calls.append(inputs) or score_batch(m, inputs)
    with overhead.reused_scoring(trainer, scores), overhead.timed_omp(omp_times):
        for _ in range(3):
            for batch, (indices, weights) in zip(batches, expected, strict=True):
                got = trainer.select_batch(model, batch)
                assert torch.equal(got[0], indices) and torch.equal(got[1], weights)
    assert len(calls) == 2, "one scoring pass per batch, then reused"
    assert len(omp_times) == 6 and all(t > 0 for t in omp_times)
    # Another keep's trainer shares the cache: no scoring pass at all, and its own selection.
    other = common.make_trainer(model, "gradmatch", 0.25, 12, "cpu", str(tmp_path))
    reference = other.select_batch(model, batches[0])
    other.score_batch = lambda m, inputs: calls.append(inputs) or score_batch(m, inputs)
    with overhead.reused_scoring(other, scores):
        got = other.select_batch(model, batches[0])
    assert len(calls) == 2 and torch.equal(got[0], reference[0]) and got[0].numel() == 3
    # Both patches are undone: the trainer's own scoring pass and gradmatch's omp_gram again.
    assert trainer.score_batch.__name__ == "<lambda>"
    from hf_sbp.core import omp
    from hf_sbp.strategies import gradmatch

    assert gradmatch.omp_gram is omp.omp_gram
    assert overhead.BATCH_SIZES[:3] == (16, 32, 64) and {1024, 2048} <= set(overhead.BATCH_SIZES)


def test_overhead_part_times_generalized_omp_beside_omp_at_large_batches(tmp_path, monkeypatch):
    from hf_sbp.benchmark import overhead

    # The quick run's batches are 16, 32 and 64 rows: call 32 rows "large" for the test.
    monkeypatch.setattr(overhead, "LARGE_BATCH", 32)
    out = tmp_path / "out"
    hf_sbp.benchmark.main(
        ["overhead", "--quick", *tiny_data_args(tmp_path, train_rows=160, validation_rows=32), "--output_dir", str(out),
         "--repeats", "2", "--keeps", "0.5", "--device", "cpu"]
    )  # fmt: skip
    rows = json.loads((out / "overhead.json").read_text())["rows"]
    assert [(row["batch_size"], row["omp_batch"]) for row in rows] == [(16, 1), (32, 1), (32, 8), (64, 1), (64, 8)]
    for row in rows:
        assert row["forward_s"] > 0 and row["selection_s"] > 0 and row["omp_s"] > 0 and row["keep"] == 0.5
        # The trainer's match error (test_last_layer_error_of_each_weight_mode_is_the_logged_error checks it against
        # autograd): OMP's first atom already beats the empty subset, whose error is 1.
        assert 0 <= row["grad_match_error"] < 1
    # Both variants of a batch size stand beside the same forwards.
    assert rows[1]["forward_s"] == rows[2]["forward_s"] and rows[3]["forward_s"] == rows[4]["forward_s"]
    report = (out / "report.md").read_text()
    assert "| 32 | 64 | 0.5 | cpu |" in report and report.count("| 8 |") == 2


def test_overhead_part_times_both_omp_loops_at_the_batch_sizes_asked(tmp_path):
    """``--omp_impls numba,torch``: a row per OMP loop (``omp_impl`` beside ``device``), beside the same forwards;
    ``--overhead_batch_sizes`` replaces the part's batch sizes (the GPU check asks for 64, 256 and 1024)."""
    out = tmp_path / "out"
    hf_sbp.benchmark.main(
        ["overhead", "--quick", *tiny_data_args(tmp_path, train_rows=96, validation_rows=16), "--output_dir", str(out),
         "--repeats", "2", "--keeps", "0.5", "--device", "cpu", "--omp_impls", "numba,torch",
         "--overhead_batch_sizes", "16,24"]
    )  # fmt: skip
    rows = json.loads((out / "overhead.json").read_text())["rows"]
    assert [(row["batch_size"], row["omp_impl"], row["device"]) for row in rows] == [
        (16, "numba", "cpu"), (16, "torch", "cpu"), (24, "numba", "cpu"), (24, "torch", "cpu")
    ]  # fmt: skip
    assert all(row["omp_s"] > 0 and row["selection_s"] > 0 for row in rows)
    assert rows[0]["forward_s"] == rows[1]["forward_s"] and rows[2]["forward_s"] == rows[3]["forward_s"]
    report = (out / "report.md").read_text()
    assert "| 16 | 64 | 0.5 | cpu | numba |" in report and "| 16 | 64 | 0.5 | cpu | torch |" in report
    with pytest.raises(ValueError, match="'jax' in --omp_impls is invalid"):
        hf_sbp.benchmark.cli.parse_arguments(["overhead", "--omp_impls", "numba,jax"])
    assert hf_sbp.benchmark.cli.parse_arguments(["overhead", "--device", "cpu"]).omp_impl_values == ["numba"]


def test_saved_activations_count_what_autograd_keeps_for_backward_once_without_parameters():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with throughput.SavedActivations(layer) as saved:
        y = layer(x)  # saves its input for the weight's gradient, and the weight (a parameter) for the input's
        (y * y).sum().backward()  # y saved twice by the product: one storage
    assert saved.bytes == x.nbytes + y.nbytes
    with throughput.SavedActivations(layer) as unsaved, torch.no_grad():
        layer(x)
    assert unsaved.bytes == 0


@pytest.mark.parametrize("strategy", ["random", "gradmatch"])
def test_a_half_subset_step_saves_about_half_the_full_steps_activations(tmp_path, strategy):
    from tiny_models import tiny_bert

    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(1, 100, (16, 12)),
        "attention_mask": torch.ones(16, 12, dtype=torch.long),  # every row as long: activations scale with rows
        "labels": torch.randint(0, 3, (16,)),
    }
    model = tiny_bert(3)
    saved = {}
    for name, keep in (("none", 1.0), (strategy, 0.5)):
        trainer = common.make_trainer(model, name, keep, 16, "cpu", str(tmp_path / name))
        saved[name] = throughput.saved_activations_mb(trainer, model, dict(batch))
    assert saved["none"] > 0
    assert saved[strategy] / saved["none"] == pytest.approx(0.5, abs=0.05)  # the scoring forward keeps nothing
