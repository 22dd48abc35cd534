#!/usr/bin/env python
"""Fine-tune a sequence classifier on GLUE or your own data with selective backprop.

transformers' ``examples/pytorch/text-classification/run_glue.py`` with ``SelectiveBackpropTrainer``: the same flags
with the same meanings, plus every ``SelectiveBackpropConfig`` field (``--sbp_strategy``, ``--sbp_keep``, ...),
``--label_noise RHO`` (symmetric noise on the training labels) and ``--baseline_results PATH`` (a random-strategy
run to compare with in the model card). Offline, it takes local folders and CSV/JSON files, the bundled datasets
``--dataset_name tweets`` / ``bbc-news`` and the bundled model ``--model_name_or_path all-MiniLM-L6-v2``::

    python scripts/run_glue.py --model_name_or_path all-MiniLM-L6-v2 --dataset_name tweets \\
        --do_train --do_eval --max_steps 60 --sbp_strategy gradmatch --sbp_keep 0.5 --label_noise 0.2 \\
        --output_dir outputs/tweets-gradmatch
    python scripts/run_glue.py config.yaml    # or config.json: the same arguments as a file

It saves ``train_results.json``, ``eval_results.json``, ``all_results.json``, ``predict_results_<task>.txt`` and
the model card ``README.md`` in ``--output_dir``; ``--push_to_hub`` uploads the model, tokenizer and card.
The reusable logic lives in :mod:`hf_sbp.glue.run_glue`, the argument dataclasses in :mod:`hf_sbp.glue.arguments`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import NamedTuple

import datasets
import numpy as np
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    PretrainedConfig,
    default_data_collator,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint

from hf_sbp import SelectiveBackpropConfig, SelectiveBackpropTrainer
from hf_sbp.glue.arguments import (
    GLUE_DATASET,
    LABEL_COLUMN,
    DataTrainingArguments,
    ModelArguments,
    RunArguments,
    validate_label_noise,
)
from hf_sbp.glue.bundled import BUNDLED_DATASETS, bundled_card_info
from hf_sbp.glue.run_glue import (
    LabelInfo,
    apply_label_noise,
    check_max_seq_length,
    check_output_dir,
    encode_labels,
    first_rows,
    label_info,
    load_metric,
    load_raw_datasets,
    make_compute_metrics,
    text_columns,
    validate_raw_datasets,
)
from hf_sbp.model_card import set_model_card_info

logger = logging.getLogger(__name__)


def parse_args(
    argv: list[str],
) -> tuple[ModelArguments, DataTrainingArguments, SelectiveBackpropConfig, RunArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, SelectiveBackpropConfig, RunArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(training_args: SelectiveBackpropConfig) -> None:
    """Logging as transformers' run_glue.py sets it up: to stdout, at the process's log level."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.info(f"Training/evaluation parameters {training_args}")


class TaskData(NamedTuple):
    """The raw splits and what was read off them: the labels, the split names and the text columns."""

    raw: datasets.DatasetDict
    labels: LabelInfo
    eval_split: str
    test_split: str
    sentence1_key: str
    sentence2_key: str | None


def load_task_data(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: SelectiveBackpropConfig
) -> TaskData:
    """The raw splits, checked: every bad value raises here, before a model is built or a file is written."""
    raw_datasets = load_raw_datasets(
        data_args, cache_dir=model_args.cache_dir, token=model_args.token, do_predict=training_args.do_predict
    )
    if "train" not in raw_datasets:
        raise ValueError(f"the data has no 'train' split (splits: {list(raw_datasets)}); it gives the labels.")
    if data_args.task_name is None:  # GLUE's own data is clean; local and other data are checked row by row
        text_keys = text_columns(raw_datasets["train"].column_names)
        feature = raw_datasets["train"].features.get(LABEL_COLUMN)
        is_float = getattr(feature, "dtype", None) in ("float16", "float32", "float64")
        raw_datasets = validate_raw_datasets(raw_datasets, text_keys, is_regression=is_float)
    labels = label_info(raw_datasets["train"], data_args.task_name)
    validate_label_noise(data_args.label_noise, labels.is_regression)
    eval_split = "validation_matched" if data_args.task_name == "mnli" else "validation"
    test_split = "test_matched" if data_args.task_name == "mnli" else "test"
    if training_args.do_eval and eval_split not in raw_datasets:
        raise ValueError(f"--do_eval requires a {eval_split!r} split; the data has {list(raw_datasets)}.")
    if training_args.do_predict and test_split not in raw_datasets:
        raise ValueError(f"--do_predict requires a {test_split!r} split; the data has {list(raw_datasets)}.")
    sentence1_key, sentence2_key = text_columns(raw_datasets["train"].column_names, data_args.task_name)
    for key in (sentence1_key, sentence2_key):
        if key is not None and key not in raw_datasets["train"].column_names:
            raise ValueError(
                f"the data has no text column {key!r}: its columns are {raw_datasets['train'].column_names}."
            )
    return TaskData(raw_datasets, labels, eval_split, test_split, sentence1_key, sentence2_key)


def load_model(model_args: ModelArguments, data_args: DataTrainingArguments, labels: LabelInfo):
    """``(tokenizer, model)``: the pretrained checkpoint with a head of ``labels.num_labels`` outputs."""
    model_path = model_args.resolved(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(
        model_args.resolved(model_args.config_name) or model_path,
        num_labels=labels.num_labels,
        finetuning_task=data_args.task_name,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.resolved(model_args.tokenizer_name) or model_path,
        cache_dir=model_args.cache_dir,
        use_fast=model_args.use_fast_tokenizer,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    return tokenizer, model


def align_label_ids(model, labels: LabelInfo, task_name: str | None) -> dict | None:
    """Set the model's ``label2id``/``id2label`` from the data's labels, in the order the model already uses where it
    names the same labels (as transformers' run_glue.py); returns the raw label -> class id map, if one is needed."""
    label_to_id = labels.label_to_id  # raw label value -> class id, when the raw values are not class ids
    if labels.is_regression:
        return label_to_id
    label2id = {name: i for i, name in enumerate(labels.label_names)}
    if label_to_id is not None:
        label2id = {str(label): i for label, i in label_to_id.items()}
    elif task_name is not None and model.config.label2id != PretrainedConfig(num_labels=labels.num_labels).label2id:
        label_name_to_id = {k.lower(): v for k, v in model.config.label2id.items()}
        if sorted(label_name_to_id) == sorted(labels.label_names):
            label_to_id = {i: int(label_name_to_id[name]) for i, name in enumerate(labels.label_names)}
            label2id = {name: label_to_id[i] for i, name in enumerate(labels.label_names)}
        else:
            logger.warning(
                "The model's labels do not match the dataset's: model labels "
                f"{sorted(label_name_to_id)}, dataset labels {sorted(labels.label_names)}; ignoring the model's."
            )
    model.config.label2id = label2id
    model.config.id2label = {i: name for name, i in label2id.items()}
    return label_to_id


def tokenize(
    task: TaskData, tokenizer, label_to_id: dict | None, data_args: DataTrainingArguments, training_args
) -> datasets.DatasetDict:
    """Every split with its labels as class ids and its text tokenized (truncated to ``max_seq_length``)."""
    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"max_seq_length={data_args.max_seq_length} is larger than the model's maximum length "
            f"({tokenizer.model_max_length}); using max_seq_length={tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    check_max_seq_length(max_seq_length, tokenizer, pairs=task.sentence2_key is not None)
    padding = "max_length" if data_args.pad_to_max_length else False
    first, second = task.sentence1_key, task.sentence2_key

    def preprocess_function(examples):
        texts = (examples[first],) if second is None else (examples[first], examples[second])
        return tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)

    with training_args.main_process_first(desc="dataset map pre-processing"):
        encoded = encode_labels(task.raw, label_to_id)
        return encoded.map(
            preprocess_function,
            batched=True,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )


def card_info(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args, label_noise_flipped: int | None
) -> dict:
    """What the model card should say that the trainer cannot know: the base model, the data, the noise, the
    baseline (keyword arguments of :func:`hf_sbp.model_card.set_model_card_info`)."""
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    card.update(bundled_card_info(model=model_args.model_name_or_path))
    if data_args.task_name is not None:
        card.update(
            language="en",
            dataset_tags=GLUE_DATASET,
            dataset_args=data_args.task_name,
            dataset=f"GLUE {data_args.task_name.upper()}",
        )
    elif data_args.dataset_name is not None:
        card["dataset"] = data_args.dataset_name
        card.update(bundled_card_info(dataset=data_args.dataset_name))
        if data_args.dataset_name not in BUNDLED_DATASETS and not os.path.isdir(data_args.dataset_name):
            card["dataset_tags"] = data_args.dataset_name
            if data_args.dataset_config_name is not None:
                card["dataset_args"] = data_args.dataset_config_name
    else:
        card["dataset"] = (
            "local files ("
            + ", ".join(os.path.basename(path) for path in (data_args.train_file, data_args.validation_file) if path)
            + ")"
        )
    if data_args.label_noise > 0 and training_args.do_train:
        card.update(label_noise=data_args.label_noise, label_noise_flipped=label_noise_flipped)
    if data_args.baseline_results is not None:
        card["baseline_results"] = data_args.baseline_results
    return card


def train(trainer, train_dataset, data_args: DataTrainingArguments, checkpoint, label_noise_flipped) -> dict:
    """Train (resuming from ``checkpoint`` if any), save the model, the state and the training metrics."""
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(train_result.metrics)
    metrics["train_samples"] = len(train_dataset)
    metrics["sbp_backprop_examples"] = trainer.sbp_backprop_examples
    if data_args.label_noise > 0:
        metrics["label_noise"] = data_args.label_noise
        metrics["label_noise_flipped"] = label_noise_flipped
    trainer.save_model()  # saves the tokenizer too
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def evaluate(trainer, eval_dataset, encoded, data_args: DataTrainingArguments) -> dict:
    """The validation metrics (MNLI: the matched and the mismatched split), logged and saved."""
    logger.info("*** Evaluate ***")
    tasks = [data_args.task_name]
    eval_datasets = [eval_dataset]
    if data_args.task_name == "mnli":
        tasks.append("mnli-mm")
        eval_datasets.append(first_rows(encoded["validation_mismatched"], data_args.max_eval_samples))
    combined: dict[str, float] = {}
    for dataset, task in zip(eval_datasets, tasks, strict=True):
        metrics = trainer.evaluate(eval_dataset=dataset)
        metrics["eval_samples"] = len(dataset)
        if task == "mnli-mm":
            metrics = {k + "_mm": v for k, v in metrics.items()}
        combined.update(metrics)
        trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", combined)
    return combined


def predict(trainer, predict_dataset, encoded, labels: LabelInfo, model, data_args, training_args) -> dict:
    """Predictions on the test split, written to ``predict_results_<task>.txt``; the metrics of a labelled one."""
    all_metrics: dict[str, float] = {}
    logger.info("*** Predict ***")
    tasks = [data_args.task_name]
    predict_datasets = [predict_dataset]
    if data_args.task_name == "mnli":
        tasks.append("mnli-mm")
        predict_datasets.append(encoded["test_mismatched"])
    for dataset, task in zip(predict_datasets, tasks, strict=True):
        # GLUE's test labels are -1 (hidden): drop them, as transformers' run_glue.py does. Local test files
        # with real labels also get their metrics, saved as predict_results.json.
        labelled = LABEL_COLUMN in dataset.column_names and -1 not in set(dataset.unique(LABEL_COLUMN))
        if not labelled and LABEL_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(LABEL_COLUMN)
        output = trainer.predict(dataset, metric_key_prefix="predict")
        predictions = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        predictions = np.squeeze(predictions, axis=-1) if labels.is_regression else np.argmax(predictions, axis=-1)
        if labelled and data_args.task_name is None:
            metrics = dict(output.metrics)
            metrics["predict_samples"] = len(dataset)
            trainer.log_metrics("predict", metrics)
            trainer.save_metrics("predict", metrics)
            all_metrics.update(metrics)
        output_predict_file = os.path.join(training_args.output_dir, f"predict_results_{task}.txt")
        if trainer.is_world_process_zero():
            with open(output_predict_file, "w", encoding="utf-8") as writer:
                logger.info(f"***** Predict results {task} *****")
                writer.write("index\tprediction\n")
                for index, item in enumerate(predictions):
                    if labels.is_regression:
                        writer.write(f"{index}\t{item:3.3f}\n")
                    else:
                        writer.write(f"{index}\t{model.config.id2label[int(item)]}\n")
    return all_metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args, run_args = parse_args(sys.argv[1:] if argv is None else argv)
    check_output_dir(training_args.output_dir, training_args.do_train, run_args.overwrite_output_dir)
    setup_logging(training_args)
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train and not run_args.overwrite_output_dir:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Checkpoint detected, resuming training at {last_checkpoint}.")
    set_seed(training_args.seed)

    task = load_task_data(model_args, data_args, training_args)
    labels = task.labels
    tokenizer, model = load_model(model_args, data_args, labels)
    label_to_id = align_label_ids(model, labels, data_args.task_name)
    encoded = tokenize(task, tokenizer, label_to_id, data_args, training_args)

    train_dataset = eval_dataset = predict_dataset = None
    label_noise_flipped = None
    if training_args.do_train:
        train_dataset = first_rows(encoded["train"], data_args.max_train_samples)
        if data_args.label_noise > 0:
            train_dataset, label_noise_flipped = apply_label_noise(
                train_dataset, data_args.label_noise, labels.num_labels, training_args.seed
            )
            logger.info(
                f"Label noise {data_args.label_noise}: flipped {label_noise_flipped} of {len(train_dataset)} training "
                f"labels (seed {training_args.seed})."
            )
    if training_args.do_eval:
        eval_dataset = first_rows(encoded[task.eval_split], data_args.max_eval_samples)
    if training_args.do_predict:
        predict_dataset = first_rows(encoded[task.test_split], data_args.max_predict_samples)

    metric = load_metric(data_args.task_name, labels.is_regression, labels.num_labels, cache_dir=model_args.cache_dir)
    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    elif training_args.fp16:
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    else:
        data_collator = None
    trainer = SelectiveBackpropTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=make_compute_metrics(metric, labels.is_regression),
        processing_class=tokenizer,
        data_collator=data_collator,
    )
    set_model_card_info(trainer, **card_info(model_args, data_args, training_args, label_noise_flipped))
    previous_state = os.path.join(training_args.output_dir, TRAINER_STATE_NAME)
    if not training_args.do_train and os.path.isfile(previous_state):
        # An evaluation-only run into a trained model's folder: keep that training's logs (and so the model card's
        # training statistics); its metrics are merged into all_results.json as they are saved.
        trainer.state = TrainerState.load_from_json(previous_state)

    all_metrics: dict[str, float] = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        all_metrics.update(train(trainer, train_dataset, data_args, checkpoint, label_noise_flipped))
    if training_args.do_eval:
        all_metrics.update(evaluate(trainer, eval_dataset, encoded, data_args))
    if training_args.do_predict:
        all_metrics.update(predict(trainer, predict_dataset, encoded, labels, model, data_args, training_args))

    results_file = os.path.join(training_args.output_dir, "all_results.json")
    if os.path.isfile(results_file):  # what save_metrics merged there, an earlier training run's metrics included
        with open(results_file, encoding="utf-8") as handle:
            all_metrics = {**json.load(handle), **all_metrics}
    set_model_card_info(trainer, results=all_metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    else:
        trainer.create_model_card()
    return all_metrics


if __name__ == "__main__":
    main()
