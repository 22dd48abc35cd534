"""``SelectiveBackpropTrainer``: a drop-in ``transformers.Trainer`` that backpropagates a subset per batch."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from ._utils import all_finite, synchronize
from .checkpoint_state import load_selection_state, save_selection_state
from .config import SelectiveBackpropConfig
from .head import HeadCapture, HeadScores, head_candidates, named_head, no_grad_logits, output_logits, resolve_head_call
from .model_card import MODEL_TAGS
from .schedule import selection_active
from .selection import gradient_match_error, index_rows, per_example_loss, subset_size
from .selection_metrics import SelectionMetrics, SelectionRecord, run_key
from .setup_checks import batch_labels, batch_problem_type, check_setup, checked_selection, model_config
from .strategies import SelectionBatch, SelectionStrategy

logger = logging.getLogger(__name__)


class SelectiveBackpropTrainer(Trainer):
    """A ``transformers.Trainer`` that runs forward + backward on a selected subset of each batch.

    Per training batch, for a strategy that ``needs_scoring`` (``gradmatch``, ``loss``): one forward pass without
    autograd over the whole batch (the scoring pass, in eval mode so dropout does not perturb the scores) captures
    the classification head's input with a hook; the strategy picks rows and weights; the ordinary forward and
    backward run on those rows only. ``random`` skips the scoring pass: exactly the cost of a smaller batch.
    ``none`` is the plain ``Trainer``. ``sbp_strategy`` may name any strategy registered with
    :func:`hf_sbp.register_strategy`.

    Loss normalisation: with ``m`` selected rows and weights ``w`` the subset loss is ``(1/m) sum_S w_i l_i``.
    Under gradient accumulation each micro-batch's loss is scaled by its share of the accumulated examples
    (``num_items_in_batch``, counted on full batches) or, without that count, divided by the accumulation steps:
    the accumulated gradient averages the micro-batches' estimates of their mean gradients, whether or not the
    model honours ``num_items_in_batch`` (BERT's ``forward`` does not), because the loss is computed here.

    Args:
        Those of ``transformers.Trainer``. ``args`` may be a plain ``TrainingArguments``: it then
        means the :class:`~hf_sbp.SelectiveBackpropConfig` defaults (gradient matching at keep 0.5).
    """

    _tag_names = list(MODEL_TAGS)

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *pargs, **kwargs):
        if args is None:
            args = SelectiveBackpropConfig()
        elif not isinstance(args, SelectiveBackpropConfig):
            args = SelectiveBackpropConfig.from_training_arguments(args)
        super().__init__(model, args, *pargs, **kwargs)
        self.args: SelectiveBackpropConfig
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        seed = self.args.sbp_seed if self.args.sbp_seed is not None else self.args.seed
        self._generator = torch.Generator().manual_seed(seed + self.args.process_index)
        self._strategy: SelectionStrategy = self.args.strategy_class()(self.args)
        self._head_name: str | None = self.args.sbp_head_module
        self._last_selection: SelectionRecord | None = None
        self._metrics = SelectionMetrics()
        self._warned_nonfinite = False
        self.sbp_backprop_examples = 0
        """Examples this process has run forward + backward on in this run (full batches for ``none``)."""
        check_setup(self)

    # ---- public read-only state --------------------------------------------------------------

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
    def runs_scoring_pass(self) -> bool:
        """Whether selective steps run the no-grad scoring pass (the strategy needs it, or it is diagnostic)."""
        return self._strategy.needs_scoring or (self._strategy.selective and self.args.sbp_diagnostic_scoring)

    # ---- scoring and selection ---------------------------------------------------------------

    def _model_config(self):
        return model_config(self.accelerator.unwrap_model(self.model), self.args.sbp_strategy)

    def _problem_type(self, labels: torch.Tensor) -> str:
        return batch_problem_type(self._model_config(), labels, self.args.label_smoothing_factor)

    def _head_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        unwrapped = self.accelerator.unwrap_model(model)
        if self._head_name is not None:
            return [(self._head_name, named_head(unwrapped, self._head_name))]
        return head_candidates(unwrapped, self._model_config().num_labels)

    def _head_features(self, capture: HeadCapture, logits: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The head's ``(n, d)`` input from a captured forward (and the head's name, remembered once found)."""
        pad_token_id = getattr(self._model_config(), "pad_token_id", None)
        self._head_name, features = resolve_head_call(capture, logits, inputs.get("input_ids"), pad_token_id)
        return features

    def score_batch(self, model: nn.Module, inputs: Mapping[str, Any]) -> HeadScores:
        """The scoring pass: a forward without autograd, in eval mode, over the whole batch, capturing the head's
        input. ``inputs`` are collated and on the model's device; ``labels`` are not passed to the model."""
        modules = self._head_modules(model)
        capture = HeadCapture(modules)
        with self.compute_loss_context_manager(), capture.capturing():
            logits = no_grad_logits(model, {key: value for key, value in inputs.items() if key != "labels"})
        features = self._head_features(capture, logits, inputs)
        return HeadScores(logits, features, dict(modules)[self._head_name].bias is not None)

    def select_batch(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the rows of one collated batch to backpropagate, and their loss weights.

        Args:
            model: the (possibly wrapped) model being trained.
            inputs: a dict of tensors with ``labels``, already on the model's device.

        Returns:
            ``(indices, weights)``: a LongTensor of distinct row indices and a float32 tensor of non-negative
            weights of the same length, on the CPU. The subset loss is ``(1/m) sum_S w_i l_i``. What was done is
            in :attr:`last_selection`.
        """
        indices, weights, self._last_selection = self._select(model, inputs)
        return indices, weights

    def _select(
        self, model: nn.Module, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, SelectionRecord]:
        labels = batch_labels(inputs)
        n = labels.shape[0]
        if not self._strategy.selective:
            return torch.arange(n), torch.ones(n), SelectionRecord(n, n, scored=False, selective=False)
        k = subset_size(n, self.args.sbp_keep)
        problem_type = self._problem_type(labels)
        batch = SelectionBatch(
            n, labels, problem_type, self._generator, self.state.global_step, self.args.label_smoothing_factor
        )
        record = SelectionRecord(n, k, scored=self.runs_scoring_pass, problem_type=problem_type)
        usable = True
        if record.scored:
            synchronize(labels.device)
            start = time.perf_counter()
            batch.logits, batch.features, batch.head_bias = self.score_batch(model, inputs)
            synchronize(labels.device)
            record.scoring_s = time.perf_counter() - start
            # Finite features can still overflow float32 in the Gram matrix (|h| around 1e19).
            usable = all_finite(batch.logits, batch.features) and all_finite(batch.gram)
        start = time.perf_counter()
        indices = weights = None
        if usable:
            indices, weights = checked_selection(*self._strategy.select(batch, k), n, self.args.sbp_strategy)
            if not all_finite(weights):
                indices = weights = None
            elif record.scored:
                record.grad_match_error = float(gradient_match_error(batch.gram, indices, weights))
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

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        """``Trainer.train``; the selection statistics start afresh, or from the checkpoint resumed."""
        self._metrics.reset()
        self.sbp_backprop_examples = 0
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint):
            self._load_selection_state(os.fspath(checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Select a subset of ``inputs`` with the strategy, then forward and backward on it."""
        if not self._strategy.selective:
            labels = inputs.get("labels")
            self.sbp_backprop_examples += int(labels.shape[0]) if isinstance(labels, torch.Tensor) else 0
            return super().training_step(model, inputs, num_items_in_batch)
        step_start = time.perf_counter()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        labels = batch_labels(inputs)
        n = labels.shape[0]
        args = self.args
        if selection_active(
            self.state.global_step, self.state.max_steps or 0, args.sbp_start, args.sbp_end, args.sbp_interrupt
        ):
            indices, weights, record = self._select(model, inputs)
        else:
            indices, weights = torch.arange(n), torch.ones(n)
            record = SelectionRecord(n, n, scored=False, selective=False, problem_type=self._problem_type(labels))
        index_start = time.perf_counter()
        # The weights follow the order of `indices` (OMP's is the order of selection), so the rows are
        # gathered unless they are exactly the batch in its order.
        unchanged = indices.numel() == n and torch.equal(indices, torch.arange(n))
        subset = dict(inputs) if unchanged else index_rows(inputs, indices, n)
        record.selection_s += time.perf_counter() - index_start

        sub_labels = subset.pop("labels")
        capture = HeadCapture(self._head_modules(model) if self._strategy.observes() else [])
        with self.compute_loss_context_manager(), capture.capturing():
            logits = output_logits(model(**subset))
            # The subset's rows were checked with the whole batch (in _select or the line above).
            losses = per_example_loss(logits, sub_labels, record.problem_type, args.label_smoothing_factor)
            loss = (weights.to(losses.device, losses.dtype) * losses).sum() / losses.numel()
        if capture.modules:
            observed = SelectionBatch(
                indices.numel(), sub_labels, record.problem_type, self._generator, self.state.global_step,
                args.label_smoothing_factor, logits=logits.detach(),
            )  # fmt: skip
            observed.features = self._head_features(capture, observed.logits, subset)
            self._strategy.observe(indices, observed)
        del logits, losses, subset

        if num_items_in_batch is not None:
            # This micro-batch's share of the accumulated examples, counted as the Trainer counts them.
            loss = loss * (labels.ne(-100).sum() / num_items_in_batch)
            if args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / self.current_gradient_accumulation_steps
        # As in Trainer.training_step: the loss is already scaled for accumulation, so DeepSpeed must not
        # divide it by the accumulation steps again.
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.accelerator.backward(loss, **({"scale_wrt_gas": False} if deepspeed else {}))

        synchronize(labels.device)
        step_s = time.perf_counter() - step_start
        self._last_selection = record
        self.sbp_backprop_examples += record.subset_size
        self._metrics.add(record.metrics(step_s))
        return loss.detach()

    def floating_point_ops(self, inputs: dict[str, torch.Tensor | Any]) -> int:
        """Forward + backward FLOPs of the last step: see :attr:`SelectionRecord.flops_factor`."""
        full = super().floating_point_ops(inputs)
        record = self._last_selection
        return full if record is None or not self._strategy.selective else int(full * record.flops_factor)

    # ---- logging and checkpoints -------------------------------------------------------------

    def _reduced_metrics(self, whole_run: bool = False) -> dict[str, float]:
        """Every process must call it, as every process calls ``log``."""
        return self._metrics.reduce(
            whole_run,
            self.args.world_size,
            lambda totals: self.accelerator.reduce(totals.to(self.args.device), reduction="sum").cpu(),
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
        super().log(logs, start_time)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Save each process's selection state with the checkpoint (see :mod:`hf_sbp.checkpoint_state`): before
        ``Trainer``'s files, so that a checkpoint pushed to the Hub carries it; like the random states, not with
        ``save_only_model``."""
        if not self.args.save_only_model:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            state = {"strategy": self.args.sbp_strategy, "generator": self._generator.get_state()}
            state.update(strategy_state=self._strategy.state_dict(), head_name=self._head_name)
            state.update(backprop_examples=self.sbp_backprop_examples, metrics=self._metrics.state_dict())
            save_selection_state(folder, self.args.process_index, state)
        super()._save_checkpoint(model, trial)

    def _load_selection_state(self, checkpoint: str) -> None:
        state = load_selection_state(checkpoint, self.args.process_index, warn_if_missing=self._strategy.selective)
        if state is not None:
            self._generator.set_state(state["generator"])
            self._strategy.load_state_dict(state["strategy_state"])
            self.sbp_backprop_examples = int(state["backprop_examples"])
            self._metrics.load_state_dict(state["metrics"])
            self._head_name = self._head_name or state["head_name"]

    # fmt: off
    def create_model_card(
        self, language: str | None = None, license: str | None = None, tags: str | list[str] | None = None,
        model_name: str | None = None, finetuned_from: str | None = None, tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None, **kwargs: Any,
    ) -> None:
        # fmt: on
        """Write ``README.md`` in ``output_dir``: the ``Trainer`` card's content plus the selection settings and
        statistics and the random-subset baseline, from the template ``model_cards/selective_backprop.md``.

        The arguments are those of ``transformers.Trainer.create_model_card`` (``language``, ``license``, ``tags``,
        ``model_name``, ``finetuned_from``, ``tasks``, ``dataset_tags``, ``dataset``, ``dataset_args``) plus
        ``label_noise``, ``label_noise_flipped``, ``baseline_results``, ``results`` and ``template``, described in
        :func:`hf_sbp.model_card.render_model_card`; values stored with :func:`hf_sbp.model_card.set_model_card_info`
        fill in the ones not given.
        """
        if not self.is_world_process_zero():
            return
        from .model_card import write_model_card

        write_model_card(
            self, language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
            tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args, **kwargs,
        )  # fmt: skip
