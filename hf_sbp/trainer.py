"""``SelectiveBackpropTrainer``: a drop-in ``transformers.Trainer`` that backpropagates a subset per batch."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainingArguments

from .config import SelectiveBackpropConfig
from .head import HEAD_OVERRIDE_OPTION, HeadCapture, HeadNotFoundError, head_candidates, named_head, resolve_head_call
from .selection import (
    LossHistory,
    gradient_match_error,
    head_residuals,
    index_rows,
    infer_problem_type,
    last_layer_gram,
    loss_cdf_sample,
    loss_rank_sample,
    normalize_weights,
    omp_gram,
    per_example_loss,
    random_subset,
    subset_size,
)

logger = logging.getLogger(__name__)

SBP_STATE_NAME = "sbp_state_rank{}.pt"
MODEL_TAGS = ["hf_sbp", "selective-backprop"]
# The metrics averaged over the steps of each logging interval, in a fixed order so that every
# process contributes the same tensor to the cross-process reduction.
METRIC_KEYS = (
    "sbp/backprop_fraction",
    "sbp/scoring_time_share",
    "sbp/selection_time_share",
    "sbp/grad_match_error",
    "sbp/selective_steps",
    "sbp/fallback_steps",
)


@dataclass
class SelectionRecord:
    """What :meth:`SelectiveBackpropTrainer.select_batch` did for the last batch."""

    batch_size: int
    subset_size: int
    scored: bool
    selective: bool = True
    scoring_s: float = 0.0
    selection_s: float = 0.0
    grad_match_error: float = math.nan
    fallback: bool = False
    problem_type: str | None = None


class SelectiveBackpropTrainer(Trainer):
    """A ``transformers.Trainer`` that runs forward + backward on a selected subset of each batch.

    Per training batch, for ``sbp_strategy`` ``"gradmatch"`` or ``"loss"``: one forward pass without
    autograd over the whole batch (the scoring pass, in eval mode so dropout does not perturb the
    scores) captures the classification head's input with a hook; the examples are scored from the
    head's last-layer gradients; :meth:`select_batch` picks ``k = round(sbp_keep * n)`` rows with
    weights; and the ordinary forward and backward run on those rows only. ``"random"`` skips the
    scoring pass and takes ``k`` uniform rows: exactly the cost of a smaller batch. ``"none"`` is the
    plain ``Trainer``.

    Loss normalisation: with ``m`` selected rows and weights ``w`` the subset loss is the weighted mean
    ``(1/m) sum_S w_i l_i`` of the per-example losses. Across gradient accumulation, each micro-batch's
    loss is scaled by its share of the accumulated examples (``num_items_in_batch``, counted on the
    full batches) or, when the Trainer does not pass that count, divided by the number of
    accumulation steps; so the accumulated gradient is the average of the micro-batches' estimates of
    their own mean gradients, as with full batches. This does not depend on whether the model itself
    honours ``num_items_in_batch`` (BERT's ``forward`` does not), because the loss is computed here.

    Args:
        Those of ``transformers.Trainer``. ``args`` may be a plain ``TrainingArguments``: it then
        means the :class:`~hf_sbp.SelectiveBackpropConfig` defaults (gradient matching at keep 0.5).
    """

    _tag_names = MODEL_TAGS

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
        self._sbp_generator = torch.Generator().manual_seed(seed + self.args.process_index)
        self._sbp_loss_history = LossHistory(self.args.sbp_loss_history_size)
        self._sbp_head_name: str | None = self.args.sbp_head_module
        self._sbp_last: SelectionRecord | None = None
        # Per logging interval, and over the whole run (for the end-of-training summary).
        self._sbp_metric_sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
        self._sbp_metric_counts = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
        self._sbp_run_sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
        self._sbp_run_counts = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
        self._sbp_step_flops_factor: float | None = None
        self._sbp_warned_nonfinite = False
        self.sbp_backprop_examples = 0
        """Examples this process has run forward + backward on so far (full batches for ``none``)."""
        self._validate_sbp_setup()

    # ---- set-up checks -----------------------------------------------------------------------

    @property
    def _sbp_scores(self) -> bool:
        strategy = self.args.sbp_strategy
        return strategy in ("gradmatch", "loss") or (strategy == "random" and self.args.sbp_diagnostic_scoring)

    def _sbp_config(self):
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        if config is None or getattr(config, "num_labels", None) is None:
            raise ValueError(
                f"sbp_strategy={self.args.sbp_strategy!r} needs a model with a `config.num_labels` (a "
                "transformers *ForSequenceClassification model); use sbp_strategy='none' for other models."
            )
        return config

    def _validate_sbp_setup(self) -> None:
        """Raise before training for set-ups that selection cannot serve."""
        # The arguments may have been edited after they were built; check them again.
        self.args.validate_sbp()
        dataset = self.train_dataset
        if dataset is not None and not isinstance(dataset, torch.utils.data.IterableDataset):
            try:
                size = len(dataset)
            except TypeError:
                size = None
            if size == 0:
                raise ValueError(
                    "train_dataset is empty (0 examples); training needs at least one example per batch. Check the "
                    "dataset's split and filters."
                )
        if self.args.sbp_strategy == "none":
            return
        if self.compute_loss_func is not None:
            raise ValueError(
                f"compute_loss_func cannot be combined with sbp_strategy={self.args.sbp_strategy!r}: selective "
                "backprop weights per-example losses it computes itself. Use sbp_strategy='none'."
            )
        config = self._sbp_config()
        if self.args.label_smoothing_factor and config.problem_type not in (None, "single_label_classification"):
            raise ValueError(
                f"label_smoothing_factor={self.args.label_smoothing_factor} applies to single-label classification "
                f"only, but the model's problem_type is {config.problem_type!r}."
            )
        if not self._sbp_scores:
            return
        if self.args.n_gpu > 1:
            raise ValueError(
                f"sbp_strategy={self.args.sbp_strategy!r} does not support single-process multi-GPU training "
                f"(torch.nn.DataParallel over n_gpu={self.args.n_gpu} GPUs): the scoring pass's head capture needs "
                "one replica per process. Launch one process per GPU with `torchrun` or `accelerate launch`, or "
                "make one GPU visible (CUDA_VISIBLE_DEVICES)."
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self._sbp_head_name is not None:
            named_head(unwrapped, self._sbp_head_name)
        elif not head_candidates(unwrapped, config.num_labels):
            raise HeadNotFoundError(
                f"{type(unwrapped).__name__} has no nn.Linear with out_features equal to num_labels="
                f"{config.num_labels}, so its classification head cannot be found. Set {HEAD_OVERRIDE_OPTION} to the "
                "name of the head's final nn.Linear."
            )
        self._check_label_column(config)
        self._probe_first_batch()

    def _check_label_column(self, config) -> None:
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
        dataset = self.train_dataset
        if not isinstance(dataset, datasets.Dataset):
            return
        for name in ("labels", "label", "label_ids"):
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
            return

    def _probe_batch(self) -> dict[str, Any] | None:
        """The first (at most) two training examples, collated as training will collate them; ``None`` if the
        dataset cannot be sampled up front (iterable, unsized) or the collator fails on them."""
        dataset = self.train_dataset
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
            return None
        try:
            count = min(2, len(dataset))
            collator = self.data_collator
            try:
                import datasets
            except ImportError:  # pragma: no cover - datasets is a dependency
                datasets = None
            if datasets is not None and isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset.select(range(count)), description="training")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="training")
            return self._prepare_inputs(collator([dataset[i] for i in range(count)]))
        except Exception as error:  # training will report a collation problem in its own words
            logger.info(f"Skipping the construction-time check of the first batch: {error!r}")
            return None

    def _probe_first_batch(self) -> None:
        """Run the checks of the first training step on the first examples, at construction: missing labels,
        the ignore index, and a head that cannot be found or does not reproduce the logits raise now rather
        than at the first step. Random states are left untouched, so training is unaffected."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return  # parameters may be sharded or not yet materialised before `train`
        if any(p.device.type == "meta" for p in self.model.parameters()):
            return
        python_state, numpy_state = random.getstate(), np.random.get_state()
        devices = [self.args.device] if self.args.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                batch = self._probe_batch()
                if batch is None:
                    return
                self._problem_type(self._batch_labels(batch))
                if self._sbp_scores:
                    self._scoring_pass(self.model, batch)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    # ---- selection ---------------------------------------------------------------------------

    def _sync(self, device: torch.device) -> None:
        # Timings of asynchronous devices need a barrier to mean anything.
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _batch_labels(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        if "labels" not in inputs or inputs["labels"] is None:
            raise ValueError(
                f"the batch has no 'labels' (its keys are {sorted(inputs)}); selective backprop scores examples by "
                "their loss, so the collator must return labels."
            )
        labels = inputs["labels"]
        if labels.dim() == 0 or labels.shape[0] == 0:
            raise ValueError(f"the batch's labels have shape {tuple(labels.shape)}; expected one row per example.")
        return labels

    def _problem_type(self, labels: torch.Tensor) -> str:
        config = self._sbp_config()
        problem_type = infer_problem_type(config.num_labels, labels, config.problem_type)
        if problem_type == "single_label_classification" and bool((labels == -100).any()):
            raise ValueError(
                "the batch's labels contain the ignore index -100; every example needs a label for selective "
                "backprop (filter unlabelled rows out of the training set)."
            )
        if self.args.label_smoothing_factor and problem_type != "single_label_classification":
            raise ValueError(
                f"label_smoothing_factor={self.args.label_smoothing_factor} applies to single-label classification "
                f"only; these labels make the problem {problem_type!r}."
            )
        return problem_type

    def _scoring_pass(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The no-grad forward over the full batch.

        Returns the logits, the head's ``(n, d)`` input, and whether the head has a bias."""
        unwrapped = self.accelerator.unwrap_model(model)
        config = self._sbp_config()
        if self._sbp_head_name is not None:
            modules = [(self._sbp_head_name, named_head(unwrapped, self._sbp_head_name))]
        else:
            modules = head_candidates(unwrapped, config.num_labels)
        capture = HeadCapture(modules)
        forward_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.compute_loss_context_manager(), capture.capturing():
                outputs = model(**forward_inputs)
        finally:
            model.train(was_training)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        name, features = resolve_head_call(
            capture, logits, inputs.get("input_ids"), getattr(config, "pad_token_id", None)
        )
        self._sbp_head_name = name
        return logits.detach(), features, dict(modules)[name].bias is not None

    def select_batch(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the rows of one collated batch to backpropagate, and their loss weights.

        Args:
            model: the (possibly wrapped) model being trained.
            inputs: a dict of tensors with ``labels``, already on the model's device.

        Returns:
            ``(indices, weights)``: a LongTensor of distinct row indices and a float32 tensor of
            non-negative weights of the same length, on the CPU. The subset loss is
            ``(1/m) sum_S w_i l_i``; loss-based and random subsets have weight 1.
        """
        labels = self._batch_labels(inputs)
        n = labels.shape[0]
        k = subset_size(n, self.args.sbp_keep)
        strategy = self.args.sbp_strategy
        if strategy == "none":
            self._sbp_last = SelectionRecord(n, n, scored=False)
            return torch.arange(n), torch.ones(n)
        problem_type = self._problem_type(labels)
        if strategy == "random" and not self.args.sbp_diagnostic_scoring:
            start = time.perf_counter()
            indices = random_subset(n, k, self._sbp_generator)
            self._sbp_last = SelectionRecord(
                n, k, scored=False, selection_s=time.perf_counter() - start, problem_type=problem_type
            )
            return indices, torch.ones(k)

        device = labels.device
        self._sync(device)
        start = time.perf_counter()
        logits, features, head_bias = self._scoring_pass(model, inputs)
        self._sync(device)
        scored_at = time.perf_counter()

        record = SelectionRecord(n, k, scored=True, problem_type=problem_type)
        indices = weights = None
        if bool(torch.isfinite(logits).all()) and bool(torch.isfinite(features).all()):
            eps = self.args.label_smoothing_factor
            residuals = head_residuals(logits, labels, problem_type, eps)
            gram = last_layer_gram(residuals, features, bias=head_bias)
            # Finite features can still overflow float32 in the Gram matrix (|h| around 1e19).
            if bool(torch.isfinite(gram).all()):
                if strategy == "gradmatch":
                    indices, weights = self._gradmatch(gram, k)
                elif strategy == "loss":
                    losses = per_example_loss(logits, labels, problem_type, eps)
                    indices = self._loss_based(losses, k)
                    weights = torch.ones(indices.numel())
                else:
                    indices = random_subset(n, k, self._sbp_generator)
                    weights = torch.ones(k)
                indices, weights = indices.cpu(), weights.float().cpu()
                if bool(torch.isfinite(weights).all()):
                    record.subset_size = indices.numel()
                    record.grad_match_error = float(gradient_match_error(gram, indices, weights))
                else:
                    indices = weights = None
        if indices is None:
            if not self._sbp_warned_nonfinite:
                logger.warning(
                    "The scoring pass produced non-finite logits, head features or selection weights; this step "
                    "trains on the full batch. Such steps are counted in the logs as sbp/fallback_steps."
                )
                self._sbp_warned_nonfinite = True
            indices, weights = torch.arange(n), torch.ones(n)
            record.subset_size, record.fallback = n, True
        self._sync(device)
        record.scoring_s = scored_at - start
        record.selection_s = time.perf_counter() - scored_at
        self._sbp_last = record
        return indices, weights

    def _gradmatch(self, gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ridge = self.args.sbp_omp_ridge * float(torch.diagonal(gram).double().mean())
        result = omp_gram(
            gram,
            k,
            ridge=ridge,
            nonnegative=self.args.sbp_omp_nonnegative,
            tol=self.args.sbp_omp_tol or None,
        )
        if result.indices.numel() == 0:
            # The batch's mean gradient is zero (or every gradient is): any subset matches it
            # equally well, so fall back to a uniform one.
            n = gram.shape[0]
            return random_subset(n, k, self._sbp_generator), torch.ones(k)
        return result.indices, normalize_weights(result.weights, self.args.sbp_weight_normalization)

    def _loss_based(self, losses: torch.Tensor, k: int) -> torch.Tensor:
        if self.args.sbp_loss_variant == "composer":
            return loss_rank_sample(losses, k, self._sbp_generator)
        self._sbp_loss_history.push(losses)
        return loss_cdf_sample(
            losses,
            self._sbp_loss_history.values(),
            self.args.sbp_effective_loss_beta,
            self.args.sbp_loss_min_prob,
            self._sbp_generator,
        )

    def _selection_active(self) -> bool:
        """Whether this step selects. It depends only on the step number, never on the data, so every
        process makes the same decision and none skips a collective."""
        max_steps = self.state.max_steps or 0
        fraction = self.state.global_step / max_steps if max_steps > 0 else 0.0
        in_window = self.args.sbp_start <= fraction < self.args.sbp_end
        interrupt = self.args.sbp_interrupt
        interrupted = interrupt > 0 and (self.state.global_step + 1) % interrupt == 0
        return in_window and not interrupted

    # ---- training ----------------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Select a subset of ``inputs`` with :meth:`select_batch`, then forward and backward on it."""
        if self.args.sbp_strategy == "none":
            labels = inputs.get("labels")
            self.sbp_backprop_examples += int(labels.shape[0]) if isinstance(labels, torch.Tensor) else 0
            return super().training_step(model, inputs, num_items_in_batch)
        step_start = time.perf_counter()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        labels = self._batch_labels(inputs)
        n = labels.shape[0]
        if self._selection_active():
            indices, weights = self.select_batch(model, inputs)
            record = self._sbp_last
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
        with self.compute_loss_context_manager():
            outputs = model(**subset)
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
            # The subset's rows were checked with the whole batch (select_batch or the line above).
            problem_type = record.problem_type or self._problem_type(labels)
            losses = per_example_loss(logits, sub_labels, problem_type, self.args.label_smoothing_factor)
            loss = (weights.to(losses.device, losses.dtype) * losses).sum() / losses.numel()
        del outputs, logits, subset

        if num_items_in_batch is not None:
            # This micro-batch's share of the accumulated examples, counted as the Trainer counts them.
            loss = loss * (labels.ne(-100).sum() / num_items_in_batch)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / self.current_gradient_accumulation_steps
        # As in Trainer.training_step: the loss is already scaled for accumulation, so DeepSpeed must not
        # divide it by the accumulation steps again.
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        backward_kwargs = {"scale_wrt_gas": False} if deepspeed else {}
        self.accelerator.backward(loss, **backward_kwargs)

        self._sync(labels.device)
        step_s = time.perf_counter() - step_start
        self._record_step(record, step_s)
        return loss.detach()

    def _record_step(self, record: SelectionRecord, step_s: float) -> None:
        self.sbp_backprop_examples += record.subset_size
        values = {
            "sbp/backprop_fraction": record.subset_size / record.batch_size,
            "sbp/scoring_time_share": record.scoring_s / step_s if step_s > 0 else math.nan,
            "sbp/selection_time_share": record.selection_s / step_s if step_s > 0 else math.nan,
            "sbp/grad_match_error": record.grad_match_error,
            "sbp/selective_steps": float(record.selective),
            "sbp/fallback_steps": float(record.fallback),
        }
        for position, key in enumerate(METRIC_KEYS):
            value = values[key]
            if not math.isnan(value):
                self._sbp_metric_sums[position] += value
                self._sbp_metric_counts[position] += 1
                self._sbp_run_sums[position] += value
                self._sbp_run_counts[position] += 1
        self._sbp_step_flops_factor = (1.0 / 3.0 if record.scored else 0.0) + record.subset_size / record.batch_size

    def floating_point_ops(self, inputs: dict[str, torch.Tensor | Any]) -> int:
        """Forward + backward FLOPs of the step: the scoring forward over the batch (a third of a
        training step's 6·N·P) plus forward and backward over the subset."""
        full = super().floating_point_ops(inputs)
        factor, self._sbp_step_flops_factor = self._sbp_step_flops_factor, None
        return full if factor is None else int(full * factor)

    # ---- logging and checkpoints -------------------------------------------------------------

    def _reduced_sbp_metrics(self, whole_run: bool = False) -> dict[str, float]:
        """The selection metrics since the last log (which it resets), or over the whole run, reduced
        across processes. Every process must call it, as every process calls ``log``."""
        if whole_run:
            sums, counts = self._sbp_run_sums.clone(), self._sbp_run_counts.clone()
        else:
            sums, counts = self._sbp_metric_sums.clone(), self._sbp_metric_counts.clone()
            self._sbp_metric_sums.zero_()
            self._sbp_metric_counts.zero_()
        if self.args.world_size > 1:
            stacked = torch.stack([sums, counts]).to(self.args.device)
            stacked = self.accelerator.reduce(stacked, reduction="sum").cpu()
            sums, counts = stacked[0], stacked[1]
        metrics = {}
        for position, key in enumerate(METRIC_KEYS):
            if counts[position] == 0:
                continue
            if key == "sbp/selective_steps":
                # Every process selects on the same steps (see _selection_active): their mean is the
                # interval's step count, not the count times the number of processes.
                metrics[key] = float(sums[position]) / max(self.args.world_size, 1)
            elif key == "sbp/fallback_steps":
                # A fallback is one process's event: count it on whichever process it happened.
                metrics[key] = float(sums[position])
            else:
                metrics[key] = float(sums[position] / counts[position])
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the selection metrics, averaged since the last log (and across processes), into
        training logs, and their averages over the whole run (``train_sbp/...``, steps of the last
        partial logging interval included) into the end-of-training summary."""
        if self.args.sbp_strategy != "none":
            if "loss" in logs and "eval_loss" not in logs:
                logs = {**logs, **self._reduced_sbp_metrics()}
            elif "train_runtime" in logs:
                run = self._reduced_sbp_metrics(whole_run=True)
                logs = {**logs, **{f"train_{key}": value for key, value in run.items()}}
        super().log(logs, start_time)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        state = {
            "generator": self._sbp_generator.get_state(),
            "loss_history": self._sbp_loss_history.state_dict(),
            "head_name": self._sbp_head_name,
            "backprop_examples": self.sbp_backprop_examples,
            "run_metric_sums": self._sbp_run_sums.clone(),
            "run_metric_counts": self._sbp_run_counts.clone(),
        }
        torch.save(state, os.path.join(output_dir, SBP_STATE_NAME.format(self.args.process_index)))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, SBP_STATE_NAME.format(self.args.process_index))
        if not os.path.isfile(path):
            if self.args.sbp_strategy != "none":
                logger.warning(
                    f"{path} is missing: the selection's random state and loss history start afresh, so the resumed "
                    "run will not reproduce an uninterrupted one exactly."
                )
            return
        state = torch.load(path, weights_only=True)
        self._sbp_generator.set_state(state["generator"])
        self._sbp_loss_history.load_state_dict(state["loss_history"])
        self.sbp_backprop_examples = int(state["backprop_examples"])
        self._sbp_run_sums = state["run_metric_sums"].clone()
        self._sbp_run_counts = state["run_metric_counts"].clone()
        if self._sbp_head_name is None:
            self._sbp_head_name = state["head_name"]

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write ``README.md`` in ``output_dir``: the ``Trainer`` card's content plus the selection settings and
        statistics and the random-subset baseline, from the template ``model_cards/selective_backprop.md``.

        The arguments mean what they mean for ``transformers.Trainer.create_model_card``; extra keyword arguments
        (``label_noise``, ``label_noise_flipped``, ``baseline_results``, ``results``, ``template``) and those stored
        with :func:`hf_sbp.model_card.set_model_card_info` are described in :mod:`hf_sbp.model_card`.
        """
        if not self.is_world_process_zero():
            return
        from .model_card import write_model_card

        write_model_card(
            self,
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
            **kwargs,
        )
