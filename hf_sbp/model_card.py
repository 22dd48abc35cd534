"""Model cards for models trained with :class:`~hf_sbp.SelectiveBackpropTrainer`.

``SelectiveBackpropTrainer.create_model_card()`` (and so ``push_to_hub()``) writes ``README.md`` into ``output_dir``,
rendered from the template ``model_cards/selective_backprop.md``, which installs as package data of
``hf_sbp.model_cards`` (declared in ``pyproject.toml``), so an installed ``hf_sbp`` finds it. It is a
``string.Template`` whose ``${...}`` fields are filled here; ``template=`` takes the path of your own.

The card holds: YAML metadata (``library_name``, ``base_model``, the tags ``hf_sbp`` and ``selective-backprop``,
datasets, metrics and a ``model-index``, built like ``transformers``' own cards), the base model, dataset and task, a
results table, the selection settings (strategy, keep, schedule, OMP and loss knobs, label noise injected), the
selection statistics over the run from ``trainer.state.log_history`` (mean fraction backpropagated, share of step
time spent selecting, mean gradient-match error), a note on the random-subset baseline with the measured comparison
when a baseline run's ``all_results.json`` is given, the training hyperparameters and the framework versions.

What the trainer cannot know (the label noise that was injected, the baseline, a readable dataset name, the final
metrics) is passed to ``create_model_card(...)`` as keyword arguments, or stored once on the trainer with
:func:`set_model_card_info`, so that the cards written by ``push_to_hub()`` during training carry it too.
"""

from __future__ import annotations

import importlib.resources
import os
import string
from collections.abc import Mapping
from typing import Any

import yaml

from .card_sections import (
    base_model_text,
    baseline_section,
    dataset_text,
    framework_versions,
    how_trained,
    results_text,
    run_results,
    settings_section,
    statistics_section,
    task_text,
    training_texts,
)

TEMPLATE_NAME = "selective_backprop.md"
CARD_INFO_ATTRIBUTE = "_hf_sbp_model_card_info"
MODEL_TAGS = ("hf_sbp", "selective-backprop")
"""The Hub tags of models trained with ``hf_sbp``: added to the model's ``model_tags`` and to every card."""


def template_path() -> str:
    """Path of the packaged model card template."""
    return str(importlib.resources.files("hf_sbp.model_cards").joinpath(TEMPLATE_NAME))


def set_model_card_info(trainer, **info: Any) -> None:
    """Remember keyword arguments for every later ``trainer.create_model_card()`` (explicit arguments win).

    Keys: those of :func:`render_model_card` (``dataset``, ``dataset_tags``, ``finetuned_from``, ``label_noise``,
    ``label_noise_flipped``, ``baseline_results``, ``results``, ...).
    """
    stored = dict(getattr(trainer, CARD_INFO_ATTRIBUTE, None) or {})
    stored.update(info)
    setattr(trainer, CARD_INFO_ATTRIBUTE, stored)


def model_card_info(trainer) -> dict[str, Any]:
    """What :func:`set_model_card_info` stored on ``trainer``."""
    return dict(getattr(trainer, CARD_INFO_ATTRIBUTE, None) or {})


# ---- formatting helpers ----------------------------------------------------------------------


# ---- what the run did --------------------------------------------------------------------------


def _listify(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _metadata(trainer, model, base_id: str | None, model_name: str, tags, tasks, **summary_args: Any) -> dict:
    """The card's YAML metadata. ``transformers``' summary gives it (model-index, metrics) as its own cards have it;
    the base model is set afterwards, so that building the summary never looks the checkpoint up on the Hub."""
    from transformers.modelcard import TrainingSummary

    all_tags = []
    for tag in [*_listify(tags), *(getattr(model, "model_tags", None) or []), *MODEL_TAGS, "generated_from_trainer"]:
        if tag not in all_tags:
            all_tags.append(tag)
    summary = TrainingSummary.from_trainer(
        trainer,
        tags=all_tags,
        model_name=model_name,
        finetuned_from="",
        tasks=tasks if tasks is not None else "text-classification",
        **summary_args,
    )
    summary.finetuned_from = base_id
    return summary.create_metadata()


def render_model_card(
    trainer,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
    *,
    base_model_description: str | None = None,
    dataset_descriptions: Mapping[str, str] | None = None,
    label_noise: float | None = None,
    label_noise_flipped: int | None = None,
    baseline_results: str | Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    template: str | None = None,
) -> str:
    """The model card of ``trainer``'s run as Markdown with YAML metadata.

    The first nine arguments mean what they mean for ``transformers.Trainer.create_model_card``. Besides:

    Args:
        base_model_description: how the card names the base model (Markdown), instead of ``finetuned_from``'s link:
            for example where a local copy of a Hub model comes from. The metadata's ``base_model`` stays
            ``finetuned_from`` when that is a Hub id.
        dataset_descriptions: text shown in parentheses after a dataset's name, by name (what a reader should know
            of a dataset that is not on the Hub: its source, size and splits).
        label_noise: the rate of symmetric noise injected into the training labels (``None`` or 0: none).
        label_noise_flipped: how many training labels it flipped.
        baseline_results: a random-strategy run's metrics, as a dict or the path of its ``all_results.json`` (or its
            folder), to compare against.
        results: this run's final metrics (e.g. ``all_results.json``'s content); by default the last training
            summary and evaluation in ``trainer.state.log_history``.
        template: path of a ``string.Template`` to render instead of the packaged one.
    """
    args = trainer.args
    sbp = getattr(trainer, "sbp_args", args)  # the sbp_* settings (args itself when it has them)
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    config = getattr(model, "config", None)
    log_history = list(trainer.state.log_history)

    base_text, base_id = base_model_text(finetuned_from, config, base_model_description)
    if model_name is None:
        model_name = os.path.basename(os.path.normpath(args.output_dir)) or "model"
    metadata = _metadata(
        trainer, model, base_id, model_name, language=language, license=license, tags=tags, tasks=tasks,
        dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
    )  # fmt: skip

    current = run_results(log_history, results)
    data_text = dataset_text(_listify(dataset) or _listify(dataset_tags), dataset_descriptions)
    hyper_text, training_results = training_texts(trainer, sbp, log_history)
    head_name = getattr(trainer, "head_name", None) or sbp.sbp_head_module
    backprop_examples = current.get("sbp_backprop_examples", getattr(trainer, "sbp_backprop_examples", None))
    fields = {
        "metadata": yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True),
        "model_name": model_name,
        "how_trained": how_trained(sbp),
        "base_model": base_text,
        "dataset": data_text,
        "task": task_text(config, tasks),
        "results": results_text(current, label_noise),
        "selection_settings": settings_section(
            sbp, args.seed, head_name, label_noise, label_noise_flipped, current.get("train_samples")
        ),
        "selection_statistics": statistics_section(sbp, log_history, backprop_examples),
        "baseline": baseline_section(sbp, current, baseline_results),
        "hyperparameters": hyper_text,
        "training_results": training_results,
        "framework_versions": framework_versions(),
    }
    with open(template or template_path(), encoding="utf-8") as handle:
        return string.Template(handle.read()).safe_substitute(fields)


def write_model_card(trainer, output_dir: str | None = None, **kwargs: Any) -> str:
    """Render the card (keyword arguments as :func:`render_model_card`, over those stored with
    :func:`set_model_card_info`) and write it as ``README.md`` in ``output_dir`` (default ``trainer.args.output_dir``).
    Tags of an existing ``README.md`` there are kept. Returns the file's path."""
    output_dir = output_dir or trainer.args.output_dir
    path = os.path.join(output_dir, "README.md")
    options = {**model_card_info(trainer), **{key: value for key, value in kwargs.items() if value is not None}}
    if os.path.isfile(path):
        try:
            from huggingface_hub import ModelCard

            existing = ModelCard.load(path).data.tags or []
        except Exception:  # an unreadable old card: write a fresh one
            existing = []
        tags = _listify(options.get("tags"))
        options["tags"] = tags + [tag for tag in existing if tag not in tags]
    card = render_model_card(trainer, **options)
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(card)
    return path


class ModelCardMixin:
    """``create_model_card`` for :class:`~hf_sbp.SelectiveBackpropTrainer` (and so for ``push_to_hub``)."""

    def create_model_card(
        self, language: str | None = None, license: str | None = None, tags: str | list[str] | None = None,
        model_name: str | None = None, finetuned_from: str | None = None, tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """Write ``README.md`` in ``output_dir``: the ``Trainer`` card's content plus the selection settings and
        statistics and the random-subset baseline, from the template ``model_cards/selective_backprop.md``. The
        arguments are ``transformers.Trainer.create_model_card``'s plus ``label_noise``, ``label_noise_flipped``,
        ``baseline_results``, ``results`` and ``template`` (see :func:`hf_sbp.model_card.render_model_card`); values
        stored with :func:`hf_sbp.model_card.set_model_card_info` fill in the ones not given."""
        if not self.is_world_process_zero():
            return
        write_model_card(
            self, language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
            tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args, **kwargs,
        )  # fmt: skip
