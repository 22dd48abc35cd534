"""The reusable parts of ``scripts/run_glue.py``: data loading, column and metric choice, label noise.

The script follows transformers' ``examples/pytorch/text-classification/run_glue.py``: the same flags with the same
meanings, plus ``--label_noise``, ``--baseline_results`` and every ``SelectiveBackpropConfig`` field. This module
holds what tests and other scripts can reuse:

- the example's argument dataclasses are in :mod:`.arguments`;
- :func:`load_raw_datasets`: a GLUE task from the Hub, a bundled offline dataset (``tweets``, ``bbc-news``), any
  other ``datasets`` name or local folder, or local CSV/JSON files.
- :func:`text_columns`, :func:`label_info`: which columns are the text (``sentence1``/``sentence2``, else the first
  non-label columns) and whether the task is regression (float labels, or STS-B).
- :func:`metric_config_name`, :func:`load_metric`, :func:`make_compute_metrics`: the GLUE per-task metrics (accuracy;
  F1 for MRPC and QQP; Matthews correlation for CoLA; Pearson and Spearman for STS-B; macro-F1 for multi-class
  non-GLUE data) computed offline by the ``evaluate`` module shipped in :mod:`hf_sbp.glue.metric`.
- :func:`validate_label_noise`, :func:`apply_label_noise`: symmetric label noise on the training split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset

from .arguments import (
    GLUE_DATASET,
    LABEL_COLUMN,
    TASK_TO_KEYS,
    DataTrainingArguments,
    file_extension,
    validate_label_noise,
)
from .bundled import BUNDLED_DATASETS, add_symmetric_label_noise, load_bundled_dataset

FINISHED_RUN_FILES = (
    "all_results.json",
    "train_results.json",
    "model.safetensors",
    "pytorch_model.bin",
    "adapter_model.safetensors",
)
"""Files whose presence in ``--output_dir`` means that a run finished there."""


def check_output_dir(output_dir: str, do_train: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, to train into a folder that holds a finished run, unless told to."""
    if not do_train or overwrite or not os.path.isdir(output_dir):
        return
    found = [name for name in FINISHED_RUN_FILES if os.path.isfile(os.path.join(output_dir, name))]
    if found:
        raise ValueError(
            f"output_dir={output_dir!r} already holds a finished run ({', '.join(found)}); training again would "
            "replace its model and results. Pass --overwrite_output_dir to replace them, or choose another "
            "--output_dir."
        )


def load_raw_datasets(
    data_args: DataTrainingArguments, cache_dir: str | None = None, token: str | None = None, do_predict: bool = False
) -> DatasetDict:
    """The raw splits: a GLUE task from the Hub, a bundled dataset, another dataset name/folder, or local files."""
    if data_args.task_name is not None:
        return load_dataset(GLUE_DATASET, data_args.task_name, cache_dir=cache_dir, token=token)
    if data_args.dataset_name in BUNDLED_DATASETS:
        return load_bundled_dataset(data_args.dataset_name)
    if data_args.dataset_name is not None:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir, token=token)
    data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
    if do_predict:
        if data_args.test_file is None:
            raise ValueError("do_predict with local files needs --test_file (a csv or json file like --train_file).")
        data_files["test"] = data_args.test_file
    builder = "csv" if file_extension(data_args.train_file) == "csv" else "json"
    # One file at a time, so that an error names its file, and an unlabelled test file keeps its own columns.
    raw = DatasetDict()
    for split, path in data_files.items():
        _check_readable(split, path)
        try:
            raw[split] = load_dataset(builder, data_files={split: path}, cache_dir=cache_dir, token=token)[split]
        except Exception as error:  # datasets' own errors name neither the file nor the split
            raise ValueError(f"{split}_file={path!r} cannot be read as {builder.upper()}: {error}") from error
    for split, dataset in raw.items():
        if len(dataset) == 0:
            raise ValueError(f"{split}_file={data_files[split]!r} has no rows (only a header, or nothing).")
    return raw


def _check_readable(split: str, path: str) -> None:
    """A local data file must be non-empty UTF-8 text with at least one row: name the file otherwise."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{split}_file={path!r} is empty.")
    lines = 0
    try:
        with open(path, encoding="utf-8") as handle:
            lines = sum(1 for line in handle if line.strip())
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{split}_file={path!r} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8."
        ) from error
    if file_extension(path) == "csv" and lines < 2:
        raise ValueError(f"{split}_file={path!r} has no rows (only a header, or nothing).")


def validate_raw_datasets(raw: DatasetDict, text_keys: Sequence[str | None], is_regression: bool) -> DatasetDict:
    """Check every split's text and labels before anything is tokenised or trained, naming the split, the column,
    the row and the value: no missing or empty text; in the splits with labels, no missing label (``None`` or NaN),
    and no ``-1`` (GLUE's mark of a hidden test label) in the training split. A split other than the training split
    whose labels are all missing (an unlabelled test file) loses its label column, so it can be predicted on."""
    checked = {}
    for split, dataset in raw.items():
        for key in text_keys:
            if key is None or key not in dataset.column_names:
                continue
            for row, text in enumerate(dataset[key]):
                if text is None or (isinstance(text, str) and not text.strip()):
                    raise ValueError(
                        f"the {split!r} split has an empty text in column {key!r} at row {row} (value {text!r}); "
                        "every example needs its text: fill or drop that row."
                    )
        if LABEL_COLUMN in dataset.column_names:
            values = dataset[LABEL_COLUMN]
            missing = [row for row, value in enumerate(values) if value is None or value != value]
            if missing and len(missing) == len(values) and split != "train":
                dataset = dataset.remove_columns(LABEL_COLUMN)  # an unlabelled file: predict on it
            elif missing:
                raise ValueError(
                    f"the {split!r} split has {len(missing)} missing label(s) in column {LABEL_COLUMN!r} (the first at "
                    f"row {missing[0]}, value {values[missing[0]]!r}); every labelled example needs a label: fill or "
                    "drop those rows."
                )
            elif split == "train" and not is_regression and -1 in set(values):
                raise ValueError(
                    f"the 'train' split has label -1 at row {values.index(-1)}: -1 marks an unlabelled example (as "
                    "GLUE's hidden test labels), which cannot be trained on; drop such rows or give them a class."
                )
        elif split == "train":
            raise ValueError(
                f"the 'train' split has no {LABEL_COLUMN!r} column (its columns are {dataset.column_names}); the "
                "training data gives the labels."
            )
        checked[split] = dataset
    return DatasetDict(checked)


def check_max_seq_length(max_seq_length: int, tokenizer: Any, pairs: bool) -> None:
    """A sequence must hold the tokenizer's special tokens and at least one token of each text."""
    needed = tokenizer.num_special_tokens_to_add(pair=pairs) + (2 if pairs else 1)
    if max_seq_length < needed:
        kind = "sentence pairs" if pairs else "single sentences"
        raise ValueError(
            f"max_seq_length={max_seq_length} is too short for {kind}: this tokenizer adds "
            f"{needed - (2 if pairs else 1)} special tokens, so at least {needed} are needed."
        )


def text_columns(column_names: Sequence[str], task_name: str | None = None) -> tuple[str, str | None]:
    """The text column(s): the GLUE task's, else ``sentence1``/``sentence2`` if both exist, else the first two
    non-label columns, else the only non-label column (single sentences)."""
    if task_name is not None:
        return TASK_TO_KEYS[task_name]
    non_label = [name for name in column_names if name != LABEL_COLUMN]
    if "sentence1" in non_label and "sentence2" in non_label:
        return "sentence1", "sentence2"
    if len(non_label) >= 2:
        return non_label[0], non_label[1]
    if len(non_label) == 1:
        return non_label[0], None
    raise ValueError(f"the data has no text column: its columns are {list(column_names)}.")


@dataclass
class LabelInfo:
    """What the labels are: regression (``num_labels == 1``), or classes ``label_list`` with ``label_to_id`` the
    mapping from raw values to class ids (``None`` when the raw values already are the ids)."""

    is_regression: bool
    num_labels: int
    label_list: list[Any] | None = None
    label_to_id: dict[Any, int] | None = None

    @property
    def label_names(self) -> list[str] | None:
        return None if self.label_list is None else [str(label) for label in self.label_list]


def label_info(train: Dataset, task_name: str | None = None) -> LabelInfo:
    """Regression for STS-B and float labels; otherwise the classes, from a ``ClassLabel`` or the sorted unique
    values (as in transformers' ``run_glue.py``)."""
    if LABEL_COLUMN not in train.column_names:
        raise ValueError(f"the training data has no {LABEL_COLUMN!r} column: its columns are {train.column_names}.")
    feature = train.features[LABEL_COLUMN]
    if task_name is not None:
        if task_name == "stsb":
            return LabelInfo(is_regression=True, num_labels=1)
        names = list(feature.names)
        return LabelInfo(is_regression=False, num_labels=len(names), label_list=names)
    if isinstance(feature, ClassLabel):
        return LabelInfo(is_regression=False, num_labels=feature.num_classes, label_list=list(feature.names))
    if isinstance(feature, Value) and feature.dtype in ("float16", "float32", "float64"):
        return LabelInfo(is_regression=True, num_labels=1)
    labels = sorted(label for label in train.unique(LABEL_COLUMN) if label is not None)
    if len(labels) < 2:
        raise ValueError(f"the training labels have {len(labels)} distinct value(s) ({labels}); need at least 2.")
    return LabelInfo(
        is_regression=False,
        num_labels=len(labels),
        label_list=labels,
        label_to_id={label: i for i, label in enumerate(labels)},
    )


def encode_labels(raw_datasets: DatasetDict, label_to_id: dict[Any, int] | None) -> DatasetDict:
    """Every split's ``label`` column mapped through ``label_to_id`` to integer class ids (``-1``, GLUE's hidden test
    label, stays ``-1``). A label missing from the mapping raises ``ValueError`` naming it and the split."""
    if label_to_id is None:
        return raw_datasets
    encoded = {}
    for split, dataset in raw_datasets.items():
        if LABEL_COLUMN not in dataset.column_names:
            encoded[split] = dataset
            continue
        unknown = [label for label in dataset.unique(LABEL_COLUMN) if label not in label_to_id and label != -1]
        if unknown:
            raise ValueError(
                f"the {split!r} split has labels {sorted(map(str, unknown))[:10]} that the training split does not; "
                f"the classes are {sorted(map(str, label_to_id))}."
            )
        features = dataset.features.copy()
        features[LABEL_COLUMN] = Value("int64")
        encoded[split] = dataset.map(
            lambda batch: {LABEL_COLUMN: [-1 if label == -1 else label_to_id[label] for label in batch[LABEL_COLUMN]]},
            batched=True,
            features=features,
            desc=f"Encoding {split} labels",
        )
    return DatasetDict(encoded)


def metric_config_name(task_name: str | None, is_regression: bool, num_labels: int) -> str:
    """The offline GLUE metric's configuration: the GLUE task, else ``regression``, ``multiclass`` (more than two
    classes: accuracy and macro-F1) or ``accuracy``."""
    if task_name is not None:
        return task_name
    if is_regression:
        return "regression"
    return "multiclass" if num_labels > 2 else "accuracy"


def load_metric(task_name: str | None, is_regression: bool, num_labels: int, **kwargs):
    """The ``evaluate`` module for the task, loaded by path from :mod:`hf_sbp.glue.metric` (no Hub needed)."""
    from .metric import load_glue_offline

    return load_glue_offline(metric_config_name(task_name, is_regression, num_labels), **kwargs)


def make_compute_metrics(metric, is_regression: bool) -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for the ``Trainer``: argmax (or the squeezed score for regression), the metric, and
    ``combined_score`` (the mean) when the metric has several values, as in transformers' ``run_glue.py``."""

    def compute_metrics(prediction) -> dict[str, float]:
        predictions = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(predictions, axis=-1) if is_regression else np.argmax(predictions, axis=-1)
        result = metric.compute(predictions=predictions, references=prediction.label_ids)
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics


def first_rows(dataset: Dataset, count: int | None) -> Dataset:
    """The first ``count`` rows of ``dataset`` (all of them when ``count`` is ``None`` or larger)."""
    return dataset if count is None else dataset.select(range(min(len(dataset), count)))


def apply_label_noise(
    dataset: Dataset, rate: float, num_classes: int, seed: int, label_column: str = LABEL_COLUMN
) -> tuple[Dataset, int]:
    """``dataset`` with symmetric noise on its (integer class id) labels, and the number of labels flipped.

    Each label is flipped with probability ``rate`` to one of the other ``num_classes - 1`` classes, uniformly,
    with :func:`hf_sbp.glue.bundled.add_symmetric_label_noise` seeded by ``seed``. The column keeps its feature type.
    """
    validate_label_noise(rate)
    if rate == 0:
        return dataset, 0
    labels = np.asarray(dataset[label_column])
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"label noise needs integer class ids in {label_column!r}; got values of dtype {labels.dtype}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"label noise needs class ids in [0, {num_classes}); the labels range over "
            f"[{labels.min()}, {labels.max()}]."
        )
    noisy, flipped = add_symmetric_label_noise(labels, rate, num_classes, seed)
    feature = dataset.features[label_column]
    dataset = dataset.remove_columns(label_column).add_column(label_column, noisy.tolist())
    return dataset.cast_column(label_column, feature), flipped
