"""The argument dataclasses of ``scripts/run_glue.py`` (:class:`ModelArguments`, :class:`DataTrainingArguments`,
:class:`RunArguments`), with transformers' run_glue.py's flags and meanings plus ``--label_noise`` and
``--baseline_results``: every bad value raises ``ValueError`` at parse time, naming the value and what is valid."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .._utils import check_int_at_least, is_int_at_least, is_number
from ..card_sections import load_baseline_results
from .bundled import BUNDLED_DATASETS, resolve_model_name

TASK_TO_KEYS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
"""The nine GLUE tasks and their text columns."""

GLUE_DATASET = "nyu-mll/glue"
"""The Hub dataset that ``--task_name`` loads."""

DATA_FILE_EXTENSIONS = ("csv", "json")
LABEL_COLUMN = "label"


def _check_positive_int(name: str, value: Any) -> None:
    if value is not None and not is_int_at_least(value, 1):
        raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 1 or unset.")


def file_extension(path: str) -> str:
    """The lower-case extension of ``path``'s file name (``""`` without one)."""
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def validate_label_noise(rate: Any, is_regression: bool = False) -> None:
    """Raise ``ValueError`` unless ``rate`` is a valid ``--label_noise`` for the task."""
    if not is_number(rate) or not (0.0 <= rate <= 1.0):
        raise ValueError(
            f"label_noise={rate!r} is invalid; it must be a number in [0, 1] (the probability of flipping each "
            "training label to another class)."
        )
    if is_regression and rate > 0:
        raise ValueError(
            f"label_noise={rate!r} is invalid for a regression task (float labels, e.g. STS-B): symmetric label noise "
            "flips class labels. Use label_noise=0 for regression."
        )


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune from (as in transformers' ``run_glue.py``)."""

    model_name_or_path: str = field(
        metadata={
            "help": "Path to a pretrained model, a model identifier from huggingface.co/models, or "
            "'all-MiniLM-L6-v2' for the bundled offline checkpoint."
        }
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Pretrained config name or path if not the same as model_name."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Pretrained tokenizer name or path if not the same as model_name."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where to store the pretrained models and datasets downloaded from huggingface.co."},
    )
    use_fast_tokenizer: bool = field(
        default=True,
        metadata={"help": "Whether to use one of the fast tokenizers (backed by the tokenizers library) or not."},
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "The specific model version to use (can be a branch name, tag name or commit id)."},
    )
    token: str | None = field(
        default=None,
        metadata={
            "help": "The token to use as HTTP bearer authorization for remote files. If not specified, the token "
            "saved by `hf auth login` is used."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Whether to allow custom models defined on the Hub in their own modeling files. Only set it for "
            "repositories you trust and whose code you have read: it executes that code on your machine."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Enable loading a pretrained model whose head dimensions are different."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.model_name_or_path, str) or not self.model_name_or_path.strip():
            raise ValueError(
                f"model_name_or_path={self.model_name_or_path!r} is invalid; give a local model folder, a Hub model "
                "id or 'all-MiniLM-L6-v2'."
            )

    def resolved(self, name: str | None) -> str | None:
        """``name`` with a bundled model's short name replaced by its local folder."""
        return None if name is None else resolve_model_name(name)


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on (as in transformers' ``run_glue.py``), plus label noise and a baseline."""

    task_name: str | None = field(
        default=None,
        metadata={"help": "The name of the GLUE task to train on (from the Hub): " + ", ".join(TASK_TO_KEYS)},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "The name of the dataset to use (via the datasets library, or a local folder). The bundled "
            f"offline datasets {list(BUNDLED_DATASETS)} use their fixed train/validation/test splits."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    max_seq_length: int = field(
        default=128,
        metadata={
            "help": "The maximum total input sequence length after tokenization. Sequences longer than this will be "
            "truncated, sequences shorter will be padded."
        },
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Overwrite the cached preprocessed datasets or not."}
    )
    pad_to_max_length: bool = field(
        default=True,
        metadata={
            "help": "Whether to pad all samples to `max_seq_length`. If False, will pad the samples dynamically when "
            "batching to the maximum length in the batch."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Truncate the number of training examples to this value if set (debugging, quick runs)."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Truncate the number of evaluation examples to this value if set (debugging, quick runs)."},
    )
    max_predict_samples: int | None = field(
        default=None,
        metadata={"help": "Truncate the number of prediction examples to this value if set (debugging, quick runs)."},
    )
    train_file: str | None = field(
        default=None, metadata={"help": "A csv or a json file containing the training data."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "A csv or a json file containing the validation data."}
    )
    test_file: str | None = field(default=None, metadata={"help": "A csv or a json file containing the test data."})
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Symmetric label noise RHO in [0, 1] on the training labels only: each training label is flipped, "
            "with probability RHO, to one of the other classes uniformly, seeded by --seed. The number flipped is "
            "logged and saved in train_results.json. Classification only."
        },
    )
    baseline_results: str | None = field(
        default=None,
        metadata={
            "help": "all_results.json (or its folder) of a run with --sbp_strategy random on the same data and "
            "budget; the model card then compares this run against that random-subset baseline."
        },
    )

    def __post_init__(self) -> None:
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(
                    f"task_name={self.task_name!r} is not a GLUE task; choose one of {list(TASK_TO_KEYS)}."
                )
        elif self.dataset_name is not None:
            if self.dataset_name in BUNDLED_DATASETS and self.dataset_config_name is not None:
                raise ValueError(
                    f"dataset_config_name={self.dataset_config_name!r} is invalid for the bundled dataset "
                    f"{self.dataset_name!r}, which has no configurations; leave it unset."
                )
        elif self.train_file is None or self.validation_file is None:
            raise ValueError(
                "Need either a GLUE task (--task_name), a dataset (--dataset_name), or both --train_file and "
                f"--validation_file; got train_file={self.train_file!r}, validation_file={self.validation_file!r}."
            )
        else:
            extension = file_extension(self.train_file)
            if extension not in DATA_FILE_EXTENSIONS:
                raise ValueError(f"train_file={self.train_file!r} is invalid; it must be a .csv or a .json file.")
            for name in ("train_file", "validation_file", "test_file"):
                path = getattr(self, name)
                if path is None:
                    continue
                if file_extension(path) != extension:
                    raise ValueError(
                        f"{name}={path!r} is invalid; it must have the same extension (.{extension}) as train_file."
                    )
                if not os.path.isfile(path):
                    raise ValueError(f"{name}={path!r} is invalid; no such file.")
        check_int_at_least("max_seq_length", self.max_seq_length, 1)
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            _check_positive_int(name, getattr(self, name))
        validate_label_noise(self.label_noise, is_regression=self.task_name == "stsb")
        if self.baseline_results is not None:
            load_baseline_results(self.baseline_results)


@dataclass
class RunArguments:
    """What the script may do to ``--output_dir``."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a finished run's model and results in --output_dir, and ignore its checkpoints "
            "(transformers 5 dropped this flag from TrainingArguments; the script keeps it). Without it, a training "
            "run into a folder that holds a finished run stops before anything is written."
        },
    )
