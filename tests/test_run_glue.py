"""scripts/run_glue.py and hf_sbp.glue.run_glue: local CSV data (single sentences, pairs, regression), label noise,
offline metrics checked against scikit-learn/SciPy, config files, and bad values failing before any output is
written."""

from __future__ import annotations

import csv
import json
import os

import datasets
import numpy as np
import pytest
import torch
import transformers
import yaml
from datasets import ClassLabel, Dataset, Features, Value
from glue_fixtures import (
    load_run_glue,
    pair_rows,
    regression_rows,
    save_tiny_model,
    single_sentence_rows,
    tiny_training_flags,
    write_rows,
)
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from hf_sbp.glue import arguments as glue_arguments
from hf_sbp.glue import run_glue as glue
from hf_sbp.glue.metric import GLUE_OFFLINE_PATH, load_glue_offline

STEPS, BATCH, KEEP = 4, 8, 0.5


@pytest.fixture(scope="module")
def run_glue():
    return load_run_glue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(autouse=True)
def _restore_logging():
    # The script raises transformers' and datasets' verbosity to info, as transformers' example does.
    yield
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()


def _read_predictions(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [int(row["index"]) for row in rows] == list(range(len(rows)))
    return [row["prediction"] for row in rows]


def _json(path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _expected_flips(n: int, rate: float, seed: int) -> int:
    # The documented rule: each label flips when a uniform draw of numpy's default_rng(seed) falls below rate.
    return int((np.random.default_rng(seed).random(n) < rate).sum())


def _common_flags(model_dir: str, tmp_path, train: str, val: str, test: str | None = None) -> list[str]:
    flags = ["--model_name_or_path", model_dir, "--train_file", train, "--validation_file", val]
    if test is not None:
        flags += ["--test_file", test, "--do_predict"]
    flags += ["--do_train", "--do_eval", "--max_steps", str(STEPS), "--cache_dir", str(tmp_path / "cache")]
    return flags + tiny_training_flags(str(tmp_path / "out"))


# ---- end to end ------------------------------------------------------------------------------


def test_single_sentences_gradmatch_with_label_noise(run_glue, model_dir, tmp_path):
    train_rows = single_sentence_rows(64, seed=0)
    val_rows = single_sentence_rows(40, seed=1)
    train = write_rows(str(tmp_path / "train.csv"), train_rows)
    val = write_rows(str(tmp_path / "val.csv"), val_rows)
    flags = _common_flags(model_dir, tmp_path, train, val, test=val)
    flags += ["--sbp_strategy", "gradmatch", "--sbp_keep", str(KEEP), "--label_noise", "0.2"]
    run_glue.main(flags)

    out = tmp_path / "out"
    for name in ("train_results.json", "eval_results.json", "all_results.json", "predict_results_None.txt"):
        assert (out / name).is_file(), name
    train_results, all_results = _json(out / "train_results.json"), _json(out / "all_results.json")
    assert train_results["label_noise"] == 0.2
    assert train_results["label_noise_flipped"] == _expected_flips(64, 0.2, seed=7)
    assert all_results["label_noise_flipped"] == train_results["label_noise_flipped"]
    assert train_results["train_samples"] == 64
    # keep 0.5 of each batch of 8: 4 rows forward + backward per step.
    assert train_results["sbp_backprop_examples"] == STEPS * round(KEEP * BATCH)
    state = _json(out / "trainer_state.json")
    fractions = [entry["sbp/backprop_fraction"] for entry in state["log_history"] if "sbp/backprop_fraction" in entry]
    assert fractions and all(f == pytest.approx(KEEP) for f in fractions)

    # Binary non-GLUE data: accuracy only, equal to scikit-learn's on the saved predictions. The test file is the
    # validation file, so the evaluation and the prediction metrics agree too.
    predictions = _read_predictions(str(out / "predict_results_None.txt"))
    references = [row["label"] for row in val_rows]
    expected = accuracy_score(references, predictions)
    eval_results = _json(out / "eval_results.json")
    assert eval_results["eval_accuracy"] == pytest.approx(expected)
    assert all_results["predict_accuracy"] == pytest.approx(expected)
    assert "eval_f1" not in eval_results and "eval_macro_f1" not in eval_results
    # The model's label names are the data's, in sorted order.
    config = _json(out / "config.json")
    assert config["id2label"] == {"0": "negative", "1": "positive"}

    card = (out / "README.md").read_text()
    assert "hf_sbp" in card and "selective-backprop" in card
    assert f"{train_results['label_noise_flipped']} training labels flipped of 64" in card


def test_infobatch_for_a_number_of_epochs_from_the_command_line(run_glue, model_dir, tmp_path):
    """The script's own flags drive a dataset-level strategy: whole epochs, fewer steps than an unpruned run, the
    pruning in the results and the card."""
    train = write_rows(str(tmp_path / "train.csv"), single_sentence_rows(64, seed=0))
    val = write_rows(str(tmp_path / "val.csv"), single_sentence_rows(40, seed=1))
    flags = [f for f in _common_flags(model_dir, tmp_path, train, val) if f not in ("--max_steps", str(STEPS))]
    run_glue.main([*flags, "--num_train_epochs", "3", "--sbp_strategy", "infobatch", "--sbp_prune_ratio", "0.6"])
    out = tmp_path / "out"
    results = _json(out / "train_results.json")
    state = _json(out / "trainer_state.json")
    epochs = [entry for entry in state["log_history"] if "sbp/epoch_examples" in entry]
    assert len(epochs) == 3 and state["epoch"] == pytest.approx(3.0)
    assert state["global_step"] == sum(-(-entry["sbp/epoch_examples"] // BATCH) for entry in epochs) < 3 * 64 // BATCH
    assert results["sbp_backprop_examples"] == sum(entry["sbp/epoch_examples"] for entry in epochs)
    assert 0 < results["train_sbp/pruned_fraction"] < 0.6
    card = (out / "README.md").read_text()
    assert "`infobatch` pruned the training set per epoch" in card and "**Dataset pruning.**" in card


def test_sentence_pairs_multiclass_macro_f1(run_glue, model_dir, tmp_path):
    train = write_rows(str(tmp_path / "train.csv"), pair_rows(64, seed=2))
    val_rows = pair_rows(40, seed=3)
    val = write_rows(str(tmp_path / "val.csv"), val_rows)
    flags = _common_flags(model_dir, tmp_path, train, val, test=val)
    flags += ["--sbp_strategy", "gradmatch", "--sbp_keep", str(KEEP), "--label_noise", "0.2", "--seed", "11"]
    run_glue.main(flags)

    out = tmp_path / "out"
    results = _json(out / "all_results.json")
    assert results["label_noise_flipped"] == _expected_flips(64, 0.2, seed=11)
    predictions = [int(p) for p in _read_predictions(str(out / "predict_results_None.txt"))]
    references = [row["label"] for row in val_rows]
    assert results["eval_accuracy"] == pytest.approx(accuracy_score(references, predictions))
    assert results["eval_macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro"))
    assert results["eval_combined_score"] == pytest.approx((results["eval_accuracy"] + results["eval_macro_f1"]) / 2)


def test_regression_from_a_yaml_config(run_glue, model_dir, tmp_path):
    train = write_rows(str(tmp_path / "train.csv"), regression_rows(64, seed=4))
    val_rows = regression_rows(40, seed=5)
    val = write_rows(str(tmp_path / "val.csv"), val_rows)
    config = {
        "model_name_or_path": model_dir,
        "train_file": train,
        "validation_file": val,
        "test_file": val,
        "do_train": True,
        "do_eval": True,
        "do_predict": True,
        "max_steps": STEPS,
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": BATCH,
        "max_seq_length": 16,
        "learning_rate": 5e-3,
        "logging_steps": 2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "sbp_strategy": "gradmatch",
        "sbp_keep": KEEP,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_glue.main([str(path)])

    out = tmp_path / "out"
    results = _json(out / "all_results.json")
    assert len(_json(out / "config.json")["id2label"]) == 1  # one output: regression
    assert "label_noise_flipped" not in results
    # Independent predictions: the saved model and tokenizer, loaded and run here on the validation pairs.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    encoded = tokenizer(
        [row["sentence1"] for row in val_rows],
        [row["sentence2"] for row in val_rows],
        padding=True,
        truncation=True,
        max_length=16,
        return_tensors="pt",
    )
    with torch.no_grad():
        predictions = model(**encoded).logits.squeeze(-1).double().numpy()
    references = np.array([row["label"] for row in val_rows])
    assert results["eval_pearson"] == pytest.approx(pearsonr(predictions, references)[0], abs=1e-4)
    # After 4 steps the predictions spread over about 4e-5 with gaps down to 1e-7, so the round-off of another
    # batching (padding) swaps a few ranks: Spearman's correlation is only reproducible to about 1e-3 here.
    assert results["eval_spearmanr"] == pytest.approx(spearmanr(predictions, references)[0], abs=1e-2)
    assert results["eval_mse"] == pytest.approx(np.mean((predictions - references) ** 2), rel=1e-4)
    # The prediction file holds the same scores, to 3 decimals.
    written = np.array([float(p) for p in _read_predictions(str(out / "predict_results_None.txt"))])
    np.testing.assert_allclose(written, predictions, atol=6e-4)
    assert results["train_samples"] == 64


# ---- bad values: raise before training and write nothing ------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--label_noise", "1.5"], "label_noise=1.5"),
        (["--label_noise", "-0.1"], "label_noise=-0.1"),
        (["--label_noise", "nan"], "label_noise=nan"),
        (["--sbp_keep", "0"], "sbp_keep=0"),
        (["--sbp_start", "0.9", "--sbp_end", "0.5"], "sbp_start=0.9"),
        (["--max_train_samples", "0"], "max_train_samples=0"),
        (["--max_seq_length", "0"], "max_seq_length=0"),
        (["--task_name", "glue-nope"], "task_name='glue-nope'"),
        (["--baseline_results", "no/such/all_results.json"], "baseline_results='no/such/all_results.json'"),
    ],
)
def test_bad_values_raise_before_anything_is_written(run_glue, model_dir, tmp_path, extra, message):
    train = write_rows(str(tmp_path / "train.csv"), single_sentence_rows(16, seed=0))
    val = write_rows(str(tmp_path / "val.csv"), single_sentence_rows(8, seed=1))
    with pytest.raises(ValueError) as raised:
        run_glue.main(_common_flags(model_dir, tmp_path, train, val) + extra)
    assert message in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_bad_choice_and_bad_file_are_rejected(run_glue, model_dir, tmp_path):
    train = write_rows(str(tmp_path / "train.csv"), single_sentence_rows(16, seed=0))
    val = write_rows(str(tmp_path / "val.csv"), single_sentence_rows(8, seed=1))
    # Any registered strategy is valid, so the arguments (not argparse's fixed choices) reject the rest, naming them.
    with pytest.raises(
        ValueError, match=r"sbp_strategy='smart' is not a registered strategy; choose one of \[.*'gradmatch'"
    ):
        run_glue.main(_common_flags(model_dir, tmp_path, train, val) + ["--sbp_strategy", "smart"])
    text = tmp_path / "train.txt"
    text.write_text("x")
    flags = _common_flags(model_dir, tmp_path, str(text), val)
    with pytest.raises(ValueError, match="train_file=.*train.txt.*csv or a .json"):
        run_glue.main(flags)
    assert not (tmp_path / "out").exists()


def test_label_noise_on_regression_is_an_error(run_glue, model_dir, tmp_path):
    train = write_rows(str(tmp_path / "train.csv"), regression_rows(16, seed=0))
    val = write_rows(str(tmp_path / "val.csv"), regression_rows(8, seed=1))
    with pytest.raises(ValueError, match=r"label_noise=0.2 is invalid for a regression task"):
        run_glue.main(_common_flags(model_dir, tmp_path, train, val) + ["--label_noise", "0.2"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="regression"):
        glue_arguments.DataTrainingArguments(task_name="stsb", label_noise=0.1)


def test_json_config_parses_like_flags(run_glue, tmp_path):
    train = write_rows(str(tmp_path / "train.csv"), single_sentence_rows(8, seed=0))
    path = tmp_path / "args.json"
    path.write_text(
        json.dumps(
            {
                "model_name_or_path": "all-MiniLM-L6-v2",
                "train_file": train,
                "validation_file": train,
                "output_dir": str(tmp_path / "o"),
                "sbp_strategy": "loss",
                "sbp_keep": 0.25,
                "label_noise": 0.3,
            }
        )
    )
    model_args, data_args, training_args, _ = run_glue.parse_args([str(path)])
    assert (training_args.sbp_strategy, training_args.sbp_keep, data_args.label_noise) == ("loss", 0.25, 0.3)
    from hf_sbp.glue.bundled import bundled_model_path

    assert model_args.resolved(model_args.model_name_or_path) == bundled_model_path()
    # Every SelectiveBackpropConfig field is a flag.
    flags = run_glue.parse_args(["--model_name_or_path", "m", "--dataset_name", "tweets", "--sbp_omp_ridge", "0.1"])
    assert flags[2].sbp_omp_ridge == 0.1 and flags[1].dataset_name == "tweets"


# ---- the library pieces ------------------------------------------------------------------------


def test_text_columns():
    assert glue.text_columns(["sentence1", "x", "sentence2", "label"]) == ("sentence1", "sentence2")
    assert glue.text_columns(["question", "answer", "label"]) == ("question", "answer")
    assert glue.text_columns(["label", "text"]) == ("text", None)
    assert glue.text_columns(["idx", "text"], task_name="qnli") == ("question", "sentence")
    with pytest.raises(ValueError, match="no text column"):
        glue.text_columns(["label"])


def test_label_info_and_metric_choice():
    floats = Dataset.from_dict({"text": ["a", "b"], "label": [0.5, 3.0]})
    info = glue.label_info(floats)
    assert info.is_regression and info.num_labels == 1
    strings = Dataset.from_dict({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]})
    info = glue.label_info(strings)
    assert (info.num_labels, info.label_list, info.label_to_id) == (2, ["neg", "pos"], {"neg": 0, "pos": 1})
    named = Dataset.from_dict(
        {"text": ["a"], "label": [2]},
        features=Features({"text": Value("string"), "label": ClassLabel(names=list("xyz"))}),
    )
    info = glue.label_info(named)
    assert (info.num_labels, info.label_list, info.label_to_id) == (3, ["x", "y", "z"], None)
    assert glue.metric_config_name("mrpc", False, 2) == "mrpc"
    assert glue.metric_config_name("stsb", True, 1) == "stsb"
    assert glue.metric_config_name(None, False, 2) == "accuracy"
    assert glue.metric_config_name(None, False, 5) == "multiclass"
    assert glue.metric_config_name(None, True, 1) == "regression"


def test_offline_metrics_match_sklearn_and_scipy():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: nothing may come from the Hub
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    assert load_glue_offline("mrpc").compute(predictions=p, references=y) == pytest.approx(
        {"accuracy": accuracy_score(y, p), "f1": f1_score(y, p)}
    )
    assert load_glue_offline("qqp").compute(predictions=p, references=y)["f1"] == pytest.approx(f1_score(y, p))
    assert load_glue_offline("cola").compute(predictions=p, references=y) == pytest.approx(
        {"matthews_correlation": matthews_corrcoef(y, p)}
    )
    for task in ("sst2", "rte", "qnli", "wnli", "mnli"):
        assert load_glue_offline(task).compute(predictions=p, references=y) == pytest.approx(
            {"accuracy": accuracy_score(y, p)}
        )
    y3, p3 = rng.integers(0, 4, 80), rng.integers(0, 4, 80)
    assert load_glue_offline("multiclass").compute(predictions=p3, references=y3) == pytest.approx(
        {"accuracy": accuracy_score(y3, p3), "macro_f1": f1_score(y3, p3, average="macro")}
    )
    s, t = rng.normal(size=50).astype(np.float32), rng.normal(size=50).astype(np.float32)
    assert load_glue_offline("stsb").compute(predictions=s, references=t) == pytest.approx(
        {"pearson": pearsonr(s, t)[0], "spearmanr": spearmanr(s, t)[0]}, abs=1e-6
    )
    import evaluate  # by path, keeping evaluate's interface, with a config name

    metric = evaluate.load(GLUE_OFFLINE_PATH, "regression")
    metric.add_batch(predictions=s[:20], references=t[:20])
    metric.add_batch(predictions=s[20:], references=t[20:])
    assert metric.compute()["mse"] == pytest.approx(float(np.mean((s.astype(float) - t.astype(float)) ** 2)), rel=1e-5)
    with pytest.raises(KeyError, match="bogus"):
        load_glue_offline("bogus")


def test_apply_label_noise_flips_to_other_classes_and_keeps_the_feature():
    features = Features({"text": Value("string"), "label": ClassLabel(names=["a", "b", "c"])})
    labels = [i % 3 for i in range(300)]
    data = Dataset.from_dict({"text": ["t"] * 300, "label": labels}, features=features)
    noisy, flipped = glue.apply_label_noise(data, 0.3, num_classes=3, seed=5)
    new = np.array(noisy["label"])
    changed = new != np.array(labels)
    assert flipped == int(changed.sum()) == _expected_flips(300, 0.3, seed=5)
    assert set(new.tolist()) <= {0, 1, 2}
    assert noisy.features["label"] == features["label"]
    same, none = glue.apply_label_noise(data, 0.0, num_classes=3, seed=5)
    assert none == 0 and same["label"] == labels


def test_encode_labels_rejects_unseen_classes():
    raw = datasets.DatasetDict(
        {
            "train": Dataset.from_dict({"text": ["a", "b"], "label": ["neg", "pos"]}),
            "validation": Dataset.from_dict({"text": ["c"], "label": ["meh"]}),
        }
    )
    with pytest.raises(ValueError, match="'validation' split has labels \\['meh'\\]"):
        glue.encode_labels(raw, {"neg": 0, "pos": 1})
    encoded = glue.encode_labels(datasets.DatasetDict({"train": raw["train"]}), {"neg": 0, "pos": 1})
    assert encoded["train"]["label"] == [0, 1] and encoded["train"].features["label"] == Value("int64")


def test_bundled_dataset_name_loads_offline():
    args = glue_arguments.DataTrainingArguments(dataset_name="bbc-news")
    data = glue.load_raw_datasets(args)
    assert set(data) == {"train", "validation", "test"}
    assert glue.text_columns(data["train"].column_names) == ("text", None)
    info = glue.label_info(data["train"])
    assert info.num_labels == 5 and not info.is_regression
    assert glue.metric_config_name(None, info.is_regression, info.num_labels) == "multiclass"
    with pytest.raises(ValueError, match="dataset_config_name='x'"):
        glue_arguments.DataTrainingArguments(dataset_name="tweets", dataset_config_name="x")


# ---- reused output folders: nothing overwritten or mixed ------------------------------------------


def _snapshot(folder) -> dict[str, float]:
    return {
        os.path.relpath(os.path.join(root, name), folder): os.path.getmtime(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    }


def _folder_flags(model_dir, tmp_path, strategy: str, *extra: str) -> list[str]:
    train = write_rows(str(tmp_path / "train.csv"), single_sentence_rows(32, seed=0))
    val = write_rows(str(tmp_path / "val.csv"), single_sentence_rows(16, seed=1))
    return _common_flags(model_dir, tmp_path, train, val) + ["--sbp_strategy", strategy, *extra]


def test_a_finished_run_is_not_replaced_without_overwrite_output_dir(run_glue, model_dir, tmp_path):
    run_glue.main(_folder_flags(model_dir, tmp_path, "random"))
    before = _snapshot(tmp_path / "out")
    with pytest.raises(ValueError, match=r"output_dir=.*out' already holds a finished run \(all_results.json"):
        run_glue.main(_folder_flags(model_dir, tmp_path, "gradmatch"))
    assert _snapshot(tmp_path / "out") == before  # nothing written
    run_glue.main(_folder_flags(model_dir, tmp_path, "gradmatch", "--overwrite_output_dir"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| strategy (`sbp_strategy`) | gradmatch | all |" in card


def test_a_checkpoint_of_other_selection_settings_is_not_resumed(run_glue, model_dir, tmp_path):
    flags = _folder_flags(model_dir, tmp_path, "gradmatch", "--save_strategy", "steps", "--save_steps", "2")
    run_glue.main(flags)
    for name in ("all_results.json", "train_results.json", "eval_results.json", "model.safetensors"):
        os.remove(tmp_path / "out" / name)  # an interrupted run: checkpoints only
    before = _snapshot(tmp_path / "out")
    expected = r"checkpoint-4 was written with other selection settings \(sbp_strategy='gradmatch' there, 'random' now"
    with pytest.raises(ValueError, match=expected):  # auto-resume
        run_glue.main(_folder_flags(model_dir, tmp_path, "random"))
    with pytest.raises(ValueError, match=r"sbp_keep=0.5 there, 0.25 now"):  # an explicit --resume_from_checkpoint
        run_glue.main(
            _folder_flags(model_dir, tmp_path, "gradmatch", "--sbp_keep", "0.25", "--resume_from_checkpoint",
                          str(tmp_path / "out" / "checkpoint-4"))
        )  # fmt: skip
    assert _snapshot(tmp_path / "out") == before


def test_an_evaluation_only_run_keeps_the_cards_training_statistics(run_glue, model_dir, tmp_path):
    run_glue.main(_folder_flags(model_dir, tmp_path, "gradmatch"))
    trained = (tmp_path / "out" / "README.md").read_text()
    statistics = trained.split("### Selection statistics over the run")[1].split("##")[0]
    assert "examples backpropagated" in statistics
    train, val = str(tmp_path / "train.csv"), str(tmp_path / "val.csv")
    flags = ["--model_name_or_path", str(tmp_path / "out"), "--train_file", train, "--validation_file", val]
    flags += ["--do_eval"]
    flags += tiny_training_flags(str(tmp_path / "out"))
    run_glue.main(flags + ["--sbp_strategy", "gradmatch"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.split("### Selection statistics over the run")[1].split("##")[0] == statistics
    results = _json(tmp_path / "out" / "all_results.json")
    assert "train_loss" in results and "eval_accuracy" in results


# ---- bad data files: an error naming the file or split, the column, the row and the value; nothing written ----


def _bad_data_run(run_glue, model_dir, tmp_path, train_rows=None, val_rows=None, *extra, train_text=None):
    train_path, val_path = str(tmp_path / "train.csv"), str(tmp_path / "val.csv")
    if train_text is not None:
        with open(train_path, "wb") as handle:
            handle.write(train_text)
    else:
        write_rows(train_path, train_rows or pair_rows(24, seed=0))
    write_rows(val_path, val_rows or pair_rows(8, seed=1))
    run_glue.main(_common_flags(model_dir, tmp_path, train_path, val_path) + list(extra))


@pytest.mark.parametrize(
    "cell, expected",
    [
        ("", r"the 'train' split has 1 missing label\(s\) in column 'label' \(the first at row 3"),
        ("nan", r"the 'train' split has 1 missing label\(s\) in column 'label' \(the first at row 3"),
        (-1, r"the 'train' split has label -1 at row 3: -1 marks an unlabelled example"),
    ],
)
def test_bad_label_cells_are_refused_before_training(run_glue, model_dir, tmp_path, cell, expected):
    rows = pair_rows(24, seed=0)
    rows[3]["label"] = cell
    with pytest.raises(ValueError, match=expected):
        _bad_data_run(run_glue, model_dir, tmp_path, rows)
    assert not (tmp_path / "out").exists()


def test_an_empty_text_cell_is_named(run_glue, model_dir, tmp_path):
    rows = pair_rows(24, seed=0)
    rows[5]["sentence2"] = ""
    with pytest.raises(ValueError, match=r"the 'train' split has an empty text in column 'sentence2' at row 5"):
        _bad_data_run(run_glue, model_dir, tmp_path, rows)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", r"train_file='.*train.csv' is empty"),
        (b"sentence1,sentence2,label\n", r"train_file='.*train.csv' has no rows"),
        ("sentence1,sentence2,label\ncaf\xe9 a,b c,1\n".encode("latin-1"), r"train_file=.*is not UTF-8 text"),
    ],
)
def test_unreadable_files_are_named(run_glue, model_dir, tmp_path, content, expected):
    with pytest.raises(ValueError, match=expected):
        _bad_data_run(run_glue, model_dir, tmp_path, None, None, train_text=content)
    assert not (tmp_path / "out").exists()


def test_a_training_file_without_the_label_column_is_named(run_glue, model_dir, tmp_path):
    rows = [{"sentence1": r["sentence1"], "sentence2": r["sentence2"]} for r in pair_rows(24, seed=0)]
    with pytest.raises(ValueError, match=r"'train'|train_file"):
        _bad_data_run(run_glue, model_dir, tmp_path, rows)
    assert not (tmp_path / "out").exists()


def test_max_seq_length_too_short_for_pairs(run_glue, model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"max_seq_length=1 is too short for sentence pairs: .* at least 5 are needed"):
        _bad_data_run(run_glue, model_dir, tmp_path, None, None, "--max_seq_length", "1")
    assert not (tmp_path / "out").exists()


def test_predicting_on_an_unlabelled_test_file(run_glue, model_dir, tmp_path):
    test_rows = [{"sentence1": r["sentence1"], "sentence2": r["sentence2"]} for r in pair_rows(10, seed=2)]
    train = write_rows(str(tmp_path / "train.csv"), pair_rows(24, seed=0))
    val = write_rows(str(tmp_path / "val.csv"), pair_rows(8, seed=1))
    test = write_rows(str(tmp_path / "test.csv"), test_rows)
    run_glue.main(_common_flags(model_dir, tmp_path, train, val, test))
    predictions = _read_predictions(str(tmp_path / "out" / "predict_results_None.txt"))
    assert len(predictions) == 10 and set(predictions) <= {"0", "1", "2"}
    assert not (tmp_path / "out" / "predict_results.json").exists()  # no labels, so no metrics
