"""Epochs of varying length inside ``Trainer``'s loop, for the dataset-level strategies (a
:class:`~hf_sbp.DatasetPruningStrategy`).

``Trainer`` sizes its loop once, from the training data loader's length: the steps of an epoch, the number of epochs
against ``max_steps``, where a resumed run starts, and the learning-rate schedule's length. A pruned epoch is shorter,
and how much shorter is known only when it starts (it depends on the losses recorded so far). So, for a strategy
that ``prunes_dataset``:

- the training sampler is a :class:`~hf_sbp.core.pruning.PlannedEpochSampler`; at the start of every epoch the
  strategy's :meth:`~hf_sbp.DatasetPruningStrategy.keep_examples` plans it from each example's last recorded loss (a
  generator that depends only on the seed and the epoch shuffles it, so every process draws the same plan), and the
  epoch's steps are counted from the data loader's new length;
- with ``max_steps > 0`` the run makes exactly ``max_steps`` optimizer steps, through as many (pruned) epochs as
  that takes; the schedule is ``Trainer``'s, over ``max_steps``, and the annealing (``sbp_prune_anneal``) is a
  fraction of it;
- with ``num_train_epochs`` (``max_steps <= 0``) the run makes that many pruned epochs (the last one in part when it
  is fractional). The total step count is not known in advance, so the learning-rate schedule (any ``LambdaLR``,
  which every ``lr_scheduler_type`` but ``reduce_lr_on_plateau`` and ``greedy`` builds) follows the share of the
  epochs made: at step ``t`` of an epoch of ``u`` steps it is where an unpruned run would be after the same share
  of that epoch, so the warm-up covers the same share of training and the schedule ends at the last step.
  ``state.max_steps`` is updated at every epoch start to an upper bound that is exact in the last epoch;
  fractional ``logging_steps``, ``eval_steps`` and ``save_steps`` are fractions of the unpruned step count;
- a resumed run finds its epoch and step in it from the saved :class:`~hf_sbp.core.pruning.PruningHistory`, and the
  interrupted epoch's plan is the saved one (its losses have changed since it was planned).

This relies on ``Trainer._run_epoch``, ``Trainer._init_training_state`` and ``Trainer.set_initial_training_values``
(``transformers`` 5.3 and later); a dataset-level strategy is refused when they are missing.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from transformers import Trainer

from .core.pruning import (
    EpochPlan,
    PlannedEpochSampler,
    PruningHistory,
    epoch_generator,
    epochs_limit,
    pruning_active,
    steps_of_share,
)
from .selection_metrics import EPOCH_EXAMPLES, EPOCH_PRUNED, PRUNED_FRACTION

TRAINER_HOOKS = ("_run_epoch", "_init_training_state", "set_initial_training_values")
"""The ``Trainer`` methods the dataset-level strategies override."""


def check_trainer_hooks(strategy_name: str) -> None:
    """Raise unless this ``transformers`` has the ``Trainer`` methods that pruned epochs need."""
    missing = [name for name in TRAINER_HOOKS if not hasattr(Trainer, name)]
    if missing:
        import transformers

        raise ValueError(
            f"sbp_strategy={strategy_name!r} prunes whole epochs, which needs Trainer.{', Trainer.'.join(missing)} "
            f"(transformers >= 5.3); this is transformers {transformers.__version__}. Upgrade transformers or use "
            "a per-batch strategy."
        )


def _find_sampler(dataloader: Any) -> PlannedEpochSampler | None:
    """The :class:`PlannedEpochSampler` a (possibly accelerate-wrapped) data loader draws from, if any."""
    seen = set()
    stack = [dataloader]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, PlannedEpochSampler):
            return node
        for name in ("batch_sampler", "sampler", "base_dataloader"):
            stack.append(getattr(node, name, None))
    return None


class EpochPruningMixin:
    """The ``Trainer`` overrides behind dataset-level strategies (see the module's docstring). A no-op for the
    per-batch ones."""

    def _new_pruning_history(self) -> None:
        self._pruning = PruningHistory()
        self._unpruned_update_steps: int | None = None
        self._unpruned_max_steps: int | None = None

    @property
    def pruning_history(self) -> PruningHistory | None:
        """For a dataset-level strategy: the epochs of the current run (what each visited and left out)."""
        return self._pruning if self.strategy.prunes_dataset else None

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        if not self.strategy.prunes_dataset:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return PlannedEpochSampler(len(dataset))

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple:
        values = super().set_initial_training_values(args, dataloader)
        if not self.strategy.prunes_dataset:
            return values
        num_train_epochs, num_update_steps_per_epoch, *rest = values
        self._unpruned_update_steps, self._unpruned_max_steps = num_update_steps_per_epoch, values[-1]
        if args.max_steps > 0:
            # Pruned epochs are shorter than the unpruned count behind this number; the run ends at max_steps.
            num_train_epochs = sys.maxsize
        return (num_train_epochs, num_update_steps_per_epoch, *rest)

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if not self.strategy.prunes_dataset:
            return epochs_trained, steps_trained
        if resume_from_checkpoint is None:
            # A fresh start (also auto_find_batch_size's retry after running out of memory): plan every epoch anew.
            self._pruning = PruningHistory()
        elif self._pruning.epochs:  # else no selection state was saved: Trainer's count, as the warning said
            epochs_trained, updates = self._pruning.position(self.state.global_step)
            steps_trained = 0 if self.args.ignore_data_skip else updates * self.args.gradient_accumulation_steps
        return epochs_trained, steps_trained

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.strategy.prunes_dataset and self.args.max_steps <= 0:
            self._follow_epochs(scheduler)
        return scheduler

    def _follow_epochs(self, scheduler: Any) -> None:
        """Make a ``LambdaLR`` follow the share of the epochs made rather than the step count (epoch-based runs)."""
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return  # ReduceLROnPlateau and the like do not depend on the step count (refused at construction else)

        def stretched(inner):
            if getattr(inner, "_sbp_follows_epochs", False):
                return inner

            def lr_lambda(step):  # a plain function, so that LambdaLR.state_dict does not pickle it
                per_epoch, total = self._unpruned_update_steps, self._unpruned_max_steps
                return inner(self._pruning.unpruned_step(step, per_epoch, total) if per_epoch else step)

            lr_lambda._sbp_follows_epochs = True
            return lr_lambda

        scheduler.lr_lambdas = [stretched(inner) for inner in scheduler.lr_lambdas]

    def _run_epoch(self, *, epoch: int, train_dataloader: Any, steps_in_epoch: int, num_update_steps_per_epoch: int,
                   **kwargs: Any):  # fmt: skip
        if self.strategy.prunes_dataset:
            self._start_epoch(epoch, train_dataloader)
            steps_in_epoch = len(train_dataloader)
            num_update_steps_per_epoch = self._pruning.current.update_steps
        return super()._run_epoch(
            epoch=epoch,
            train_dataloader=train_dataloader,
            steps_in_epoch=steps_in_epoch,
            num_update_steps_per_epoch=num_update_steps_per_epoch,
            **kwargs,
        )

    def _start_epoch(self, epoch: int, dataloader: Any) -> None:
        """Plan epoch ``epoch`` (or take the saved plan of the epoch a resumed run is in); point the sampler at it."""
        sampler = _find_sampler(dataloader)
        if sampler is None:
            raise RuntimeError(
                f"sbp_strategy={self.sbp_args.sbp_strategy!r} plans each epoch through the trainer's training sampler, "
                "but the training data loader does not draw from it (is get_train_dataloader or _get_train_sampler "
                "overridden?)."
            )
        plan = self._pruning.current
        resumed = plan is not None and plan.epoch == epoch
        if not resumed:
            plan = self._plan(epoch, sampler.size)
        sampler.set_order(plan.order)
        if not resumed:
            updates = max(1, math.ceil(len(dataloader) / self.args.gradient_accumulation_steps))
            share = epochs_limit(self.args.num_train_epochs, epoch) if self.args.max_steps <= 0 else 1.0
            self._pruning.start(plan)
            self._pruning.set_update_steps(updates, max(1, steps_of_share(share, updates)))
            self.log(
                {PRUNED_FRACTION: plan.pruned_fraction, EPOCH_EXAMPLES: plan.order.numel(), EPOCH_PRUNED: plan.pruned}
            )
        if self.args.max_steps <= 0:
            self.state.max_steps = self._remaining_steps_bound(epoch)

    def _plan(self, epoch: int, size: int) -> EpochPlan:
        args, sbp = self.args, self.sbp_args
        if args.max_steps > 0:
            progress = self.state.global_step / args.max_steps
        else:
            progress = epoch / args.num_train_epochs
        seed = sbp.sbp_seed if sbp.sbp_seed is not None else args.seed
        generator = epoch_generator(seed, epoch)
        active = pruning_active(progress, sbp.sbp_prune_anneal)
        if active:
            losses, seen = self._cache.loss_record()
            keep, weights = self.strategy.keep_examples(losses, seen, generator)
        else:
            keep, weights = torch.ones(size, dtype=torch.bool), torch.ones(size)
        if keep.shape != (size,) or weights.shape != (size,) or not bool(keep.any()):
            raise ValueError(
                f"{type(self.strategy).__name__}.keep_examples must return a bool mask and weights of shape ({size},) "
                f"with at least one example kept; got shapes {tuple(keep.shape)} and {tuple(weights.shape)}."
            )
        if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise ValueError(f"{type(self.strategy).__name__}.keep_examples returned negative or non-finite weights.")
        return EpochPlan.from_keep(epoch, keep, weights, generator, self.state.global_step, active)

    def _remaining_steps_bound(self, epoch: int) -> int:
        """An epoch-based run's step count: the steps made, this epoch's, and the later epochs' unpruned ones (exact
        once the last epoch has started)."""
        epochs, current = self.args.num_train_epochs, self._pruning.current
        bound = current.start_step + current.run_steps
        for later in range(epoch + 1, math.ceil(epochs)):
            bound += steps_of_share(epochs_limit(epochs, later), self._unpruned_update_steps)
        return bound

    def _epoch_weights(self, example_ids: torch.Tensor) -> torch.Tensor:
        """The current epoch's loss weights of these examples."""
        current = self._pruning.current
        if current is None:
            raise RuntimeError("no epoch has been planned: train through SelectiveBackpropTrainer.train().")
        return current.weights[example_ids.long()]
