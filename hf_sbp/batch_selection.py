"""The selection work of :class:`~hf_sbp.SelectiveBackpropTrainer`, which the trainer only wires in.

One selective training step goes down this module once, in order: which rows to score, the scoring pass (a no-grad
forward capturing the head's input), the strategy's choice (checked, with the full batch as the fallback of a broken
one), the subset's inputs, ``Trainer.training_step`` on the subset (its ``compute_loss`` applies the selection
weights through :attr:`BatchSelector.step`), then what the subset's own forward shows the strategy and the example
cache, and the step's record. Around the run: the facts the strategy and the settings imply (which losses and passes
are needed), the example cache of a new run, and the selection metrics merged into ``log``.

:class:`BatchSelector` holds only the per-step state (the subset step, a warning flag): the strategy, the selection
generator, the example cache, the head's name and its capture are the trainer's, which its checkpoints save.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from . import head
from ._utils import all_finite, synchronize
from .core.padding import trim_padding, truncate_for_scoring
from .core.schedule import selection_active
from .core.selection import gradient_match_error, gram_cannot_overflow, index_rows, subset_size
from .example_cache import EXAMPLE_ID_KEY, ExampleStatsCache, check_indexable
from .head import HeadCapture, HeadNotFoundError, HeadScores
from .labels import batch_labels, batch_problem_type, model_config
from .selection_metrics import IL_SECONDS, SelectionRecord, run_key
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

logger = logging.getLogger("hf_sbp.trainer")  # the trainer's warnings, whichever module words them


class BatchSelector:
    """Scoring, selection and observation for one ``SelectiveBackpropTrainer``, a step at a time.

    Args:
        trainer: the trainer whose strategy, generator, example cache, head capture and settings it uses.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.step: SubsetStep | None = None
        """During a selective step's forward and backward: the subset's labels, weights and checks, which
        ``compute_loss`` reads (see :meth:`subset_loss`)."""
        self.loss_verified = False
        """Whether per-example losses were checked against the model's own loss (once per trainer)."""
        self.warned_nonfinite = False
        """Whether the fallback's warning was given (once per trainer, not per step)."""

    # ---- what the strategy and the trainer's settings imply ---------------------------------------

    @property
    def captures_head(self) -> bool:
        """Whether some forward pass captures the head's input: the scoring pass, or the subset's forward (for a
        strategy that observes it or keeps per-example statistics)."""
        strategy = self.trainer._strategy
        return strategy.selective and (
            self.trainer.runs_scoring_pass or strategy.observes() or strategy.uses_example_cache
        )

    @property
    def needs_example_losses(self) -> bool:
        """Whether the trainer computes per-example losses (to score, weight or observe rows), checked against the
        model's own loss; a random subset trains with the model's own loss and needs none."""
        strategy = self.trainer._strategy
        return strategy.selective and (
            self.trainer.runs_scoring_pass or strategy.weighted or strategy.observes() or strategy.uses_example_cache
        )

    @property
    def label_smoothing(self) -> float:
        """The label smoothing of the loss: ``label_smoothing_factor``, unless a ``compute_loss_func`` computes the
        loss instead (``Trainer`` then applies no smoothing, and neither does selection)."""
        trainer = self.trainer
        return 0.0 if trainer.compute_loss_func is not None else trainer.args.label_smoothing_factor

    @property
    def example_loss(self) -> Any:
        """With a ``compute_loss_func``: the per-example losses it defines, ``(logits, labels) -> (n,)``, which
        selection scores and weights rows by (see :func:`hf_sbp.subset_loss.custom_example_losses`); else ``None``
        (the rule of ``*ForSequenceClassification`` models)."""
        custom = self.trainer.compute_loss_func
        if custom is None:
            return None
        return functools.partial(custom_example_losses, custom, strategy=self.trainer.sbp_args.sbp_strategy)

    def unwrapped(self, model: nn.Module) -> nn.Module:
        """``model`` without the wrappers of ``accelerate`` (DDP, mixed precision) and of ``torch.compile``, whose
        ``OptimizedModule`` names every module with an ``_orig_mod.`` prefix: the model whose modules the user named."""
        return self.trainer.accelerator.unwrap_model(model, keep_torch_compile=False)

    def model_config(self) -> Any:
        """The trainer's model's config (checked to be one that selection can read)."""
        return model_config(self.unwrapped(self.trainer.model), self.trainer.sbp_args.sbp_strategy)

    def problem_type(self, labels: torch.Tensor) -> str:
        """The loss's problem type for a batch with these ``labels`` (checked against the model's config)."""
        return batch_problem_type(self.model_config(), labels, self.label_smoothing)

    def new_cache(self) -> ExampleStatsCache | None:
        """An empty per-example statistics cache over the training set, for a strategy that uses one (else None)."""
        trainer = self.trainer
        if not trainer._strategy.uses_example_cache or trainer.train_dataset is None:
            return None
        check_indexable(trainer.train_dataset)
        sbp = trainer.sbp_args
        seed = sbp.sbp_seed if sbp.sbp_seed is not None else trainer.args.seed
        projection, exchanged = sbp.sbp_cache_projection_dim, trainer.args.world_size > 1
        gradients = trainer._strategy.caches_gradients
        return ExampleStatsCache(len(trainer.train_dataset), projection, seed, exchanged, gradients)

    # ---- the head --------------------------------------------------------------------------------

    def attach_head_hooks(self, model: nn.Module) -> None:
        """Hook the head (candidates) of ``model`` now, before its first forward: a model that ``torch_compile``
        compiles runs only the hooks it had when it was traced (see :class:`~hf_sbp.head.HeadCapture`)."""
        if self.captures_head:
            self.trainer._capture.attach(self.head_modules(model))

    def head_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The head of ``model`` as ``[(name, module)]``: the named one once known, else the candidates."""
        trainer = self.trainer
        unwrapped = self.unwrapped(model)
        if trainer._head_name is not None:
            return [(trainer._head_name, head.named_head(unwrapped, trainer._head_name))]
        return head.head_candidates(unwrapped, self.model_config().num_labels)

    def is_compiled(self, model: nn.Module) -> bool:
        """Whether ``model`` is a ``torch.compile``'d model (possibly inside accelerate's wrappers)."""
        return self.trainer.accelerator.unwrap_model(model) is not self.unwrapped(model)

    def check_compiled_capture(self, model: nn.Module, capture: HeadCapture) -> None:
        """The error of a compiled model whose graph was traced without the head hooks (so they never fire), rather
        than the misleading one of a model without a head."""
        if not capture.calls and self.is_compiled(model):
            raise HeadNotFoundError(
                f"the classification head of the compiled model ({[name for name, _ in capture.modules]}) recorded "
                "nothing: its compiled graph was traced without the trainer's head hooks (before the trainer was "
                "built, or for another model of its class in this process), and a compiled model runs only the hooks "
                "it was traced with. Call torch.compiler.reset() before calling select_batch or score_batch by hand "
                "on such a model (train() does it)."
            )

    def _pad_token_id(self) -> int | None:
        return getattr(self.model_config(), "pad_token_id", None)

    # ---- before the subset's forward and backward ------------------------------------------------

    def score(self, model: nn.Module, inputs: Mapping[str, Any]) -> HeadScores:
        """The scoring pass (see :meth:`~hf_sbp.SelectiveBackpropTrainer.score_batch`)."""
        trainer = self.trainer
        label_key, max_length = trainer.label_key, trainer.sbp_args.sbp_scoring_max_length
        if max_length is not None:  # a cheaper pass over each row's first L tokens
            inputs = truncate_for_scoring(inputs, max_length, label_names=[label_key])
        modules, capture = self.head_modules(model), trainer._capture
        # The training forward's autocast: accelerate's, which the prepared model applies itself (nested, it changes
        # nothing) and which a model not yet prepared (the check when the trainer is built, select_batch) needs.
        with trainer.compute_loss_context_manager(), trainer.accelerator.autocast(), capture.capturing(modules):
            logits = head.no_grad_logits(model, {key: value for key, value in inputs.items() if key != label_key})
        self.check_compiled_capture(model, capture)
        trainer._head_name, features = head.resolve_head_call(
            capture, logits, inputs.get("input_ids"), self._pad_token_id()
        )
        capture.calls = []  # the trainer keeps its capture: hold no batch's activations past their use
        return HeadScores(logits.float(), features, dict(modules)[trainer._head_name].bias is not None)

    def batch(self, labels: torch.Tensor, problem_type: str | None, *scores: Any) -> SelectionBatch:
        """A :class:`SelectionBatch` of these rows; ``scores``: logits, features, head bias, in that order."""
        trainer = self.trainer
        step, smoothing, loss = trainer.state.global_step, self.label_smoothing, self.example_loss
        return SelectionBatch(labels.shape[0], labels, problem_type, trainer._generator, step, smoothing, *scores,
                              example_loss=loss)  # fmt: skip

    def rows_to_score(self, batch: SelectionBatch, ids: torch.Tensor | None) -> torch.Tensor:
        """The rows of ``batch`` the scoring pass runs on (none, all, or the strategy's choice); for a strategy that
        ``uses_example_cache``, fills in the batch's dataset indices, cached statistics and irreducible losses."""
        trainer = self.trainer
        strategy, cache = trainer._strategy, trainer._cache
        if strategy.uses_example_cache:
            if cache is None or ids is None:
                raise ValueError(
                    f"sbp_strategy={trainer.sbp_args.sbp_strategy!r} needs each row's dataset index under "
                    f"{EXAMPLE_ID_KEY!r} and a train_dataset to index: the trainer's training dataloader adds it; "
                    "a batch given to select_batch or training_step by hand must carry it too."
                )
            batch.example_ids = ids.detach().cpu().long()
            batch.cached = cache.lookup(ids, trainer.state.epoch or 0.0)
            if strategy.needs_irreducible_loss:
                batch.irreducible_losses = trainer._il.rows(batch.example_ids)
        if not trainer.runs_scoring_pass:
            return torch.zeros(0, dtype=torch.long)
        if not strategy.needs_scoring:  # diagnostic scoring of a random subset
            return torch.arange(batch.n)
        rows = torch.as_tensor(strategy.rows_to_score(batch)).cpu().long().reshape(-1).unique()
        if trainer.args.world_size > 1 and type(strategy).rows_to_score is not SelectionStrategy.rows_to_score:
            # DDP's forward broadcasts the model's buffers, a collective: every process runs the scoring forward or
            # none does. One with no row of its own to score scores its first (fresh statistics, nothing else).
            flag = torch.tensor([float(rows.numel() > 0)], device=trainer.args.device)
            anyone_scores = float(trainer.accelerator.reduce(flag, "sum")) > 0  # on every process, at every step
            if anyone_scores and rows.numel() == 0:
                rows = torch.zeros(1, dtype=torch.long)
        return rows

    def select(
        self, model: nn.Module, inputs: Mapping[str, Any], ids: torch.Tensor | None, active: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, SelectionRecord]:
        """``(indices, weights, record)`` for one collated batch (see
        :meth:`~hf_sbp.SelectiveBackpropTrainer.select_batch`); the whole batch when the strategy does not select or
        ``active`` is False, and as the fallback of a scoring pass or a choice that is not finite."""
        trainer = self.trainer
        strategy = trainer._strategy
        labels = batch_labels(inputs, trainer.label_key)
        n = labels.shape[0]
        problem_type = self.problem_type(labels) if self.needs_example_losses else None
        if not (strategy.selective and active):
            record = SelectionRecord(n, n, scored=False, selective=False, problem_type=problem_type)
            return torch.arange(n), torch.ones(n), record
        k = subset_size(n, trainer.sbp_args.sbp_effective_keep)
        batch = self.batch(labels, problem_type)
        rows = self.rows_to_score(batch, ids)
        if strategy.prunes_dataset:
            batch.epoch_weights = trainer._epochs.weights(batch.example_ids)
        record = SelectionRecord(n, k, rows.numel() > 0, problem_type=problem_type, scored_rows=rows.numel())
        record.scoring_strategy = strategy.needs_scoring
        usable = True
        if record.scored:
            synchronize(labels.device)
            start = time.perf_counter()
            if rows.numel() < n:
                inputs, batch.scored_rows = index_rows(inputs, rows, n), rows
            batch.logits, batch.features, batch.head_bias = trainer.score_batch(model, inputs)
            synchronize(labels.device)
            record.scoring_s = time.perf_counter() - start
            # Finite features can still overflow float32 in the Gram matrix (|h| around 1e19). Bounded residuals and
            # features rule that out without reading the n x n matrix; otherwise the matrix is checked.
            usable = all_finite(batch.logits, batch.features) and (
                gram_cannot_overflow(batch.residuals, batch.features, batch.head_bias) or all_finite(batch.gram)
            )
        cache = trainer._cache
        if usable and cache is not None:
            if record.scored:
                scored, epoch = batch.example_ids[rows], trainer.state.epoch or 0.0
                cache.write(scored, epoch, batch.losses, batch.residuals, batch.features, batch.head_bias)
            batch.cached = cache.lookup(batch.example_ids, trainer.state.epoch or 0.0)
        start = time.perf_counter()
        indices = weights = None
        if usable:
            indices, weights = checked_selection(*strategy.select(batch, k), n, trainer.sbp_args.sbp_strategy)
            record.strategy_metrics = strategy.step_metrics()
            if bool(weights.isnan().all()):  # the strategy gave up on this batch (gradmatch: a broken estimate)
                indices = weights = None
            elif record.scored and batch.scored_rows is None:
                # Of the gradient actually trained, (1/m) sum_S w_i g_i: magnitude included.
                trained = gradient_match_error(
                    batch.gram, indices, weights / weights.numel(), normalize=False, target=batch.gram_target
                )
                record.grad_match_error = float(trained)
        if indices is None:
            if not self.warned_nonfinite:
                logger.warning(
                    "The scoring pass produced non-finite logits, head features or selection weights; this step "
                    "trains on the full batch. Such steps are counted in the logs as sbp/fallback_steps."
                )
                self.warned_nonfinite = True
            indices, weights, record.fallback = torch.arange(n), torch.ones(n), True
        record.subset_size = indices.numel()
        synchronize(labels.device)
        record.selection_s = time.perf_counter() - start
        return indices, weights, record

    def subset_inputs(
        self,
        inputs: dict[str, Any],
        labels: torch.Tensor,
        indices: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None,
        record: SelectionRecord,
    ) -> tuple[dict[str, Any], torch.Tensor | int | None]:
        """The subset's inputs (the rows of ``indices``, in that order, which the weights follow; ``inputs`` itself
        when they are the batch, whose labels are ``labels``) and its ``num_items_in_batch``; their time counts as
        selection."""
        start, trainer, n = time.perf_counter(), self.trainer, labels.shape[0]
        if indices.numel() == n and torch.equal(indices, torch.arange(n)):
            return inputs, num_items_in_batch
        subset = index_rows(inputs, indices, n)
        if trainer.sbp_args.sbp_trim_padding:  # drop the padding columns that no selected row needs
            multiple = getattr(trainer.data_collator, "pad_to_multiple_of", None)
            subset = trim_padding(subset, pad_to_multiple_of=multiple, label_names=[trainer.label_key])
        num_items_in_batch = subset_num_items(num_items_in_batch, subset[trainer.label_key], labels)
        record.selection_s += time.perf_counter() - start
        return subset, num_items_in_batch

    # ---- the step ---------------------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None,
        train_subset: Callable[[dict[str, Any], torch.Tensor | int | None], torch.Tensor],
    ) -> torch.Tensor:
        """One training step on a collated batch; returns its loss. The batch's dataset indices
        (:data:`~hf_sbp.example_cache.EXAMPLE_ID_KEY`, where the strategy reads them) are never passed to the model.
        A non-selective strategy trains the whole batch with ``train_subset(inputs, num_items_in_batch)``
        (``Trainer.training_step``). A selective one selects the batch's rows, then ``train_subset(subset,
        num_items_in_batch)`` (the forward and backward, whose ``compute_loss`` applies the weights through
        :attr:`step`), then observes and counts."""
        trainer = self.trainer
        ids = inputs.get(EXAMPLE_ID_KEY)
        if ids is not None:  # a new dict: the caller's batch is kept
            inputs = {key: value for key, value in inputs.items() if key != EXAMPLE_ID_KEY}
        if not trainer._strategy.selective:
            labels = inputs.get(trainer.label_key)
            trainer.sbp_backprop_examples += int(labels.shape[0]) if isinstance(labels, torch.Tensor) else 0
            return train_subset(inputs, num_items_in_batch)
        step_start = time.perf_counter()
        inputs = trainer._prepare_inputs(inputs)
        labels, sbp = batch_labels(inputs, trainer.label_key), trainer.sbp_args
        active = trainer._strategy.prunes_dataset or selection_active(
            trainer.state.global_step, trainer.state.max_steps or 0, sbp.sbp_start, sbp.sbp_end, sbp.sbp_interrupt
        )
        indices, weights, record = self.select(model, inputs, ids, active)
        subset, num_items_in_batch = self.subset_inputs(inputs, labels, indices, num_items_in_batch, record)
        uniform = bool((weights == 1).all())
        if not uniform and record.problem_type is None:
            # A strategy that does not declare `weighted` (nor scores rows) returned weights: they are applied as a
            # weighted strategy's are, with per-example losses checked against the model's loss at their first use.
            record.problem_type = self.problem_type(labels)
        verify = (self.needs_example_losses or not uniform) and not self.loss_verified
        self.step = SubsetStep(subset[trainer.label_key], record.problem_type, None if uniform else weights, verify)
        observed_modules = self.observed_modules(model)
        try:
            with trainer._capture.capturing(observed_modules) if observed_modules else contextlib.nullcontext():
                loss = train_subset(subset, num_items_in_batch)
            step = self.step
        finally:
            self.step = None
        if not (uniform or step.applied or trainer.supports_selection_weights):
            step.weights_not_applied(type(trainer).__name__, sbp.sbp_strategy)
        if observed_modules:  # what the gradient forward computed for the subset's rows, for the strategy's history
            self.observe(model, subset, indices, ids, record)
        self.end_step(model)
        synchronize(labels.device)
        trainer._last_selection = record
        trainer.sbp_backprop_examples += record.subset_size
        trainer._metrics.add(record.metrics(time.perf_counter() - step_start))
        return loss

    @property
    def reweights_loss(self) -> bool:
        """Whether ``compute_loss`` is inside a selective step whose subset loss :meth:`subset_loss` must reweight
        or check; otherwise ``Trainer.compute_loss`` stands as it is."""
        return self.step is not None and (self.step.weights is not None or self.step.verify)

    def subset_loss(
        self, loss: torch.Tensor, outputs: Any, num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        """The subset's loss with the selection weights applied (see :mod:`hf_sbp.subset_loss`), from
        ``Trainer.compute_loss``'s ``loss`` and ``outputs`` on the subset; the first time, the per-example losses are
        checked against the model's own ``loss``."""
        step, trainer = self.step, self.trainer
        logits, custom = head.output_logits(outputs), trainer.compute_loss_func
        losses = example_losses(
            logits, step.labels, step.problem_type, self.label_smoothing, trainer.sbp_args.sbp_strategy, custom
        )
        if step.verify:
            processes = trainer.accelerator.num_processes
            verify_model_loss(
                loss, losses, step.problem_type, num_items_in_batch, processes, custom is not None, logits=logits
            )
            self.loss_verified = True
        if step.weights is not None:
            loss, step.applied = weighted_subset_loss(loss, losses, step.weights), True
        return loss

    # ---- after it --------------------------------------------------------------------------------

    def observed_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The head modules to capture in the subset's forward: for a strategy that observes it or an example cache."""
        trainer = self.trainer
        return self.head_modules(model) if trainer._strategy.observes() or trainer._cache else []

    def observe(
        self, model: nn.Module, subset: Mapping[str, Any], indices: torch.Tensor, ids: torch.Tensor | None,
        record: SelectionRecord,
    ) -> None:  # fmt: skip
        """Give what the subset's forward computed for its rows (captured at the head) to the strategy's history and
        the example cache."""
        trainer = self.trainer
        capture, strategy, cache = trainer._capture, trainer._strategy, trainer._cache
        self.check_compiled_capture(model, capture)
        trainer._head_name, features, logits = head.captured_head_call(
            capture, subset.get("input_ids"), self._pad_token_id()
        )
        capture.calls = []
        bias = dict(capture.modules)[trainer._head_name].bias is not None
        observed = self.batch(subset[trainer.label_key], record.problem_type, logits, features, bias)
        observed.example_ids = ids[indices].cpu() if ids is not None else None
        if strategy.observes():
            strategy.observe(indices, observed)
        if cache is not None:
            epoch = trainer.state.epoch or 0.0
            cache.write(observed.example_ids, epoch, observed.losses, observed.residuals, features, bias)

    def end_step(self, model: nn.Module) -> None:
        """What every process does at the end of a selective step: exchange the example cache's new rows, and the
        strategy's :meth:`~hf_sbp.SelectionStrategy.end_step` (with a sum across processes under DDP)."""
        trainer = self.trainer
        cache, strategy, distributed = trainer._cache, trainer._strategy, trainer.args.world_size > 1
        if cache is not None and distributed and trainer._head_name is not None:
            unwrapped_head = head.named_head(self.unwrapped(model), trainer._head_name)
            cache.exchange(self._gather_rows, unwrapped_head.out_features, unwrapped_head.in_features)
        if strategy.ends_steps():
            strategy.end_step(self._sum_across if distributed else None)

    def _sum_across(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every process (a collective: every process must call it), on the CPU."""
        return self.trainer.accelerator.reduce(values.to(self.trainer.args.device), "sum").cpu()

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's ``rows``, padded along dim 0 with -1 to the longest, concatenated in process order."""
        accelerator = self.trainer.accelerator
        rows = accelerator.pad_across_processes(rows.to(self.trainer.args.device), dim=0, pad_index=-1)
        return accelerator.gather(rows)

    # ---- around the run ----------------------------------------------------------------------------

    def reset_compiled_graphs(self, model: nn.Module) -> None:
        """Before training a compiled model whose head is captured: forget the compiled graphs of this process."""
        if self.captures_head and (self.trainer.args.torch_compile or self.is_compiled(model)):
            # Compiled graphs are cached per code object, shared by every instance of the model's class, and dynamo
            # does not guard on hooks: a graph traced earlier in this process (another trainer's model, this model
            # compiled and run before its head was hooked) would run here without the head hooks. Resetting makes the
            # first compiled call trace this model, hooks included.
            torch.compiler.reset()

    def with_selection_metrics(self, logs: dict[str, float]) -> dict[str, float]:
        """``logs`` with the selection metrics merged in: averaged since the last log (and across processes) into
        training logs; their whole-run values (``train_sbp/...``, the last partial logging interval included) into
        the end-of-training summary, in place, so that ``train()``'s returned metrics hold them too. Every process
        must call it, as every process calls ``log``."""
        trainer = self.trainer
        strategy = trainer._strategy
        if not strategy.selective:
            return logs
        if "loss" in logs and "eval_loss" not in logs:
            return {**logs, **trainer._metrics.reduce(False, trainer.args.world_size, self._sum_across)}
        if "train_runtime" in logs:
            whole_run = trainer._metrics.reduce(True, trainer.args.world_size, self._sum_across)
            logs.update({run_key(key): value for key, value in whole_run.items()})
            if strategy.needs_irreducible_loss:
                logs[run_key(IL_SECONDS)] = trainer.sbp_il_seconds
            logs.update(trainer._epochs.run_summary())  # nothing unless the strategy prunes the dataset
        return logs
