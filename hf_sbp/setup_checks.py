"""The trainer's checks: what selection cannot serve is refused when the trainer is built, not at the first step.

:func:`check_setup` runs once in ``SelectiveBackpropTrainer.__init__``: the model's config and head, a
``compute_loss`` override, the training set's label column, and a probe of the first training examples through the
first step's checks, the model's own loss against the per-example losses included. :func:`check_training_set` runs
when ``train()`` starts, so that a trainer built for evaluation needs no training set.
:func:`batch_labels` and :func:`batch_problem_type` are the per-batch checks the trainer runs at every step.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .epoch_pruning import check_trainer_hooks
from .example_cache import check_indexable
from .head import HEAD_OVERRIDE_OPTION, HeadNotFoundError, head_candidates, named_head, no_grad_outputs
from .selection import infer_problem_type
from .subset_loss import example_losses, verify_model_loss

if TYPE_CHECKING:
    from .trainer import SelectiveBackpropTrainer

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("labels", "label", "label_ids")


def model_config(model: torch.nn.Module, strategy: str):
    """The model's ``config``, which selection needs for ``num_labels``; a clear error without one."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_labels", None) is None:
        raise ValueError(
            f"sbp_strategy={strategy!r} needs a model with a `config.num_labels` (a transformers "
            "*ForSequenceClassification model); use sbp_strategy='none' for other models."
        )
    return config


def batch_labels(inputs: Mapping[str, Any], key: str = "labels") -> torch.Tensor:
    """The batch's labels (under ``key``, the trainer's first ``label_names``), one row per example; a clear error
    when the collator returned none."""
    if inputs.get(key) is None:
        raise ValueError(
            f"the batch has no {key!r} (its keys are {sorted(inputs)}); selective backprop selects rows by their "
            "labels' rows and scores them by their loss, so the collator must return labels (see label_names)."
        )
    labels = inputs[key]
    if labels.dim() == 0 or labels.shape[0] == 0:
        raise ValueError(f"the batch's labels have shape {tuple(labels.shape)}; expected one row per example.")
    return labels


def batch_problem_type(config, labels: torch.Tensor, label_smoothing: float) -> str:
    """The loss family of the batch (the rule of ``transformers``' sequence classifiers), checked for what the
    per-example loss cannot serve: labels of the wrong shape, class ids outside ``[0, num_labels)`` (the ignore
    index included), and label smoothing outside single-label classification."""
    problem_type = infer_problem_type(config.num_labels, labels, config.problem_type)
    n, classes, shape = labels.shape[0], config.num_labels, tuple(labels.shape)
    if problem_type == "single_label_classification":
        if labels.dim() != 1:
            raise ValueError(
                f"the batch's labels have shape {shape}, but sequence classification with class ids needs one label "
                "per example, (n,). Per-token labels (token classification) have no per-example loss here: use "
                "sbp_strategy='random' or 'none', which train with the model's own loss."
            )
        low, high, ignored = torch.stack([labels.min(), labels.max(), (labels == -100).sum()]).tolist()
        if ignored:
            raise ValueError(
                "the batch's labels contain the ignore index -100; every example needs a label for selective "
                "backprop (filter unlabelled rows out of the training set)."
            )
        if low < 0 or high >= classes:
            raise ValueError(
                f"the batch has label id {low if low < 0 else high}, outside [0, {classes}) for num_labels={classes}; "
                "class ids must be 0 .. num_labels - 1 (set num_labels to the number of classes)."
            )
    elif problem_type == "multi_label_classification" and shape != (n, classes):
        raise ValueError(
            f"float labels of shape {shape} with num_labels={classes} make the problem multi-label classification, "
            f"which needs labels of shape ({n}, {classes}). For class ids use integer labels; for one regression "
            "target set num_labels=1 (or config.problem_type='regression')."
        )
    elif problem_type == "regression" and labels.numel() != n * classes:
        raise ValueError(f"regression labels of shape {shape} do not fit num_labels={classes} outputs per example.")
    if label_smoothing and problem_type != "single_label_classification":
        raise ValueError(
            f"label_smoothing_factor={label_smoothing} applies to single-label classification "
            f"only; these labels make the problem {problem_type!r}."
        )
    return problem_type


def check_training_set(dataset: Any) -> None:
    """The checks of the training set that ``train()`` makes (``Trainer`` itself refuses a missing one)."""
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return
    try:
        size = len(dataset)
    except TypeError:
        return
    if size == 0:
        raise ValueError(
            "train_dataset is empty (0 examples); training needs at least one example per batch. Check the "
            "dataset's split and filters."
        )


def check_setup(trainer: SelectiveBackpropTrainer) -> None:
    """Raise, when the trainer is built, for set-ups that the strategy cannot serve."""
    from .trainer import SelectiveBackpropTrainer

    args, sbp, strategy = trainer.args, trainer.sbp_args, trainer.strategy
    if not strategy.selective:
        return
    if sbp.sbp_head_module is not None and not (trainer.runs_scoring_pass or strategy.observes()):
        logger.warning(
            f"sbp_head_module={sbp.sbp_head_module!r} is not used: sbp_strategy={sbp.sbp_strategy!r} runs no scoring "
            "pass and observes nothing, so it never looks at the head."
        )
    overridden = type(trainer).compute_loss is not SelectiveBackpropTrainer.compute_loss
    if strategy.weighted and overridden and not trainer.supports_selection_weights:
        raise ValueError(
            f"{type(trainer).__name__} overrides compute_loss, and sbp_strategy={sbp.sbp_strategy!r} weights the "
            "subset's rows, which the override may not apply. If it calls super().compute_loss (which applies them) "
            "or applies trainer.selection_weights itself, set the class attribute supports_selection_weights = True; "
            "otherwise use an unweighted strategy ('random', 'loss') or 'none'."
        )
    if strategy.uses_example_cache and trainer.train_dataset is not None:
        check_indexable(trainer.train_dataset)
    if strategy.prunes_dataset:
        check_epoch_pruning(trainer)
    if not trainer.needs_example_losses:
        return  # the subset trains with the model's own loss: any model whose batches have rows will do
    unwrapped = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    config = model_config(unwrapped, sbp.sbp_strategy)
    if args.label_smoothing_factor and config.problem_type not in (None, "single_label_classification"):
        raise ValueError(
            f"label_smoothing_factor={args.label_smoothing_factor} applies to single-label classification "
            f"only, but the model's problem_type is {config.problem_type!r}."
        )
    if (trainer.runs_scoring_pass or strategy.uses_example_cache) and args.n_gpu > 1:
        raise ValueError(
            f"sbp_strategy={sbp.sbp_strategy!r} does not support single-process multi-GPU training "
            f"(torch.nn.DataParallel over n_gpu={args.n_gpu} GPUs): the head capture (of the scoring pass, or of the "
            "training forward that records per-example statistics) needs "
            "one replica per process. Launch one process per GPU with `torchrun` or `accelerate launch`, or "
            "make one GPU visible (CUDA_VISIBLE_DEVICES)."
        )
    if trainer.runs_scoring_pass or strategy.observes():
        if trainer.head_name is not None:
            module = named_head(unwrapped, trainer.head_name)
            if module.out_features != config.num_labels:
                candidates = [name for name, _ in head_candidates(unwrapped, config.num_labels)]
                raise HeadNotFoundError(
                    f"{HEAD_OVERRIDE_OPTION}={trainer.head_name!r} is an nn.Linear with out_features="
                    f"{module.out_features}, but the head must have one output per label (num_labels="
                    f"{config.num_labels}); its final nn.Linear is one of {candidates}."
                )
        elif not head_candidates(unwrapped, config.num_labels):
            raise HeadNotFoundError(
                f"{type(unwrapped).__name__} has no nn.Linear with out_features equal to num_labels="
                f"{config.num_labels}, so its classification head cannot be found. Set {HEAD_OVERRIDE_OPTION} to "
                "the name of the head's final nn.Linear."
            )
    check_label_column(trainer.train_dataset, config)
    probe_first_batch(trainer, config)


def check_epoch_pruning(trainer: SelectiveBackpropTrainer) -> None:
    """Raise, when the trainer is built, for set-ups that a dataset-level strategy (``prunes_dataset``) cannot serve:
    a ``transformers`` without the loop hooks it needs, another training sampler, or a user-given learning-rate
    scheduler that cannot follow epochs of varying length."""
    args, name = trainer.args, trainer.sbp_args.sbp_strategy
    check_trainer_hooks(name)
    sampling = getattr(args, "train_sampling_strategy", None)
    if sampling not in (None, "random") or getattr(args, "group_by_length", False):
        value = f"train_sampling_strategy={sampling!r}" if sampling not in (None, "random") else "group_by_length=True"
        raise ValueError(
            f"{value} with sbp_strategy={name!r}: {name} chooses each epoch's examples and order with its own "
            "sampler, so it cannot also group or rebalance batches by length. Use the default random sampling."
        )
    scheduler = trainer.lr_scheduler
    step_based = scheduler is not None and not isinstance(
        scheduler, (torch.optim.lr_scheduler.LambdaLR, torch.optim.lr_scheduler.ReduceLROnPlateau)
    )
    if step_based and args.max_steps <= 0:
        raise ValueError(
            f"the learning-rate scheduler given to the trainer ({type(scheduler).__name__}) counts optimizer steps, "
            f"and with sbp_strategy={name!r} an epoch-based run (num_train_epochs={args.num_train_epochs}, max_steps "
            "<= 0) has epochs of varying, not yet known length, so its schedule would not end with training. Give a "
            "LambdaLR (the trainer makes it follow the epochs), let the trainer build the scheduler "
            "(lr_scheduler_type), or set max_steps."
        )


def check_label_column(dataset: Any, config) -> None:
    """Scan a ``datasets.Dataset``'s integer label column for the ignore index -100 up front, so that a
    run does not stop at the first batch that holds one."""
    if config.problem_type not in (None, "single_label_classification") or config.num_labels < 2:
        return
    try:
        import datasets
        import pyarrow.compute as pc
        import pyarrow.types as pa_types
    except ImportError:  # pragma: no cover - datasets (and pyarrow) are dependencies
        return
    if not isinstance(dataset, datasets.Dataset):
        return
    for name in LABEL_COLUMNS:
        if name not in dataset.column_names:
            continue
        column = dataset.with_format("arrow")[name]
        if not pa_types.is_integer(column.type):
            return
        ignored = pc.sum(pc.equal(column, -100)).as_py() or 0
        if ignored:
            first = pc.index(column, -100).as_py()
            raise ValueError(
                f"{ignored} of the {len(dataset)} training examples have {name} = -100 (the ignore index; the "
                f"first is row {first}). Selective backprop scores every example by its loss, so every example "
                f"needs a label: filter them out first, e.g. dataset.filter(lambda e: e[{name!r}] != -100)."
            )
        outside = pc.or_(pc.less(column, 0), pc.greater_equal(column, config.num_labels))
        if pc.any(outside).as_py():
            row = pc.index(outside, True).as_py()
            raise ValueError(
                f"training example {row} has {name} = {column[row].as_py()}, outside [0, {config.num_labels}) for "
                f"num_labels={config.num_labels}; class ids must be 0 .. num_labels - 1."
            )
        return


def probe_batch(trainer: SelectiveBackpropTrainer) -> dict[str, Any] | None:
    """The first (at most) two training examples, collated as training will collate them; ``None`` if the
    dataset cannot be sampled up front (iterable, unsized) or the collator fails on them."""
    dataset = trainer.train_dataset
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    try:
        count = min(2, len(dataset))
        collator = trainer.data_collator
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets is a dependency
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = trainer._remove_unused_columns(dataset.select(range(count)), description="training")
        else:
            collator = trainer._get_collator_with_removed_columns(collator, description="training")
        return trainer._prepare_inputs(collator([dataset[i] for i in range(count)]))
    except Exception as error:  # training will report a collation problem in its own words
        logger.info(f"Skipping the construction-time check of the first batch: {error!r}")
        return None


def probe_first_batch(trainer: SelectiveBackpropTrainer, config) -> None:
    """Run the checks of the first training step on the first examples, at construction: missing labels,
    the ignore index, a model whose loss is not the per-example losses' mean, and a head that cannot be found or
    does not reproduce the logits raise now rather than at the first step. Random states are left untouched, so
    training is unaffected."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return  # parameters may be sharded or not yet materialised before `train`
    if any(p.device.type == "meta" for p in trainer.model.parameters()):
        return
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [trainer.args.device] if trainer.args.device.type == "cuda" else []
    strategy = trainer.sbp_args.sbp_strategy
    try:
        with torch.random.fork_rng(devices=devices):
            batch = probe_batch(trainer)
            if batch is None:
                return
            labels = batch_labels(batch, trainer.label_key)
            problem_type = batch_problem_type(config, labels, trainer.args.label_smoothing_factor)
            with trainer.compute_loss_context_manager():
                outputs = no_grad_outputs(trainer.model, batch)
            logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
            if logits is None:
                raise ValueError(
                    f"sbp_strategy={strategy!r} needs the model's logits, but its output has none (keys: "
                    f"{list(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__}); use "
                    "sbp_strategy='random' or 'none'."
                )
            losses = example_losses(logits, labels, problem_type, 0.0, strategy)
            if outputs.get("loss") is not None:  # the model's own loss, without Trainer's label smoothing
                verify_model_loss(outputs["loss"], losses, problem_type, logits=logits)
            if trainer.runs_scoring_pass:
                trainer.score_batch(trainer.model, batch)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def checked_selection(
    indices: torch.Tensor, weights: torch.Tensor, n: int, strategy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A strategy's choice for a batch of ``n`` as CPU tensors (long indices, float32 weights), or a clear error if
    it broke the contract of ``SelectionStrategy.select``."""
    indices = torch.as_tensor(indices).detach().cpu().long().reshape(-1)
    weights = torch.as_tensor(weights).detach().cpu().float()
    m = indices.numel()
    in_range = m > 0 and int(indices.min()) >= 0 and int(indices.max()) < n
    if weights.shape != (m,) or not in_range or indices.unique().numel() != m:
        raise ValueError(
            f"strategy {strategy!r} returned {m} indices ({indices.tolist()[:10]}...) and weights of shape "
            f"{tuple(weights.shape)} for a batch of {n}; select() must return at least one distinct index in "
            f"[0, {n}) and one weight per index."
        )
    return indices, weights
