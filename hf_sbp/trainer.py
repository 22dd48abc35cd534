"""``SelectiveBackpropTrainer``: a drop-in ``transformers.Trainer`` that backpropagates a subset per batch."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from . import checkpoint_state, setup_checks
from .batch_selection import BatchSelector
from .checkpoint_state import restore_trainer_state, trainer_state
from .config import SelectiveBackpropArguments
from .core.pruning import PruningHistory
from .epoch_pruning import epochs_of
from .example_cache import EXAMPLE_ID_KEY, ExampleStatsCache, with_example_ids
from .head import HeadCapture, HeadScores
from .irreducible_loss import IrreducibleLosses
from .model_card import MODEL_TAGS, ModelCardMixin
from .selection_metrics import SelectionMetrics, SelectionRecord
from .strategies import SelectionStrategy


class SelectiveBackpropTrainer(ModelCardMixin, checkpoint_state.PortableArgumentsMixin, Trainer):
    """A ``transformers.Trainer`` that runs forward + backward on a selected subset of each batch.

    Per training batch, for a strategy that ``needs_scoring`` (``gradmatch``, ``loss``): one forward pass without
    autograd over the whole batch (the scoring pass, in eval mode so dropout does not perturb the scores) captures
    the classification head's input with a hook; the strategy picks rows and weights; the ordinary forward and
    backward run on those rows only. ``random`` skips the scoring pass: exactly the cost of a smaller batch.
    ``none`` is the plain ``Trainer``. A dataset-level strategy (``infobatch``, ``random-prune``) instead plans each
    epoch, which then visits part of the training set with per-example loss weights (see
    :mod:`hf_sbp.epoch_pruning`). Any strategy registered with :func:`hf_sbp.register_strategy` can be named.

    The subset's forward and backward are ``Trainer.training_step`` on the subset's rows, so its loss goes through
    ``compute_loss`` (an override, ``compute_loss_func`` and label smoothing included) and is normalised as
    ``Trainer`` normalises the full batch's under gradient accumulation; selection weights are applied in
    :meth:`compute_loss` (see :mod:`hf_sbp.subset_loss`).

    Args:
        Those of ``transformers.Trainer``; ``args`` is kept as given (any ``TrainingArguments``). Its ``sbp_*``
        values, when it has them, choose the strategy; otherwise the defaults of
        :class:`~hf_sbp.SelectiveBackpropArguments` apply (gradient matching at keep 0.5).
    """

    _tag_names = list(MODEL_TAGS)

    supports_selection_weights: bool = False
    """Set it in a subclass whose ``compute_loss`` override calls ``super().compute_loss`` (which applies the selection
    weights) or applies :attr:`selection_weights` itself; weighted strategies refuse an override without it."""

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *pargs, **kwargs):
        # Before the Trainer is built: with FSDP on a CPU it would quietly build DDP instead.
        sbp_args = args if isinstance(args, SelectiveBackpropArguments) else SelectiveBackpropArguments()
        setup_checks.check_sharding(args, sbp_args)
        super().__init__(model, args, *pargs, **kwargs)
        setup_checks.check_sharding(self.args, sbp_args, self)  # and a launcher's FSDP or DeepSpeed config
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self._default_sbp_args = SelectiveBackpropArguments()
        self._new_strategy()
        self._last_selection: SelectionRecord | None = None
        self._metrics = SelectionMetrics()
        self._resumed_checkpoint: str | None = None
        self._training_loops = 0
        self._capture = HeadCapture()
        self._selector = BatchSelector(self)
        setup_checks.check_setup(self)
        self._checked_setup = setup_checks.setup_key(self)
        self._il = IrreducibleLosses(self)
        self._start_selection()
        self._selector.attach_head_hooks(self.model)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """``Trainer.call_model_init``; the new model's head is hooked at once (see
        :meth:`hf_sbp.batch_selection.BatchSelector.attach_head_hooks`)."""
        model = super().call_model_init(trial)
        if hasattr(self, "_selector"):  # not within Trainer.__init__, after which __init__ hooks the model itself
            self._selector.attach_head_hooks(model)
        return model

    def _new_strategy(self) -> None:
        sbp = self.sbp_args
        sbp.validate_sbp(self.args.per_device_train_batch_size)
        seed = sbp.sbp_seed if sbp.sbp_seed is not None else self.args.seed
        self._generator = torch.Generator().manual_seed(seed + self.args.process_index)
        self._strategy: SelectionStrategy = sbp.strategy_class()(sbp)
        self._head_name: str | None = sbp.sbp_head_module
        self._head_setting = sbp.sbp_head_module

    # ---- public read-only state --------------------------------------------------------------

    @property
    def sbp_args(self) -> SelectiveBackpropArguments:
        """The ``sbp_*`` settings: ``args`` itself when it has them (a :class:`~hf_sbp.SelectiveBackpropConfig`, or
        your class that inherits :class:`~hf_sbp.SelectiveBackpropArguments`), else the documented defaults."""
        return self.args if isinstance(self.args, SelectiveBackpropArguments) else self._default_sbp_args

    @property
    def selection_weights(self) -> torch.Tensor | None:
        """Inside ``compute_loss`` during a training step: the loss weights of the subset's rows (in the order of
        the inputs), or ``None`` when they are all 1 (the subset's loss is then the model's own loss)."""
        return self._selector.step.weights if self._selector.step is not None else None

    @property
    def strategy(self) -> SelectionStrategy:
        """The selection strategy that ``args.sbp_strategy`` names."""
        return self._strategy

    @property
    def selection_generator(self) -> torch.Generator:
        """The seeded generator of the selection's random draws (saved in checkpoints)."""
        return self._generator

    @property
    def last_selection(self) -> SelectionRecord | None:
        """What the last training step (or :meth:`select_batch` call) did to select its rows."""
        return self._last_selection

    @property
    def head_name(self) -> str | None:
        """The classification head's module name: ``sbp_head_module``, or the one the first scoring pass found."""
        return self._head_name

    @property
    def label_key(self) -> str:
        """The key of the labels in a batch: the first of ``Trainer``'s ``label_names`` (``labels`` by default)."""
        return self.label_names[0] if self.label_names else "labels"

    @property
    def runs_scoring_pass(self) -> bool:
        """Whether selective steps run the no-grad scoring pass (the strategy needs it, or it is diagnostic)."""
        return self._strategy.needs_scoring or (self._strategy.selective and self.sbp_args.sbp_diagnostic_scoring)

    @property
    def irreducible_losses(self) -> torch.Tensor | None:
        """``(N,)`` every training example's irreducible loss (by dataset index), or ``None`` before ``train()``
        (strategies that ``needs_irreducible_loss``; see :mod:`hf_sbp.irreducible_loss`)."""
        return self._il.values

    @property
    def sbp_il_seconds(self) -> float:
        """Wall-clock seconds the irreducible losses took (0 until computed; the first run's on resume)."""
        return self._il.seconds

    def set_irreducible_losses(self, values: torch.Tensor) -> None:
        """Give every training example's irreducible loss (``(N,)``, by dataset index) instead of computing them:
        values from an IL model of your own, or any stand-in where they do not matter (the throughput benchmark's
        step costs). ``train()`` then uses them (a resume still takes the checkpoint's)."""
        self._il.set(values)

    # ---- scoring and selection ---------------------------------------------------------------

    @property
    def overrides_compute_loss(self) -> bool:
        """Whether a subclass overrides :meth:`compute_loss` (which applies the selection weights)."""
        return type(self).compute_loss is not SelectiveBackpropTrainer.compute_loss

    def score_batch(self, model: nn.Module, inputs: Mapping[str, Any]) -> HeadScores:
        """The scoring pass: a forward without autograd, in eval mode, over the whole batch, capturing the head's
        input. ``inputs`` are collated and on the model's device; their labels are not passed to the model."""
        return self._selector.score(model, inputs)

    def select_batch(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the rows of one collated batch (on the model's device, with labels) to backpropagate: returns
        ``(indices, weights)``, distinct row indices (LongTensor) and their non-negative float32 loss weights, on the
        CPU, as ``training_step`` would choose them; what was done is in :attr:`last_selection`."""
        inputs = dict(inputs)
        ids = inputs.pop(EXAMPLE_ID_KEY, None)
        indices, weights, self._last_selection = self._selector.select(model, inputs, ids)
        return indices, weights

    # ---- training ----------------------------------------------------------------------------

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """``Trainer.get_train_dataloader``; for a strategy that ``uses_example_cache``, each row carries its dataset
        index (:data:`~hf_sbp.example_cache.EXAMPLE_ID_KEY`) through the sampler and the collator."""
        dataset = self.train_dataset
        if dataset is None or not self._strategy.uses_example_cache:
            return super().get_train_dataloader()
        self.train_dataset = with_example_ids(dataset)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = dataset

    def _set_signature_columns_if_needed(self) -> None:
        # `remove_unused_columns` keeps the example indices when the strategy reads them (training_step strips
        # them before the forward); otherwise a column of that name is removed, as by Trainer.
        super()._set_signature_columns_if_needed()
        columns = [name for name in self._signature_columns if name != EXAMPLE_ID_KEY]
        self._signature_columns = columns + ([EXAMPLE_ID_KEY] if self._strategy.uses_example_cache else [])

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        """``Trainer.train``. Every check made when the trainer was built is made again, on the arguments as they are
        now (a new strategy if ``sbp_strategy`` changed), before anything is created or trained; the selection
        statistics start afresh, or from the checkpoint resumed."""
        setup_checks.recheck_before_training(self)
        last = resume_from_checkpoint is True
        checkpoint = get_last_checkpoint(self.args.output_dir) if last else resume_from_checkpoint
        resumed = isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint)
        self._resumed_checkpoint = os.fspath(checkpoint) if resumed else None
        self._start_selection()
        self._il.prepare(resumed)  # before the first step; its time is sbp_il_seconds
        self._training_loops = 0
        self._selector.reset_compiled_graphs(self.model)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _start_selection(self) -> None:
        """The selection statistics, counters and caches of a run: afresh, or from the checkpoint resumed."""
        self._metrics.reset()
        self.sbp_backprop_examples = 0
        """Examples this process has run forward + backward on in this run (full batches for ``none``)."""
        self._cache: ExampleStatsCache | None = self._selector.new_cache()
        self._epochs = epochs_of(self)
        self._il.check()
        if self._resumed_checkpoint is not None:
            self._il.values = None  # the checkpoint's, or an error: never values computed from another model
            restore_trainer_state(self, self._resumed_checkpoint)

    def _inner_training_loop(self, batch_size: int | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        # `auto_find_batch_size` runs the loop again, with a smaller batch, after running out of memory: the failed
        # attempt's steps did not happen, so what they selected, counted, cached or taught the strategy goes.
        if self._training_loops:
            self._new_strategy()
            self._start_selection()
        self._training_loops += 1
        return super()._inner_training_loop(batch_size, *args, **kwargs)

    # ---- the loop hooks: Trainer's epochs, or pruned ones for a dataset-level strategy (hf_sbp.epoch_pruning) ----

    @property
    def pruning_history(self) -> PruningHistory | None:
        """For a dataset-level strategy: the epochs of the current run (what each visited and left out)."""
        return self._epochs.history

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        planned = self._epochs.sampler(train_dataset if train_dataset is not None else self.train_dataset)
        return planned if planned is not None else super()._get_train_sampler(train_dataset)

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple:
        return self._epochs.initial_values(args, super().set_initial_training_values(args, dataloader))

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        return self._epochs.training_state(epochs_trained, steps_trained, resume_from_checkpoint)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self._epochs.follow_epochs(scheduler)
        return scheduler

    def _run_epoch(self, *, epoch: int, train_dataloader: Any, steps_in_epoch: int, num_update_steps_per_epoch: int,
                   **kwargs: Any):  # fmt: skip
        steps, updates = self._epochs.start_epoch(epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch)
        return super()._run_epoch(
            epoch=epoch, train_dataloader=train_dataloader, steps_in_epoch=steps, num_update_steps_per_epoch=updates,
            **kwargs,
        )  # fmt: skip

    # ---- the training step ---------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Select a subset of ``inputs`` with the strategy, then forward and backward on it (see
        :meth:`hf_sbp.batch_selection.BatchSelector.training_step`)."""
        train_subset = functools.partial(super().training_step, model)
        return self._selector.training_step(model, inputs, num_items_in_batch, train_subset)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """``Trainer.compute_loss``, with the selection weights applied to a selective step's subset (see
        :mod:`hf_sbp.subset_loss`); at the first step that computes per-example losses, they are checked against the
        model's own loss."""
        if not self._selector.reweights_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        loss = self._selector.subset_loss(loss, outputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs: dict[str, torch.Tensor | Any]) -> int:
        """Forward + backward FLOPs of the last step: see :attr:`SelectionRecord.flops_factor`."""
        full, record = super().floating_point_ops(inputs), self._last_selection
        return full if record is None or not self._strategy.selective else int(full * record.flops_factor)

    # ---- logging and checkpoints -------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the selection metrics, averaged since the last log (and across processes), into training logs;
        and their whole-run values (``train_sbp/...``, the last partial logging interval included) into the
        end-of-training summary, in place, so that ``train()``'s returned metrics hold them too."""
        logs = self._selector.with_selection_metrics(logs)
        super().log(logs, start_time)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Save each process's selection state with the checkpoint (see :mod:`hf_sbp.checkpoint_state`): before
        ``Trainer``'s files, so that a checkpoint pushed to the Hub carries it; like the random states, not with
        ``save_only_model``."""
        if not self.args.save_only_model:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            checkpoint_state.save_selection_state(folder, self.args.process_index, trainer_state(self))
        super()._save_checkpoint(model, trial)
