"""``SelectiveBackpropTrainer``: a drop-in ``transformers.Trainer`` that backpropagates a subset per batch."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from . import checkpoint_state, head, setup_checks
from ._utils import all_finite, synchronize
from .config import SelectiveBackpropArguments
from .core.padding import trim_padding, truncate_for_scoring
from .core.pruning import PruningHistory
from .core.schedule import selection_active
from .core.selection import gradient_match_error, gram_cannot_overflow, index_rows, subset_size
from .epoch_pruning import EpochPlanner
from .example_cache import EXAMPLE_ID_KEY, ExampleStatsCache, check_indexable, with_example_ids
from .head import HeadCapture, HeadNotFoundError, HeadScores
from .irreducible_loss import IrreducibleLosses
from .labels import batch_labels, batch_problem_type, model_config
from .model_card import MODEL_TAGS, ModelCardMixin
from .selection_metrics import (
    IL_SECONDS,
    SelectionMetrics,
    SelectionRecord,
    run_key,
)
from .strategies import SelectionBatch, SelectionStrategy
from .strategies.base import checked_selection
from .subset_loss import (
    SubsetStep,
    custom_example_losses,
    example_losses,
    subset_num_items,
    verify_model_loss,
    weighted_subset_loss,
)

logger = logging.getLogger(__name__)


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
        self._epochs = EpochPlanner(self)
        self._step: SubsetStep | None = None
        self._loss_verified = False
        self._last_selection: SelectionRecord | None = None
        self._metrics = SelectionMetrics()
        self._warned_nonfinite = False
        self._cache: ExampleStatsCache | None = None
        self.sbp_backprop_examples = 0
        """Examples this process has run forward + backward on in this run (full batches for ``none``)."""
        self._resumed_checkpoint: str | None = None
        self._training_loops = 0
        self._capture = HeadCapture()
        setup_checks.check_setup(self)
        self._checked_setup = setup_checks.setup_key(self)
        self._new_cache()
        self._il = IrreducibleLosses(self)
        self._il.check()
        self._attach_head_hooks(self.model)

    def _attach_head_hooks(self, model: nn.Module) -> None:
        """Hook the head (candidates) of ``model`` now, before its first forward: a model that ``torch_compile``
        compiles runs only the hooks it had when it was traced (see :class:`~hf_sbp.head.HeadCapture`)."""
        if self._captures_head:
            self._capture.attach(self._head_modules(model))

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """``Trainer.call_model_init``; the new model's head is hooked at once (see :meth:`_attach_head_hooks`)."""
        model = super().call_model_init(trial)
        if hasattr(self, "_capture"):  # not within Trainer.__init__, after which __init__ hooks the model itself
            self._attach_head_hooks(model)
        return model

    def _new_cache(self) -> None:
        """An empty per-example statistics cache over the training set, for a strategy that uses one."""
        self._cache = None
        if self._strategy.uses_example_cache and self.train_dataset is not None:
            check_indexable(self.train_dataset)
            seed = self.sbp_args.sbp_seed if self.sbp_args.sbp_seed is not None else self.args.seed
            projection, exchanged = self.sbp_args.sbp_cache_projection_dim, self.args.world_size > 1
            gradients = self._strategy.caches_gradients
            self._cache = ExampleStatsCache(len(self.train_dataset), projection, seed, exchanged, gradients)

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
        return self._step.weights if self._step is not None else None

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
    def _captures_head(self) -> bool:
        """Whether some forward pass captures the head's input: the scoring pass, or the subset's forward (for a
        strategy that observes it or keeps per-example statistics)."""
        s = self._strategy
        return s.selective and (self.runs_scoring_pass or s.observes() or s.uses_example_cache)

    @property
    def needs_example_losses(self) -> bool:
        """Whether the trainer computes per-example losses (to score, weight or observe rows), checked against the
        model's own loss; a random subset trains with the model's own loss and needs none."""
        s = self._strategy
        return s.selective and (self.runs_scoring_pass or s.weighted or s.observes() or s.uses_example_cache)

    @property
    def label_smoothing(self) -> float:
        """The label smoothing of the loss: ``label_smoothing_factor``, unless a ``compute_loss_func`` computes the
        loss instead (``Trainer`` then applies no smoothing, and neither does selection)."""
        return 0.0 if self.compute_loss_func is not None else self.args.label_smoothing_factor

    @property
    def example_loss(self) -> Any:
        """With a ``compute_loss_func``: the per-example losses it defines, ``(logits, labels) -> (n,)``, which
        selection scores and weights rows by (see :func:`hf_sbp.subset_loss.custom_example_losses`); else ``None``
        (the rule of ``*ForSequenceClassification`` models)."""
        if self.compute_loss_func is None:
            return None
        return functools.partial(custom_example_losses, self.compute_loss_func, strategy=self.sbp_args.sbp_strategy)

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

    def _unwrapped(self, model: nn.Module) -> nn.Module:
        """``model`` without the wrappers of ``accelerate`` (DDP, mixed precision) and of ``torch.compile``, whose
        ``OptimizedModule`` names every module with an ``_orig_mod.`` prefix: the model whose modules the user named."""
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def _model_config(self):
        return model_config(self._unwrapped(self.model), self.sbp_args.sbp_strategy)

    def _problem_type(self, labels: torch.Tensor) -> str:
        return batch_problem_type(self._model_config(), labels, self.label_smoothing)

    def _batch(self, labels: torch.Tensor, problem_type: str | None, *scores: Any) -> SelectionBatch:
        """A :class:`SelectionBatch` of these rows; ``scores``: logits, features, head bias, in that order."""
        step, smoothing, loss = self.state.global_step, self.label_smoothing, self.example_loss
        return SelectionBatch(labels.shape[0], labels, problem_type, self._generator, step, smoothing, *scores,
                              example_loss=loss)  # fmt: skip

    def _head_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        unwrapped = self._unwrapped(model)
        if self._head_name is not None:
            return [(self._head_name, head.named_head(unwrapped, self._head_name))]
        return head.head_candidates(unwrapped, self._model_config().num_labels)

    def _is_compiled(self, model: nn.Module) -> bool:
        """Whether ``model`` is a ``torch.compile``'d model (possibly inside accelerate's wrappers)."""
        return self.accelerator.unwrap_model(model) is not self._unwrapped(model)

    def _check_compiled_capture(self, model: nn.Module, capture: HeadCapture) -> None:
        """The error of a compiled model whose graph was traced without the head hooks (so they never fire), rather
        than the misleading one of a model without a head."""
        if not capture.calls and self._is_compiled(model):
            raise HeadNotFoundError(
                f"the classification head of the compiled model ({[name for name, _ in capture.modules]}) recorded "
                "nothing: its compiled graph was traced without the trainer's head hooks (before the trainer was "
                "built, or for another model of its class in this process), and a compiled model runs only the hooks "
                "it was traced with. Call torch.compiler.reset() before calling select_batch or score_batch by hand "
                "on such a model (train() does it)."
            )

    def score_batch(self, model: nn.Module, inputs: Mapping[str, Any]) -> HeadScores:
        """The scoring pass: a forward without autograd, in eval mode, over the whole batch, capturing the head's
        input. ``inputs`` are collated and on the model's device; their labels are not passed to the model."""
        if self.sbp_args.sbp_scoring_max_length is not None:  # a cheaper pass over each row's first L tokens
            inputs = truncate_for_scoring(inputs, self.sbp_args.sbp_scoring_max_length, label_names=[self.label_key])
        modules, capture = self._head_modules(model), self._capture
        # The training forward's autocast: accelerate's, which the prepared model applies itself (nested, it changes
        # nothing) and which a model not yet prepared (the check when the trainer is built, select_batch) needs.
        with self.compute_loss_context_manager(), self.accelerator.autocast(), capture.capturing(modules):
            logits = head.no_grad_logits(model, {key: value for key, value in inputs.items() if key != self.label_key})
        self._check_compiled_capture(model, capture)
        pad_token_id = getattr(self._model_config(), "pad_token_id", None)
        self._head_name, features = head.resolve_head_call(capture, logits, inputs.get("input_ids"), pad_token_id)
        capture.calls = []  # the trainer keeps its capture: hold no batch's activations past their use
        return HeadScores(logits.float(), features, dict(modules)[self._head_name].bias is not None)

    def select_batch(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the rows of one collated batch (on the model's device, with labels) to backpropagate: returns
        ``(indices, weights)``, distinct row indices (LongTensor) and their non-negative float32 loss weights, on the
        CPU, as ``training_step`` would choose them; what was done is in :attr:`last_selection`."""
        inputs = dict(inputs)
        ids = inputs.pop(EXAMPLE_ID_KEY, None)
        indices, weights, self._last_selection = self._select(model, inputs, ids)
        return indices, weights

    def _rows_to_score(self, batch: SelectionBatch, ids: torch.Tensor | None) -> torch.Tensor:
        if self._strategy.uses_example_cache:
            if self._cache is None or ids is None:
                raise ValueError(
                    f"sbp_strategy={self.sbp_args.sbp_strategy!r} needs each row's dataset index under "
                    f"{EXAMPLE_ID_KEY!r} and a train_dataset to index: the trainer's training dataloader adds it; "
                    "a batch given to select_batch or training_step by hand must carry it too."
                )
            batch.example_ids = ids.detach().cpu().long()
            batch.cached = self._cache.lookup(ids, self.state.epoch or 0.0)
            if self._strategy.needs_irreducible_loss:
                batch.irreducible_losses = self._il.rows(batch.example_ids)
        if not self.runs_scoring_pass:
            return torch.zeros(0, dtype=torch.long)
        if not self._strategy.needs_scoring:  # diagnostic scoring of a random subset
            return torch.arange(batch.n)
        rows = torch.as_tensor(self._strategy.rows_to_score(batch)).cpu().long().reshape(-1).unique()
        if self.args.world_size > 1 and type(self._strategy).rows_to_score is not SelectionStrategy.rows_to_score:
            # DDP's forward broadcasts the model's buffers, a collective: every process runs the scoring forward or
            # none does. One with no row of its own to score scores its first (fresh statistics, nothing else).
            flag = torch.tensor([float(rows.numel() > 0)], device=self.args.device)
            anyone_scores = float(self.accelerator.reduce(flag, "sum")) > 0  # on every process, at every step
            if anyone_scores and rows.numel() == 0:
                rows = torch.zeros(1, dtype=torch.long)
        return rows

    def _select(self, model: nn.Module, inputs: Mapping[str, Any], ids: torch.Tensor | None, active: bool = True):
        """``(indices, weights, record)``; the whole batch when the strategy does not select or ``active`` is False."""
        labels = batch_labels(inputs, self.label_key)
        n = labels.shape[0]
        problem_type = self._problem_type(labels) if self.needs_example_losses else None
        if not (self._strategy.selective and active):
            record = SelectionRecord(n, n, scored=False, selective=False, problem_type=problem_type)
            return torch.arange(n), torch.ones(n), record
        k = subset_size(n, self.sbp_args.sbp_effective_keep)
        batch = self._batch(labels, problem_type)
        rows = self._rows_to_score(batch, ids)
        if self._strategy.prunes_dataset:
            batch.epoch_weights = self._epochs.weights(batch.example_ids)
        record = SelectionRecord(n, k, rows.numel() > 0, problem_type=problem_type, scored_rows=rows.numel())
        record.scoring_strategy = self._strategy.needs_scoring
        usable = True
        if record.scored:
            synchronize(labels.device)
            start = time.perf_counter()
            if rows.numel() < n:
                inputs, batch.scored_rows = index_rows(inputs, rows, n), rows
            batch.logits, batch.features, batch.head_bias = self.score_batch(model, inputs)
            synchronize(labels.device)
            record.scoring_s = time.perf_counter() - start
            # Finite features can still overflow float32 in the Gram matrix (|h| around 1e19). Bounded residuals and
            # features rule that out without reading the n x n matrix; otherwise the matrix is checked.
            usable = all_finite(batch.logits, batch.features) and (
                gram_cannot_overflow(batch.residuals, batch.features, batch.head_bias) or all_finite(batch.gram)
            )
        if usable and self._cache is not None:
            if record.scored:
                scored, epoch = batch.example_ids[rows], self.state.epoch or 0.0
                self._cache.write(scored, epoch, batch.losses, batch.residuals, batch.features, batch.head_bias)
            batch.cached = self._cache.lookup(batch.example_ids, self.state.epoch or 0.0)
        start = time.perf_counter()
        indices = weights = None
        if usable:
            choice = self._strategy.select(batch, k)
            indices, weights = checked_selection(*choice, n, self.sbp_args.sbp_strategy)
            record.strategy_metrics = self._strategy.step_metrics()
            if bool(weights.isnan().all()):  # the strategy gave up on this batch (gradmatch: a broken estimate)
                indices = weights = None
            elif record.scored and batch.scored_rows is None:
                # Of the gradient actually trained, (1/m) sum_S w_i g_i: magnitude included.
                trained = gradient_match_error(
                    batch.gram, indices, weights / weights.numel(), normalize=False, target=batch.gram_target
                )
                record.grad_match_error = float(trained)
        if indices is None:
            if not self._warned_nonfinite:
                logger.warning(
                    "The scoring pass produced non-finite logits, head features or selection weights; this step "
                    "trains on the full batch. Such steps are counted in the logs as sbp/fallback_steps."
                )
                self._warned_nonfinite = True
            indices, weights, record.fallback = torch.arange(n), torch.ones(n), True
        record.subset_size = indices.numel()
        synchronize(labels.device)
        record.selection_s = time.perf_counter() - start
        return indices, weights, record

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
        if self.sbp_args.sbp_strategy != self._strategy.name:
            self._new_strategy()  # validates the settings too
        else:
            self.sbp_args.validate_sbp(self.args.per_device_train_batch_size)
        if self.sbp_args.sbp_head_module != self._head_setting:
            self._head_name = self._head_setting = self.sbp_args.sbp_head_module
        # The first examples' forward pass is not repeated (hooks would see it) unless what it checks has changed.
        changed = setup_checks.setup_key(self) != self._checked_setup
        setup_checks.check_setup(self, when_training=True, probe=changed)
        self._checked_setup = setup_checks.setup_key(self)
        setup_checks.check_training_set(self.train_dataset)
        last = resume_from_checkpoint is True
        checkpoint = get_last_checkpoint(self.args.output_dir) if last else resume_from_checkpoint
        resumed = isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint)
        self._resumed_checkpoint = os.fspath(checkpoint) if resumed else None
        self._start_selection()
        self._il.prepare(resumed)  # before the first step; its time is sbp_il_seconds
        self._training_loops = 0
        if self._captures_head and (self.args.torch_compile or self._is_compiled(self.model)):
            # Compiled graphs are cached per code object, shared by every instance of the model's class, and dynamo
            # does not guard on hooks: a graph traced earlier in this process (another trainer's model, this model
            # compiled and run before its head was hooked) would run here without the head hooks. Resetting makes the
            # first compiled call trace this model, hooks included.
            torch.compiler.reset()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _start_selection(self) -> None:
        """The selection statistics, counters and caches of a run: afresh, or from the checkpoint resumed."""
        self._metrics.reset()
        self.sbp_backprop_examples = 0
        self._new_cache()
        self._epochs = EpochPlanner(self)
        self._il.check()
        if self._resumed_checkpoint is not None:
            self._il.values = None  # the checkpoint's, or an error: never values computed from another model
            self._load_selection_state(self._resumed_checkpoint)

    def _inner_training_loop(self, batch_size: int | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        # `auto_find_batch_size` runs the loop again, with a smaller batch, after running out of memory: the failed
        # attempt's steps did not happen, so what they selected, counted, cached or taught the strategy goes.
        if self._training_loops:
            self._new_strategy()
            self._start_selection()
        self._training_loops += 1
        return super()._inner_training_loop(batch_size, *args, **kwargs)

    # ---- the loop hooks behind dataset-level strategies (see hf_sbp.epoch_pruning) ---------------

    @property
    def pruning_history(self) -> PruningHistory | None:
        """For a dataset-level strategy: the epochs of the current run (what each visited and left out)."""
        return self._epochs.history if self._strategy.prunes_dataset else None

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        if not self._strategy.prunes_dataset:
            return super()._get_train_sampler(train_dataset)
        return self._epochs.sampler(train_dataset if train_dataset is not None else self.train_dataset)

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple:
        values = super().set_initial_training_values(args, dataloader)
        return self._epochs.initial_values(args, values) if self._strategy.prunes_dataset else values

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if not self._strategy.prunes_dataset:
            return epochs_trained, steps_trained
        return self._epochs.training_state(epochs_trained, steps_trained, resume_from_checkpoint)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self._strategy.prunes_dataset and self.args.max_steps <= 0:
            self._epochs.follow_epochs(scheduler)
        return scheduler

    def _run_epoch(self, *, epoch: int, train_dataloader: Any, steps_in_epoch: int, num_update_steps_per_epoch: int,
                   **kwargs: Any):  # fmt: skip
        if self._strategy.prunes_dataset:
            steps_in_epoch, num_update_steps_per_epoch = self._epochs.start_epoch(epoch, train_dataloader)
        return super()._run_epoch(
            epoch=epoch,
            train_dataloader=train_dataloader,
            steps_in_epoch=steps_in_epoch,
            num_update_steps_per_epoch=num_update_steps_per_epoch,
            **kwargs,
        )

    # ---- the training step ---------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Select a subset of ``inputs`` with the strategy, then forward and backward on it."""
        ids = inputs.get(EXAMPLE_ID_KEY)
        if ids is not None:  # the rows' dataset indices: never passed to the model (the caller's batch is kept)
            inputs = {key: value for key, value in inputs.items() if key != EXAMPLE_ID_KEY}
        if not self._strategy.selective:
            labels = inputs.get(self.label_key)
            self.sbp_backprop_examples += int(labels.shape[0]) if isinstance(labels, torch.Tensor) else 0
            return super().training_step(model, inputs, num_items_in_batch)
        step_start = time.perf_counter()
        inputs = self._prepare_inputs(inputs)
        labels = batch_labels(inputs, self.label_key)
        n, sbp = labels.shape[0], self.sbp_args
        active = self._strategy.prunes_dataset or selection_active(
            self.state.global_step, self.state.max_steps or 0, sbp.sbp_start, sbp.sbp_end, sbp.sbp_interrupt
        )
        indices, weights, record = self._select(model, inputs, ids, active)
        index_start = time.perf_counter()
        # The rows are gathered (in the order of `indices`, which the weights follow) unless they are the batch.
        unchanged = indices.numel() == n and torch.equal(indices, torch.arange(n))
        subset = inputs if unchanged else index_rows(inputs, indices, n)
        if sbp.sbp_trim_padding and not unchanged:  # drop the padding columns that no selected row needs
            multiple = getattr(self.data_collator, "pad_to_multiple_of", None)
            subset = trim_padding(subset, pad_to_multiple_of=multiple, label_names=[self.label_key])
        if not unchanged:
            num_items_in_batch = subset_num_items(num_items_in_batch, subset[self.label_key], labels)
        record.selection_s += time.perf_counter() - index_start
        uniform = bool((weights == 1).all())
        if not uniform and record.problem_type is None:
            # A strategy that does not declare `weighted` (nor scores rows) returned weights: they are applied as a
            # weighted strategy's are, with per-example losses checked against the model's loss at their first use.
            record.problem_type = self._problem_type(labels)
        verify = (self.needs_example_losses or not uniform) and not self._loss_verified
        self._step = SubsetStep(subset[self.label_key], record.problem_type, None if uniform else weights, verify)
        observed_modules = self._head_modules(model) if self._strategy.observes() or self._cache else []
        capture = self._capture
        try:
            with capture.capturing(observed_modules) if observed_modules else contextlib.nullcontext():
                loss = super().training_step(model, subset, num_items_in_batch)
            step = self._step
        finally:
            self._step = None
        if not (uniform or step.applied or self.supports_selection_weights):
            step.weights_not_applied(type(self).__name__, sbp.sbp_strategy)
        if observed_modules:  # what the gradient forward computed for the subset's rows, for the strategy's history
            self._check_compiled_capture(model, capture)
            pad_token_id = getattr(self._model_config(), "pad_token_id", None)
            self._head_name, features, logits = head.captured_head_call(capture, subset.get("input_ids"), pad_token_id)
            capture.calls = []
            bias = dict(capture.modules)[self._head_name].bias is not None
            observed = self._batch(subset[self.label_key], record.problem_type, logits, features, bias)
            observed.example_ids = ids[indices].cpu() if ids is not None else None
            if self._strategy.observes():
                self._strategy.observe(indices, observed)
            if self._cache is not None:
                epoch = self.state.epoch or 0.0
                self._cache.write(observed.example_ids, epoch, observed.losses, observed.residuals, features, bias)
        if self._cache is not None and self.args.world_size > 1 and self._head_name is not None:
            unwrapped_head = head.named_head(self._unwrapped(model), self._head_name)
            self._cache.exchange(self._gather_rows, unwrapped_head.out_features, unwrapped_head.in_features)

        if self._strategy.ends_steps():
            reduce = self.accelerator.reduce
            sum_across = (lambda t: reduce(t.to(self.args.device), "sum").cpu()) if self.args.world_size > 1 else None
            self._strategy.end_step(sum_across)

        synchronize(labels.device)
        self._last_selection = record
        self.sbp_backprop_examples += record.subset_size
        self._metrics.add(record.metrics(time.perf_counter() - step_start))
        return loss

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's ``rows``, padded along dim 0 with -1 to the longest, concatenated in process order."""
        rows = self.accelerator.pad_across_processes(rows.to(self.args.device), dim=0, pad_index=-1)
        return self.accelerator.gather(rows)

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
        step = self._step
        if step is None or (step.weights is None and not step.verify):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        logits, custom = head.output_logits(outputs), self.compute_loss_func
        losses = example_losses(
            logits, step.labels, step.problem_type, self.label_smoothing, self.sbp_args.sbp_strategy, custom
        )
        if step.verify:
            processes = self.accelerator.num_processes
            verify_model_loss(
                loss, losses, step.problem_type, num_items_in_batch, processes, custom is not None, logits=logits
            )
            self._loss_verified = True
        if step.weights is not None:
            loss, step.applied = weighted_subset_loss(loss, losses, step.weights), True
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs: dict[str, torch.Tensor | Any]) -> int:
        """Forward + backward FLOPs of the last step: see :attr:`SelectionRecord.flops_factor`."""
        full, record = super().floating_point_ops(inputs), self._last_selection
        return full if record is None or not self._strategy.selective else int(full * record.flops_factor)

    # ---- logging and checkpoints -------------------------------------------------------------

    def _reduced_metrics(self, whole_run: bool = False) -> dict[str, float]:
        """Every process must call it, as every process calls ``log``."""
        reduce = self.accelerator.reduce
        return self._metrics.reduce(
            whole_run, self.args.world_size, lambda t: reduce(t.to(self.args.device), "sum").cpu()
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the selection metrics, averaged since the last log (and across processes), into training logs;
        and their whole-run values (``train_sbp/...``, the last partial logging interval included) into the
        end-of-training summary, in place, so that ``train()``'s returned metrics hold them too."""
        if self._strategy.selective:
            if "loss" in logs and "eval_loss" not in logs:
                logs = {**logs, **self._reduced_metrics()}
            elif "train_runtime" in logs:
                logs.update({run_key(key): value for key, value in self._reduced_metrics(True).items()})
                if self._strategy.needs_irreducible_loss:
                    logs[run_key(IL_SECONDS)] = self.sbp_il_seconds
                if self._strategy.prunes_dataset:
                    logs.update(self._epochs.run_summary())
        super().log(logs, start_time)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Save each process's selection state with the checkpoint (see :mod:`hf_sbp.checkpoint_state`): before
        ``Trainer``'s files, so that a checkpoint pushed to the Hub carries it; like the random states, not with
        ``save_only_model``."""
        if not self.args.save_only_model:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            settings = checkpoint_state.selection_settings(self.sbp_args)
            state = dict(strategy=self.sbp_args.sbp_strategy, settings=settings, generator=self._generator.get_state())
            state.update(strategy_state=self._strategy.state_dict(), head_name=self._head_name)
            state.update(backprop_examples=self.sbp_backprop_examples, metrics=self._metrics.state_dict())
            state.update(example_cache=self._cache.state_dict() if self._cache is not None else None)
            state.update(pruning=self._epochs.history.state_dict() if self._strategy.prunes_dataset else None)
            state.update(irreducible_losses=self._il.state_dict())
            checkpoint_state.save_selection_state(folder, self.args.process_index, state)
        super()._save_checkpoint(model, trial)

    def _load_selection_state(self, checkpoint: str) -> None:
        state = checkpoint_state.load_selection_state(checkpoint, self.args.process_index, self._strategy.selective)
        if state is not None:
            checkpoint_state.check_same_settings(state, checkpoint_state.selection_settings(self.sbp_args), checkpoint)
            self._generator.set_state(state["generator"])
            self._strategy.load_state_dict(state["strategy_state"])
            self.sbp_backprop_examples = int(state["backprop_examples"])
            self._metrics.load_state_dict(state["metrics"])
            self._head_name = self._head_name or state["head_name"]
            if self._cache is not None and state.get("example_cache") is not None:
                self._cache.load_state_dict(state["example_cache"])
            if self._strategy.prunes_dataset and state.get("pruning") is not None:
                self._epochs.history.load_state_dict(state["pruning"])
            self._il.load_state_dict(state.get("irreducible_losses"))
