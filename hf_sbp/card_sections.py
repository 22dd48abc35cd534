"""The sections of the model card (:mod:`hf_sbp.model_card` renders them into its template): the base model, task
and dataset, the results, the selection settings and statistics, the random-subset baseline, the hyperparameters and
the framework versions. Each takes what the run recorded and returns Markdown."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from . import selection_metrics as sm
from ._utils import format_number, is_number, markdown_table
from ._version import __version__
from .selection_metrics import selection_statistics
from .strategies import registered_strategies, strategy_class

PAPER = (
    'Balles, Archambeau and Zappella, "A Negative Result on Gradient Matching for Selective Backprop" (NeurIPS 2023 '
    "workshop \"I Can't Believe It's Not Better\")"
)
"""The paper behind gradient matching for selective backprop, as the card and the docs cite it."""

RANDOM_BASELINE_NOTE = (
    "Random subsets are the baseline to beat. A random subset of the same size is exactly a smaller batch: it needs "
    f"no scoring pass, so each of its steps is cheaper than a selective step. In {PAPER}, neither "
    "loss-based nor gradient-matching selection *consistently* beat training on a random subset of the same size; "
    "gradient matching did beat loss-based selection (clearly so under label noise) and matched the mean gradient "
    "better than a random subset. Compare against `--sbp_strategy random` on the same budget before concluding that "
    "selection helped here."
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SKIPPED_RESULT_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


def load_baseline_results(path: str) -> dict[str, Any]:
    """The metrics of a baseline run: ``path`` is its ``all_results.json`` or the folder holding it."""
    file = os.path.join(path, "all_results.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(
            f"baseline_results={path!r} is invalid; it must be the all_results.json of a run (or its output folder)."
        )
    try:
        with open(file, encoding="utf-8") as handle:
            results = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"baseline_results={path!r} is invalid; it is not readable JSON ({error}).") from error
    if not isinstance(results, dict) or not any(is_number(v) for v in results.values()):
        raise ValueError(f"baseline_results={path!r} is invalid; it must be a JSON object of metrics.")
    return results


def run_results(log_history: Sequence[Mapping[str, Any]], results: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's final metrics: the last training summary and evaluation logged, overlaid with ``results`` (e.g. the
    ``all_results.json`` that ``run_glue.py`` saves, which also holds the test metrics)."""
    merged: dict[str, Any] = {}
    for entry in log_history:
        if "train_runtime" in entry or "eval_loss" in entry or any(key.startswith("eval_") for key in entry):
            merged.update({key: value for key, value in entry.items() if key not in ("step", "epoch")})
    if results:
        merged.update(results)
    return merged


def _metric_rows(results: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    rows = []
    for prefix, split in (("eval_", "evaluation"), ("predict_", "test"), ("test_", "test")):
        for key, value in results.items():
            if not key.startswith(prefix) or not is_number(value) or key.endswith(_SKIPPED_RESULT_SUFFIXES):
                continue
            rows.append((split, key[len(prefix) :], value))
    return rows


def base_model_text(finetuned_from: str | None, config, description: str | None = None) -> tuple[str, str | None]:
    """``(display text, Hub id for the metadata or None)``; ``description``, when given, is the display text."""
    name = finetuned_from
    if name is None and config is not None:
        name = getattr(config, "_name_or_path", None) or None
    hub_id = name if name and not os.path.isdir(name) and _HUB_ID.match(name) else None
    if description is not None:
        return description, hub_id
    if not name:
        return "a randomly initialised model", None
    if os.path.isdir(name):
        return f"a local checkpoint (`{os.path.basename(os.path.normpath(name))}`)", None
    if hub_id is not None:
        return f"[{name}](https://huggingface.co/{name})", name
    return f"`{name}`", None


def task_text(config, tasks: Any) -> str:
    num_labels = getattr(config, "num_labels", None) if config is not None else None
    problem = getattr(config, "problem_type", None) if config is not None else None
    if num_labels == 1 or problem == "regression":
        return "regression (one score per text)"
    if num_labels:
        id2label = getattr(config, "id2label", None) or {}
        names = [str(id2label.get(i, i)) for i in range(num_labels)]
        shown = ", ".join(f"`{name}`" for name in names[:20]) + (", ..." if len(names) > 20 else "")
        kind = "multi-label classification" if problem == "multi_label_classification" else "classification"
        return f"{kind} into {num_labels} classes ({shown})"
    if tasks:
        return ", ".join([tasks] if isinstance(tasks, str) else list(tasks))
    return "an unknown task"


SETTING_TITLES = {
    "sbp_keep": "fraction of each batch backpropagated",
    "sbp_weight_normalization": "weight normalisation",
    "sbp_omp_ridge": "OMP ridge (relative to mean diag K)",
    "sbp_omp_nonnegative": "OMP non-negative weights",
    "sbp_omp_tol": "OMP tolerance",
    "sbp_omp_batch": "OMP atoms per step",
    "sbp_omp_impl": "OMP loop",
    "sbp_loss_variant": "loss-based rule",
    "sbp_loss_beta": "Jiang's beta",
    "sbp_loss_history_size": "Jiang's loss history",
    "sbp_loss_min_prob": "Jiang's p_min",
    "sbp_head_module": "head module",
    "sbp_diagnostic_scoring": "diagnostic scoring",
    "sbp_trim_padding": "padding columns trimmed from the subset",
    "sbp_scoring_max_length": "tokens per row in the scoring pass",
    "sbp_max_staleness": "cached statistics used while younger than (epochs)",
    "sbp_cache_projection_dim": "cached head inputs projected to (0: whole)",
    "sbp_prune_ratio": "chance an example with a below-mean loss is left out of an epoch",
    "sbp_prune_anneal": "last fraction of training not pruned",
}
"""Readable names of the ``sbp_*`` settings in the card; a setting without one is shown by its field name."""

# Shown in their own rows (or not at all: the modules only make a strategy's name importable).
_OWN_ROWS = ("sbp_strategy", "sbp_start", "sbp_end", "sbp_interrupt", "sbp_seed", "sbp_strategy_modules")


_TRAINER_SETTINGS = {
    "sbp_keep": lambda strategy: strategy.selective and not strategy.prunes_dataset,
    "sbp_trim_padding": lambda strategy: strategy.selective and not strategy.prunes_dataset,
    "sbp_scoring_max_length": lambda strategy: strategy.needs_scoring,
}
"""Settings the trainer applies for every strategy that selects (or scores), rather than ones strategies read."""


def _applies_to(setting: str) -> str:
    """The registered strategies that read ``setting`` (their ``settings`` declare it), or that the trainer applies
    it to."""
    applies = _TRAINER_SETTINGS.get(setting, lambda strategy: setting in strategy.settings)
    names = [name for name in registered_strategies() if applies(strategy_class(name))]
    return ", ".join(names) or "-"


def settings_section(
    args, seed: int, head_name: str | None, label_noise: Any, label_noise_flipped: Any, n_train: Any
) -> str:
    strategy = args.sbp_strategy
    per_batch = [name for name in registered_strategies() if _selects_within_batches(strategy_class(name))]
    selective = ", ".join(per_batch)
    interrupt = args.sbp_interrupt
    schedule = (
        f"selection active for training fractions [{format_number(args.sbp_start)}, {format_number(args.sbp_end)})"
    )
    schedule += f"; every {interrupt}-th step on the full batch" if interrupt else "; never interrupted"
    if not label_noise:
        noise = "none"
    else:
        noise = f"symmetric, rate {format_number(float(label_noise))}"
        if label_noise_flipped is not None:
            noise += f": {label_noise_flipped} training labels flipped"
            if is_number(n_train):
                noise += f" of {int(n_train)}"
        noise += " (seeded by `seed`; evaluation labels untouched)"
    shown = {"sbp_head_module": head_name or "auto", "sbp_loss_beta": args.sbp_effective_loss_beta}
    shown["sbp_keep"] = args.sbp_effective_keep
    rows = [
        ("strategy (`sbp_strategy`)", strategy, "all"),
        ("schedule (`sbp_start`, `sbp_end`, `sbp_interrupt`)", schedule, selective),
    ]
    for setting in (f.name for f in dataclasses.fields(args) if f.name.startswith("sbp_")):
        if setting in _OWN_ROWS:
            continue
        value = shown.get(setting, getattr(args, setting))
        applies = _applies_to(setting)
        rows.append((f"{SETTING_TITLES.get(setting, setting)} (`{setting}`)", value, applies))
    rows += [
        ("selection seed (`sbp_seed`)", args.sbp_seed if args.sbp_seed is not None else seed, "all"),
        ("label noise injected (`--label_noise`)", noise, "training data"),
    ]
    return markdown_table(["setting", "value", "applies to"], rows)


def how_trained(args) -> str:
    """The card's one-sentence account of what the strategy did to each batch."""
    strategy = strategy_class(args.sbp_strategy)
    if not strategy.selective:
        name = args.sbp_strategy
        return f"with `sbp_strategy {name}`, every training batch was backpropagated in full, as with `Trainer`."
    if strategy.prunes_dataset:
        return (
            f"`{args.sbp_strategy}` pruned the training set per epoch, from each example's loss as recorded by the "
            "last forward pass that saw it: every epoch before the last `sbp_prune_anneal` of training left out part "
            "of the examples (none in the first epoch, before any loss was recorded), and every row of each batch it "
            "visited was backpropagated, with the epoch's loss weights."
        )
    if strategy.uses_example_cache:
        return (
            "the rows of each training batch whose statistics, cached from the last forward pass that saw them, "
            f"were missing or older than `sbp_max_staleness` epochs were scored with a cheap forward pass without "
            "autograd (every row in the first epoch, none in a step whose rows were all fresh), and only a subset "
            f"of the batch chosen by `{args.sbp_strategy}` from all the rows' statistics was backpropagated."
        )
    if strategy.needs_scoring:
        return (
            "each training batch was scored with a cheap forward pass without autograd, and only a subset of it "
            f"chosen by `{args.sbp_strategy}` was backpropagated."
        )
    return (
        f"only a subset of each training batch, chosen by `{args.sbp_strategy}` without a scoring pass, was "
        "backpropagated."
    )


def _selects_within_batches(strategy: type) -> bool:
    return strategy.selective and not strategy.prunes_dataset


def _pruning_section(log_history: Sequence[Mapping[str, Any]]) -> str:
    """The epochs of a dataset-level strategy's run, from the entry each logged as it started."""
    epochs = [entry for entry in log_history if sm.EPOCH_EXAMPLES in entry and sm.EPOCH_PRUNED in entry]
    if not epochs:
        return ""
    rows = [
        (number, entry.get("step", "-"), entry[sm.EPOCH_EXAMPLES], entry[sm.EPOCH_PRUNED], entry[sm.PRUNED_FRACTION])
        for number, entry in enumerate(epochs, 1)
    ]
    visited = sum(int(entry[sm.EPOCH_EXAMPLES]) for entry in epochs)
    total = visited + sum(int(entry[sm.EPOCH_PRUNED]) for entry in epochs)
    return (
        f"\n\n**Dataset pruning.** The {len(epochs)} epochs planned to visit {visited} of the {total} examples an "
        f"unpruned run would visit ({format_number(1 - visited / total)} left out; a run that stops at `max_steps` "
        "may end part-way through its last epoch):\n\n"
        + markdown_table(["epoch", "started at step", "examples visited", "left out", "share left out"], rows)
    )


def statistics_section(args, log_history, backprop_examples: Any) -> str:
    if not strategy_class(args.sbp_strategy).selective:
        return "Selection was off (`sbp_strategy none`): every batch was backpropagated in full, as with `Trainer`."
    stats = selection_statistics(log_history)
    if stats["logged_intervals"] == 0:
        return "No training step was logged, so there are no selection statistics."
    error = stats["mean_grad_match_error"]
    rows = [
        ("mean fraction of each batch backpropagated", stats["mean_backprop_fraction"]),
        ("examples backpropagated (forward + backward)", backprop_examples),
        ("mean share of step time in the scoring forward", stats["mean_scoring_time_share"]),
        ("mean share of step time in other selection work", stats["mean_selection_time_share"]),
        ("mean share of step time selecting (scoring + selection)", stats["mean_selecting_time_share"]),
        (
            "mean gradient-match error (last layer)",
            error if error is not None else "not measured (random subsets without `sbp_diagnostic_scoring`)",
        ),
        ("selective steps", stats["selective_steps"]),
        ("steps that fell back to the full batch (non-finite scores)", stats["fallback_steps"]),
    ]
    table = markdown_table(["statistic", "value"], rows)
    if stats.get("whole_run"):
        scope = f"Over all {stats['logged_steps']} training steps of the run:"
    else:
        scope = (
            f"Over the {stats['logged_steps']} logged training steps ({stats['logged_intervals']} logging intervals, "
            "each weighted by its number of steps):"
        )
    return (
        scope + "\n\n" + table + "\n\nThe gradient-match error is the relative error "
        "of the subset's weighted last-layer gradient against the batch's mean gradient "
        "(`||sum_S w_i g_i / sum_S w_i - mean g|| / ||mean g||`)." + _pruning_section(log_history)
    )


def baseline_section(args, current: Mapping[str, Any], baseline_results: str | Mapping[str, Any] | None) -> str:
    if isinstance(baseline_results, (str, os.PathLike)):
        source: str | None = os.fspath(baseline_results)
        baseline = load_baseline_results(source)
    else:
        source, baseline = None, baseline_results
    text = RANDOM_BASELINE_NOTE
    if args.sbp_strategy == "random":
        text += "\n\nThis run *is* a random-subset run: use it as the baseline for selective runs."
    if not baseline:
        return text + "\n\nNo random-subset baseline run was given for this model, so none is compared here."
    keys = [
        key
        for key, value in baseline.items()
        if is_number(value)
        and is_number(current.get(key))
        and (key.startswith(("eval_", "predict_", "test_")) and not key.endswith(_SKIPPED_RESULT_SUFFIXES))
    ]
    keys += [
        key for key in ("train_loss", "train_runtime", "sbp_backprop_examples") if key in baseline and key in current
    ]
    rows = []
    for key in keys:
        mine, theirs = current[key], baseline[key]
        if not (is_number(mine) and is_number(theirs)):
            continue
        rows.append((key, mine, theirs, mine - theirs))
    where = f" (`{os.path.basename(source)}`)" if source else ""
    if not rows:
        return text + f"\n\nThe baseline run's results{where} share no metric with this run's."
    return (
        text
        + f"\n\nMeasured against the random-subset baseline run{where}:\n\n"
        + markdown_table(["metric", f"this run ({args.sbp_strategy})", "random baseline", "difference"], rows)
    )


def framework_versions() -> str:
    import datasets
    import torch
    import transformers

    lines = [f"- hf_sbp {__version__}", f"- Transformers {transformers.__version__}", f"- PyTorch {torch.__version__}"]
    lines.append(f"- Datasets {datasets.__version__}")
    for module in ("tokenizers", "evaluate"):
        try:
            lines.append(f"- {module.capitalize()} {__import__(module).__version__}")
        except ImportError:
            pass
    return "\n".join(lines)


def results_text(current: Mapping[str, Any], label_noise: float | None) -> str:
    """The results table (evaluation and test metrics) and the final training loss."""
    rows = _metric_rows(current)
    if rows:
        text = markdown_table(["split", "metric", "value"], rows)
    else:
        text = "No evaluation results were recorded for this run."
    if is_number(current.get("train_loss")):
        text += f"\n\nFinal training loss: {format_number(current['train_loss'])}"
        if label_noise:
            text += " (on the noisy training labels)"
        text += "."
    return text


def dataset_text(names: list[str], descriptions: Mapping[str, str] | None) -> str:
    if not names:
        return "an unknown dataset"
    described = dict(descriptions or {})
    return " and ".join(f"{name} ({described[name]})" if name in described else name for name in names)


def training_texts(trainer, sbp: Any, log_history: list) -> tuple[str, str]:
    """``(hyperparameters, evaluation during training)`` as ``transformers``' cards list them, plus the strategy."""
    from transformers.modelcard import extract_hyperparameters_from_trainer, make_markdown_table, parse_log_history

    hyperparameters = extract_hyperparameters_from_trainer(trainer)
    hyper_text = "\n".join(f"- {key}: {value}" for key, value in hyperparameters.items())
    hyper_text += f"\n- sbp_strategy: {sbp.sbp_strategy}\n- sbp_keep: {sbp.sbp_effective_keep}"
    _, eval_lines, _ = parse_log_history(log_history)
    training_results = make_markdown_table(eval_lines).strip() if eval_lines else "No evaluation during training."
    return hyper_text, training_results
