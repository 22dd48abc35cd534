"""The trainer's checks: what selection cannot serve is refused when the trainer is built, not at the first step.

:func:`check_setup` runs in ``SelectiveBackpropTrainer.__init__``, and again when ``train()`` starts (the arguments
may have changed since): the model's config and head, a ``compute_loss`` override, the training set's label column,
and a probe of the first training examples through the first step's checks, the model's own loss (or
``compute_loss_func``'s) against the per-example losses included. :func:`check_training_set` runs when ``train()``
starts, so that a trainer built for evaluation needs no training set.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .epoch_pruning import check_trainer_hooks
from .example_cache import check_indexable
from .head import HEAD_OVERRIDE_OPTION, HeadNotFoundError, head_candidates, named_head, no_grad_outputs
from .labels import LABEL_COLUMNS, batch_labels, batch_problem_type, model_config
from .subset_loss import example_losses, verify_model_loss

if TYPE_CHECKING:
    from .trainer import SelectiveBackpropTrainer

logger = logging.getLogger(__name__)


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


SHARDING_REFUSED = (
    "SelectiveBackpropTrainer does not support {what} with sbp_strategy={strategy!r}: selection under sharded "
    "parameters has never run (FSDP through accelerate needs an accelerator: on the CPU accelerate 1.16 drops the FSDP "
    "plugin and trains with DDP instead), so its gradients are unverified. Train with DDP (torchrun or accelerate "
    "launch without FSDP){zero}, or with sbp_strategy='none'."
)


def deepspeed_zero_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of ``TrainingArguments.deepspeed`` (a dict, a path to a JSON file, or ``transformers``'
    ``HfDeepSpeedConfig``); ``None`` when there is no DeepSpeed config or it names no stage."""
    if deepspeed is None or deepspeed is False:
        return None
    if isinstance(deepspeed, str | os.PathLike):
        with open(deepspeed) as handle:
            deepspeed = json.load(handle)
    if isinstance(deepspeed, Mapping):
        stage = (deepspeed.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, int | float) else None
    is_zero3 = getattr(deepspeed, "is_zero3", None)
    return 3 if callable(is_zero3) and is_zero3() else None


def check_sharding(args: Any, sbp: Any, trainer: SelectiveBackpropTrainer | None = None) -> None:
    """Refuse FSDP (any version) and DeepSpeed ZeRO-3 for a selective strategy, from ``args`` (before the
    ``Trainer`` is built, so that FSDP on a CPU is not silently turned into DDP) and, given ``trainer``, from its
    accelerator's state (a launcher's config: ``accelerate launch`` with FSDP or DeepSpeed, no ``args`` needed).

    Scoring itself would survive sharding (it reads the head's input and output through hooks, never its sharded
    weight), but a sharded run of the trainer has never been tested, and ZeRO-3 partitions the parameters that the
    gradient pass updates: refuse rather than risk a silently wrong gradient. ZeRO stages 1 and 2 keep every
    parameter whole on every rank and are not refused.
    """
    try:
        selective = sbp.strategy_class().selective
    except (ValueError, KeyError, ImportError):
        return  # an unknown strategy: validate_sbp says so, with its own message
    if not selective:
        return  # 'none' is the plain Trainer step
    strategy = sbp.sbp_strategy
    refuse = []
    if getattr(args, "fsdp_plugin_args", None) is not None or (trainer is not None and trainer.is_fsdp_enabled):
        refuse.append("FSDP")
    stage = deepspeed_zero_stage(getattr(args, "deepspeed", None))
    if trainer is not None and trainer.is_deepspeed_enabled:
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", stage)
    if stage == 3:
        refuse.append("DeepSpeed ZeRO-3 (partitioned parameters)")
    if refuse:
        zero = " or DeepSpeed ZeRO stage 1 or 2" if "FSDP" not in refuse else ""
        raise ValueError(SHARDING_REFUSED.format(what=" and ".join(refuse), strategy=strategy, zero=zero))


def check_setup(trainer: SelectiveBackpropTrainer, when_training: bool = False, probe: bool = True) -> None:
    """Raise, when the trainer is built and again when ``train()`` starts (``when_training``, after which the
    arguments may have changed), for set-ups that the strategy cannot serve. ``probe``: run the first examples
    through the first step's checks too (a forward pass, which ``train()`` skips when nothing has changed)."""
    try:
        _check_setup(trainer, probe)
    except ValueError as error:
        if when_training and error.args and isinstance(error.args[0], str):
            # The same error, of the same type, saying when it was found: the arguments may differ from the build's.
            error.args = (f"{error.args[0]} (Checked when train() started, on the arguments as they are now.)",)
        raise


def recheck_before_training(trainer: SelectiveBackpropTrainer) -> None:
    """When ``train()`` starts: the checks made when the trainer was built, made again on the arguments as they are
    now (with a new strategy if ``sbp_strategy`` changed, the new head if ``sbp_head_module`` did)."""
    sbp = trainer.sbp_args
    if sbp.sbp_strategy != trainer.strategy.name:
        trainer._new_strategy()  # validates the settings too
    else:
        sbp.validate_sbp(trainer.args.per_device_train_batch_size)
    if sbp.sbp_head_module != trainer._head_setting:
        trainer._head_name = trainer._head_setting = sbp.sbp_head_module
    # The first examples' forward pass is not repeated (hooks would see it) unless what it checks has changed.
    changed = setup_key(trainer) != trainer._checked_setup
    check_setup(trainer, when_training=True, probe=changed)
    trainer._checked_setup = setup_key(trainer)
    check_training_set(trainer.train_dataset)


def setup_key(trainer: SelectiveBackpropTrainer) -> tuple:
    """What :func:`check_setup` checks, to tell whether it changed: the arguments' values, and which model, training
    set, collator and ``compute_loss_func`` the trainer holds."""
    held = (trainer.model, trainer.train_dataset, trainer.data_collator, trainer.compute_loss_func)
    return (repr(trainer.args.to_dict()), *map(id, held))


def _check_setup(trainer: SelectiveBackpropTrainer, probe: bool = True) -> None:
    args, sbp, strategy = trainer.args, trainer.sbp_args, trainer.strategy
    if not strategy.selective:
        return
    if sbp.sbp_head_module is not None and not (trainer.runs_scoring_pass or strategy.observes()):
        logger.warning(
            f"sbp_head_module={sbp.sbp_head_module!r} is not used: sbp_strategy={sbp.sbp_strategy!r} runs no scoring "
            "pass and observes nothing, so it never looks at the head."
        )
    if strategy.weighted and trainer.overrides_compute_loss and not trainer.supports_selection_weights:
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
    if not trainer._selector.needs_example_losses:
        return  # the subset trains with the model's own loss: any model whose batches have rows will do
    unwrapped = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    config = model_config(unwrapped, sbp.sbp_strategy)
    if trainer._selector.label_smoothing and config.problem_type not in (None, "single_label_classification"):
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
    if probe:
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
    # A scheduler the trainer created in an earlier train() is replaced by a new one: only a user-given one counts.
    scheduler = None if getattr(trainer, "_created_lr_scheduler", False) else trainer.lr_scheduler
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
            problem_type = batch_problem_type(config, labels, trainer._selector.label_smoothing)
            with trainer.compute_loss_context_manager():
                outputs = no_grad_outputs(trainer.model, batch)
            logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
            if logits is None:
                raise ValueError(
                    f"sbp_strategy={strategy!r} needs the model's logits, but its output has none (keys: "
                    f"{list(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__}); use "
                    "sbp_strategy='random' or 'none'."
                )
            custom = trainer.compute_loss_func
            losses = example_losses(logits, labels, problem_type, 0.0, strategy, custom)
            if custom is not None:  # the loss Trainer trains with, called as Trainer calls it
                num_items = labels.ne(-100).sum()
                loss = custom(outputs, labels, num_items_in_batch=num_items)
                verify_model_loss(loss, losses, problem_type, num_items, custom=True, logits=logits)
            elif outputs.get("loss") is not None:  # the model's own loss, without Trainer's label smoothing
                verify_model_loss(outputs["loss"], losses, problem_type, logits=logits)
            if trainer.runs_scoring_pass:
                trainer.score_batch(trainer.model, batch)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
