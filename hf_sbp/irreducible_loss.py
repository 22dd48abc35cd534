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


class IrreducibleLosses:
    """Every training example's irreducible loss for a ``SelectiveBackpropTrainer`` whose strategy
    ``needs_irreducible_loss``: checked when the trainer is built, computed when ``train()`` starts (unless given or
    restored), saved with checkpoints and restored on resume.

    Args:
        trainer: the trainer whose model, data, collator and scoring pass the IL models use.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.values: torch.Tensor | None = None
        """``(N,)`` every training example's irreducible loss (by dataset index), or ``None`` before ``train()``."""
        self.seconds = 0.0
        """Wall-clock seconds the values took (0 until computed; the first run's on resume)."""

    @property
    def needed(self) -> bool:
        return self.trainer.strategy.needs_irreducible_loss

    def check(self) -> None:
        """For a strategy that needs them: check that the training set splits (a clear error before any training);
        the values themselves are computed when ``train()`` starts. Values of another training set are dropped."""
        dataset = self.trainer.train_dataset
        if not self.needed or dataset is None:
            return
        if self.values is not None and self.values.numel() != len(dataset):
            self.values = None  # another training set
        labels = dataset_labels(dataset, required=False)
        if labels is not None:
            check_splittable(labels, self.trainer._selector.problem_type(labels))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The irreducible losses of the rows with dataset indices ``ids``."""
        if self.values is None:
            raise ValueError(
                f"sbp_strategy={self.trainer.sbp_args.sbp_strategy!r} selects by the irreducible losses, which are "
                "computed when train() starts; call train() (or select_batch after it)."
            )
        return self.values[ids]

    def set(self, values: torch.Tensor) -> None:
        """See ``SelectiveBackpropTrainer.set_irreducible_losses``."""
        values = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
        dataset = self.trainer.train_dataset
        if dataset is not None and values.numel() != len(dataset):
            raise ValueError(
                f"{values.numel()} irreducible losses for a training set of {len(dataset)} examples; give "
                "one per example, in dataset order."
            )
        self.values, self.seconds = values, 0.0

    def _batches(self, dataset: Any, rows: torch.Tensor, generator: torch.Generator | None = None) -> Iterator:
        """The rows ``rows`` of ``dataset`` in batches of the run's size, collated as training collates them and on
        the model's device (shuffled with ``generator`` when given); the labels stay in each batch."""
        trainer = self.trainer
        rows = rows.tolist()
        part = dataset.select(rows) if hasattr(dataset, "select") else torch.utils.data.Subset(dataset, rows)
        collator = trainer.data_collator
        if hasattr(part, "column_names"):  # a datasets.Dataset: its unused columns dropped as Trainer drops them
            part = trainer._remove_unused_columns(part, description="irreducible loss")
        else:
            collator = trainer._get_collator_with_removed_columns(collator, description="irreducible loss")
        loader = torch.utils.data.DataLoader(
            part,
            batch_size=trainer.args.per_device_train_batch_size,
            shuffle=generator is not None,
            generator=generator,
            collate_fn=collator,
        )
        for batch in loader:
            batch = trainer._prepare_inputs(batch)
            batch.pop(EXAMPLE_ID_KEY, None)
            yield batch

    def _scores(self, model: torch.nn.Module, dataset: Any, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(logits, features, labels)`` of ``model``'s scoring pass (no grad, eval mode) over ``rows``, in order."""
        logits, features, labels = [], [], []
        for batch in self._batches(dataset, rows):
            scores = self.trainer.score_batch(model, batch)
            logits.append(scores.logits.float().cpu())
            features.append(scores.features.float().cpu())
            labels.append(batch[self.trainer.label_key].cpu())
        return torch.cat(logits), torch.cat(features), torch.cat(labels)

    def _fine_tune(self, model: torch.nn.Module, dataset: Any, rows: torch.Tensor, seed: int) -> None:
        """Fine-tune ``model`` (a copy of the initial one) on ``rows`` of ``dataset``: ``sbp_il_epochs`` epochs of
        AdamW on the model's own loss."""
        trainer = self.trainer
        sbp, args = trainer.sbp_args, trainer.args
        lr = sbp.sbp_il_learning_rate if sbp.sbp_il_learning_rate is not None else args.learning_rate
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(sbp.sbp_il_epochs):
            for batch in self._batches(dataset, rows, generator):
                with trainer.compute_loss_context_manager():
                    loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        model.eval()

    def compute(self) -> None:
        """Train the two IL models and record every example's IL (see the module's docstring)."""
        start = time.perf_counter()
        trainer = self.trainer
        dataset, sbp, args = trainer.train_dataset, trainer.sbp_args, trainer.args
        labels = dataset_labels(dataset)
        problem_type = trainer._selector.problem_type(labels)
        seed = sbp.sbp_seed if sbp.sbp_seed is not None else args.seed
        halves = split_halves(labels, problem_type, torch.Generator().manual_seed(seed))
        smoothing = args.label_smoothing_factor if problem_type == "single_label_classification" else 0.0
        initial = trainer.accelerator.unwrap_model(trainer.model)
        irreducible = torch.empty(len(dataset))
        cuda = args.device.type == "cuda"
        # Seeded dropout and shuffling, outside the global random state: every process computes the same values,
        # and training's own random draws are those of a run without the IL models.
        with torch.random.fork_rng(devices=[args.device] if cuda else []):
            torch.manual_seed(seed)
            if sbp.sbp_il_model == "linear_probe":
                everything = torch.arange(len(dataset))
                _, features, row_labels = self._scores(initial, dataset, everything)
                num_outputs = trainer._selector.model_config().num_labels
                for fit, scored in (halves, halves[::-1]):
                    probe = fit_linear_probe(features[fit], row_labels[fit], problem_type, num_outputs)
                    with torch.no_grad():
                        logits = probe(features[scored])
                    irreducible[scored] = per_example_loss(logits, row_labels[scored], problem_type, smoothing)
            else:
                for number, (fit, scored) in enumerate((halves, halves[::-1])):
                    model = copy.deepcopy(initial)
                    self._fine_tune(model, dataset, fit, seed + 1 + number)
                    logits, _, row_labels = self._scores(model, dataset, scored)
                    irreducible[scored] = per_example_loss(logits, row_labels, problem_type, smoothing)
                    del model
        self.values = irreducible
        self.seconds = time.perf_counter() - start
        logger.info(f"Irreducible losses ({sbp.sbp_il_model}) of {len(dataset)} examples in {self.seconds:.1f} s.")

    def prepare(self, resumed: bool) -> None:
        """At ``train()``'s start: compute the IL unless they are known (restored from the checkpoint resumed, or
        computed by an earlier ``train()`` on the same training set). A resume without them is an error: computing
        them afresh from the resumed (trained) model would not give the run's values."""
        if not self.needed:
            return
        if self.values is None and resumed:
            raise ValueError(
                "the checkpoint resumed holds no irreducible losses for "
                f"sbp_strategy={self.trainer.sbp_args.sbp_strategy!r} (its sbp_state_rank*.pt is missing, or it was "
                "written by another strategy); they were computed from the initial model, which a resumed run no "
                "longer has. Resume a checkpoint of this run, or start afresh."
            )
        if self.values is None:
            self.compute()

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint saves (``None`` before the values exist)."""
        if self.values is None:
            return None
        return {"values": self.values, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what :meth:`state_dict` saved; without it (or for another training set), no values."""
        if not self.needed:
            return
        if state is None or state["values"].numel() != len(self.trainer.train_dataset):
            self.values = None
            return
        self.values, self.seconds = state["values"], float(state["seconds"])
