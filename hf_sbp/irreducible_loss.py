"""The irreducible losses (IL) of ``rho-loss`` and ``stale-rho-loss``: computed once, when ``train()`` starts and
before its first step, stored per example (by dataset index), saved with every checkpoint and restored on resume.

Two IL models (``sbp_il_model``), each trained on one half of the training set (a seeded, per-class split; see
:func:`hf_sbp.core.rho_loss.split_halves`) and scoring the other half, so that every example's IL comes from a model
that never trained on it and the target model trains on all the data:

- ``double`` (the default): a deep copy of the initial model fine-tuned for ``sbp_il_epochs`` epochs on its half
  (AdamW at ``sbp_il_learning_rate``, the run's batch size and collator), then a no-grad forward over the other
  half. Cost: ``2 sbp_il_epochs x 3 F(N/2) + F(N)``, with twice the model's memory (and an optimizer's) while it runs;
- ``linear_probe``: one no-grad forward of the initial model over the training set captures each example's head
  input ``h_i``; a linear head (logistic regression for classification) fitted to each half's features scores the
  other half. Cost: ``F(N)`` plus the fits, which are small (``N x d`` features).

The IL forward and training run on every process alike (seeded, outside the global random state), without
collectives, so that every process holds the same values. Their wall-clock is ``sbp_il_seconds``, outside
``Trainer``'s ``train_runtime``; the run summary reports it as ``train_sbp/il_seconds``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .core.rho_loss import check_splittable, fit_linear_probe, split_halves
from .core.selection import per_example_loss
from .example_cache import EXAMPLE_ID_KEY
from .labels import LABEL_COLUMNS

logger = logging.getLogger(__name__)


def dataset_labels(dataset: Any, required: bool = True) -> torch.Tensor | None:
    """Every training example's label (the first of ``labels``, ``label``, ``label_ids`` the rows have), as a
    tensor: a column read for a ``datasets.Dataset``, a pass over the rows for any other map-style dataset. Without
    ``required``, a dataset whose rows are not mappings (an index space, as the throughput benchmark passes) gives
    ``None``; with it, any dataset without labels is a ``ValueError``."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        name = next((name for name in LABEL_COLUMNS if name in columns), None)
        if name is None:
            raise ValueError(
                f"the training set has no label column (one of {list(LABEL_COLUMNS)}); RHO-LOSS trains its "
                "irreducible-loss models on the labels."
            )
        return torch.as_tensor(dataset.with_format("torch")[name])
    values = []
    for index in range(len(dataset)):
        row = dataset[index]
        name = next((name for name in LABEL_COLUMNS if name in row), None) if isinstance(row, Mapping) else None
        if name is None:
            if not required and not isinstance(row, Mapping):
                return None
            raise ValueError(
                f"training example {index} has no label (one of {list(LABEL_COLUMNS)}); RHO-LOSS trains its "
                "irreducible-loss models on the labels."
            )
        values.append(torch.as_tensor(row[name]))
    return torch.stack(values)


class IrreducibleLossMixin:
    """The ``SelectiveBackpropTrainer`` part that computes, checks, saves and restores the irreducible losses."""

    sbp_il_seconds: float = 0.0
    """Wall-clock seconds the irreducible losses took (0 until computed; the first run's on resume)."""

    def _new_irreducible_losses(self) -> None:
        """For a strategy that ``needs_irreducible_loss``: check that the training set splits (a clear error before
        any training); the values themselves are computed when ``train()`` starts."""
        self._irreducible: torch.Tensor | None = getattr(self, "_irreducible", None)
        if not self._strategy.needs_irreducible_loss or self.train_dataset is None:
            return
        if self._irreducible is not None and self._irreducible.numel() != len(self.train_dataset):
            self._irreducible = None  # another training set
        labels = dataset_labels(self.train_dataset, required=False)
        if labels is not None:
            check_splittable(labels, self._problem_type(labels))

    def _rows_irreducible_losses(self, ids: torch.Tensor) -> torch.Tensor:
        """The irreducible losses of the rows with dataset indices ``ids``."""
        if self._irreducible is None:
            raise ValueError(
                f"sbp_strategy={self.sbp_args.sbp_strategy!r} selects by the irreducible losses, which are computed "
                "when train() starts; call train() (or select_batch after it)."
            )
        return self._irreducible[ids]

    def set_irreducible_losses(self, values: torch.Tensor) -> None:
        """Give every training example's irreducible loss (``(N,)``, by dataset index) instead of computing them:
        values from an IL model of your own, or any stand-in where they do not matter (the throughput benchmark's
        step costs). ``train()`` then uses them (a resume still takes the checkpoint's)."""
        values = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
        if self.train_dataset is not None and values.numel() != len(self.train_dataset):
            raise ValueError(
                f"{values.numel()} irreducible losses for a training set of {len(self.train_dataset)} examples; give "
                "one per example, in dataset order."
            )
        self._irreducible, self.sbp_il_seconds = values, 0.0

    @property
    def irreducible_losses(self) -> torch.Tensor | None:
        """``(N,)`` every training example's irreducible loss (by dataset index), or ``None`` before ``train()``."""
        return self._irreducible

    def _il_batches(self, dataset: Any, rows: torch.Tensor, generator: torch.Generator | None = None) -> Iterator:
        """The rows ``rows`` of ``dataset`` in batches of the run's size, collated as training collates them and on
        the model's device (shuffled with ``generator`` when given); the labels stay in each batch."""
        rows = rows.tolist()
        part = dataset.select(rows) if hasattr(dataset, "select") else torch.utils.data.Subset(dataset, rows)
        collator = self.data_collator
        if hasattr(part, "column_names"):  # a datasets.Dataset: its unused columns dropped as Trainer drops them
            part = self._remove_unused_columns(part, description="irreducible loss")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="irreducible loss")
        loader = torch.utils.data.DataLoader(
            part,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=generator is not None,
            generator=generator,
            collate_fn=collator,
        )
        for batch in loader:
            batch = self._prepare_inputs(batch)
            batch.pop(EXAMPLE_ID_KEY, None)
            yield batch

    def _il_scores(self, model: torch.nn.Module, dataset: Any, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(logits, features, labels)`` of ``model``'s scoring pass (no grad, eval mode) over ``rows``, in order."""
        logits, features, labels = [], [], []
        for batch in self._il_batches(dataset, rows):
            scores = self.score_batch(model, batch)
            logits.append(scores.logits.float().cpu())
            features.append(scores.features.float().cpu())
            labels.append(batch[self.label_key].cpu())
        return torch.cat(logits), torch.cat(features), torch.cat(labels)

    def _il_fine_tune(self, model: torch.nn.Module, dataset: Any, rows: torch.Tensor, seed: int) -> None:
        """Fine-tune ``model`` (a copy of the initial one) on ``rows`` of ``dataset``: ``sbp_il_epochs`` epochs of
        AdamW on the model's own loss."""
        sbp = self.sbp_args
        lr = sbp.sbp_il_learning_rate if sbp.sbp_il_learning_rate is not None else self.args.learning_rate
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.args.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(sbp.sbp_il_epochs):
            for batch in self._il_batches(dataset, rows, generator):
                with self.compute_loss_context_manager():
                    loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        model.eval()

    def _compute_irreducible_losses(self) -> None:
        """Train the two IL models and record every example's IL (see the module's docstring)."""
        start = time.perf_counter()
        dataset, sbp = self.train_dataset, self.sbp_args
        labels = dataset_labels(dataset)
        problem_type = self._problem_type(labels)
        seed = sbp.sbp_seed if sbp.sbp_seed is not None else self.args.seed
        halves = split_halves(labels, problem_type, torch.Generator().manual_seed(seed))
        smoothing = self.args.label_smoothing_factor if problem_type == "single_label_classification" else 0.0
        initial = self.accelerator.unwrap_model(self.model)
        irreducible = torch.empty(len(dataset))
        cuda = self.args.device.type == "cuda"
        # Seeded dropout and shuffling, outside the global random state: every process computes the same values,
        # and training's own random draws are those of a run without the IL models.
        with torch.random.fork_rng(devices=[self.args.device] if cuda else []):
            torch.manual_seed(seed)
            if sbp.sbp_il_model == "linear_probe":
                everything = torch.arange(len(dataset))
                _, features, row_labels = self._il_scores(initial, dataset, everything)
                num_outputs = self._model_config().num_labels
                for fit, scored in (halves, halves[::-1]):
                    probe = fit_linear_probe(features[fit], row_labels[fit], problem_type, num_outputs)
                    with torch.no_grad():
                        logits = probe(features[scored])
                    irreducible[scored] = per_example_loss(logits, row_labels[scored], problem_type, smoothing)
            else:
                for number, (fit, scored) in enumerate((halves, halves[::-1])):
                    model = copy.deepcopy(initial)
                    self._il_fine_tune(model, dataset, fit, seed + 1 + number)
                    logits, _, row_labels = self._il_scores(model, dataset, scored)
                    irreducible[scored] = per_example_loss(logits, row_labels, problem_type, smoothing)
                    del model
        self._irreducible = irreducible
        self.sbp_il_seconds = time.perf_counter() - start
        logger.info(
            f"Irreducible losses ({sbp.sbp_il_model}) of {len(dataset)} examples in {self.sbp_il_seconds:.1f} s."
        )

    def _prepare_irreducible_losses(self, resumed: bool) -> None:
        """At ``train()``'s start: compute the IL unless they are known (restored from the checkpoint resumed, or
        computed by an earlier ``train()`` on the same training set). A resume without them is an error: computing
        them afresh from the resumed (trained) model would not give the run's values."""
        if not self._strategy.needs_irreducible_loss:
            return
        if self._irreducible is None and resumed:
            raise ValueError(
                f"the checkpoint resumed holds no irreducible losses for sbp_strategy={self.sbp_args.sbp_strategy!r} "
                "(its sbp_state_rank*.pt is missing, or it was written by another strategy); they were computed "
                "from the initial model, which a resumed run no longer has. Resume a checkpoint of this run, or "
                "start afresh."
            )
        if self._irreducible is None:
            self._compute_irreducible_losses()

    def _irreducible_state(self) -> dict[str, Any] | None:
        if self._irreducible is None:
            return None
        return {"values": self._irreducible, "seconds": self.sbp_il_seconds}

    def _load_irreducible_state(self, state: dict[str, Any] | None) -> None:
        if not self._strategy.needs_irreducible_loss:
            return
        if state is None or state["values"].numel() != len(self.train_dataset):
            self._irreducible = None
            return
        self._irreducible, self.sbp_il_seconds = state["values"], float(state["seconds"])
