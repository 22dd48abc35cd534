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
from .selection_metrics import EPOCH_EXAMPLES, EPOCH_PRUNED, PRUNED_FRACTION, run_key

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


class TrainerEpochs:
    """The epochs of a run with a per-batch strategy: ``Trainer``'s own. The trainer's overrides of ``Trainer``'s loop
    hooks call these whatever the strategy; here each returns what ``Trainer`` gave it (:class:`EpochPlanner` plans
    pruned epochs instead), so the trainer decides once, in :func:`epochs_of`, which epochs a run has."""

    history: PruningHistory | None = None
    """The epochs of the current run, what each visited and left out (saved with checkpoints); ``None``: unpruned."""

    def sampler(self, dataset: Any) -> PlannedEpochSampler | None:
        """The training sampler, or ``None`` for ``Trainer``'s own."""
        return None

    def initial_values(self, args: Any, values: tuple) -> tuple:
        """``Trainer.set_initial_training_values``' ``values``."""
        return values

    def training_state(self, epochs_trained: int, steps_trained: int, resume_from_checkpoint: Any) -> tuple[int, int]:
        """``Trainer._init_training_state``' ``(epochs trained, steps trained in the current epoch)``."""
        return epochs_trained, steps_trained

    def follow_epochs(self, scheduler: Any) -> None:
        """Adapt the learning-rate schedule that ``Trainer.create_scheduler`` built (here: unchanged)."""

    def start_epoch(self, epoch: int, dataloader: Any, steps: int, update_steps: int) -> tuple[int, int]:
        """The epoch's ``(steps, update steps)`` for ``Trainer._run_epoch``."""
        return steps, update_steps

    def run_summary(self) -> dict[str, float]:
        """The whole run's pruning, for the end-of-training summary."""
        return {}


def epochs_of(trainer: Any) -> TrainerEpochs:
    """The epochs of ``trainer``'s next run: planned and pruned for a strategy that ``prunes_dataset``, else
    ``Trainer``'s."""
    return EpochPlanner(trainer) if trainer.strategy.prunes_dataset else TrainerEpochs()


class EpochPlanner(TrainerEpochs):
    """The epochs of a run with a dataset-level strategy (see the module's docstring): their plans, their lengths
    and the schedule that follows them.

    Args:
        trainer: the trainer whose strategy plans the epochs and whose loop runs them.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.history: PruningHistory = PruningHistory()
        self.unpruned_update_steps: int | None = None
        self.unpruned_max_steps: int | None = None

    def sampler(self, dataset: Any) -> PlannedEpochSampler:
        """The training sampler: it visits what each epoch's plan says."""
        return PlannedEpochSampler(len(dataset))

    def initial_values(self, args: Any, values: tuple) -> tuple:
        """``Trainer.set_initial_training_values``' ``values`` for pruned epochs: with ``max_steps``, as many epochs
        as it takes (pruned epochs are shorter than the unpruned count behind ``Trainer``'s)."""
        num_train_epochs, num_update_steps_per_epoch, *rest = values
        self.unpruned_update_steps, self.unpruned_max_steps = num_update_steps_per_epoch, values[-1]
        if args.max_steps > 0:
            num_train_epochs = sys.maxsize
        return (num_train_epochs, num_update_steps_per_epoch, *rest)

    def training_state(self, epochs_trained: int, steps_trained: int, resume_from_checkpoint: Any) -> tuple[int, int]:
        """``Trainer._init_training_state``' ``(epochs trained, steps trained in the current epoch)``, found in the
        saved history on resume; a fresh start (also ``auto_find_batch_size``'s retry) plans every epoch anew."""
        trainer = self.trainer
        if resume_from_checkpoint is None:
            self.history = PruningHistory()
        elif self.history.epochs:  # else no selection state was saved: Trainer's count, as the warning said
            epochs_trained, updates = self.history.position(trainer.state.global_step)
            steps_trained = 0 if trainer.args.ignore_data_skip else updates * trainer.args.gradient_accumulation_steps
        return epochs_trained, steps_trained

    def follow_epochs(self, scheduler: Any) -> None:
        """Make a ``LambdaLR`` follow the share of the epochs made rather than the step count (epoch-based runs;
        with ``max_steps`` the schedule is ``Trainer``'s, over ``max_steps``)."""
        if self.trainer.args.max_steps > 0 or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return  # ReduceLROnPlateau and the like do not depend on the step count (refused at construction else)

        trainer = self.trainer

        def stretched(inner):
            if getattr(inner, "_sbp_follows_epochs", False):
                return inner

            def lr_lambda(step):  # a plain function, so that LambdaLR.state_dict does not pickle it
                # The trainer's planner at the time of the step: a retried or resumed loop makes a new one.
                planner = trainer._epochs
                per_epoch, total = planner.unpruned_update_steps, planner.unpruned_max_steps
                return inner(planner.history.unpruned_step(step, per_epoch, total) if per_epoch else step)

            lr_lambda._sbp_follows_epochs = True
            return lr_lambda

        scheduler.lr_lambdas = [stretched(inner) for inner in scheduler.lr_lambdas]

    def start_epoch(self, epoch: int, dataloader: Any, steps: int, update_steps: int) -> tuple[int, int]:
        """Plan epoch ``epoch`` (or take the saved plan of the epoch a resumed run is in) and point the sampler at
        it; returns the epoch's ``(steps, update steps)`` for ``Trainer._run_epoch`` (``Trainer``'s unpruned counts,
        ``steps`` and ``update_steps``, are replaced)."""
        trainer = self.trainer
        args = trainer.args
        sampler = _find_sampler(dataloader)
        if sampler is None:
            raise RuntimeError(
                f"sbp_strategy={trainer.sbp_args.sbp_strategy!r} plans each epoch through the trainer's training "
                "sampler, but the training data loader does not draw from it (is get_train_dataloader or "
                "_get_train_sampler overridden?)."
            )
        plan = self.history.current
        resumed = plan is not None and plan.epoch == epoch
        if not resumed:
            plan = self._plan(epoch, sampler.size)
        sampler.set_order(plan.order)
        if not resumed:
            updates = max(1, math.ceil(len(dataloader) / args.gradient_accumulation_steps))
            share = epochs_limit(args.num_train_epochs, epoch) if args.max_steps <= 0 else 1.0
            self.history.start(plan)
            self.history.set_update_steps(updates, max(1, steps_of_share(share, updates)))
            trainer.log(
                {PRUNED_FRACTION: plan.pruned_fraction, EPOCH_EXAMPLES: plan.order.numel(), EPOCH_PRUNED: plan.pruned}
            )
        if args.max_steps <= 0:
            trainer.state.max_steps = self._remaining_steps_bound(epoch)
        return len(dataloader), self.history.current.update_steps

    def _plan(self, epoch: int, size: int) -> EpochPlan:
        trainer = self.trainer
        args, sbp, strategy = trainer.args, trainer.sbp_args, trainer.strategy
        if args.max_steps > 0:
            progress = trainer.state.global_step / args.max_steps
        else:
            progress = epoch / args.num_train_epochs
        seed = sbp.sbp_seed if sbp.sbp_seed is not None else args.seed
        generator = epoch_generator(seed, epoch)
        active = pruning_active(progress, sbp.sbp_prune_anneal)
        if active:
            losses, seen = trainer._cache.loss_record()
            keep, weights = strategy.keep_examples(losses, seen, generator)
        else:
            keep, weights = torch.ones(size, dtype=torch.bool), torch.ones(size)
        if keep.shape != (size,) or weights.shape != (size,) or not bool(keep.any()):
            raise ValueError(
                f"{type(strategy).__name__}.keep_examples must return a bool mask and weights of shape ({size},) "
                f"with at least one example kept; got shapes {tuple(keep.shape)} and {tuple(weights.shape)}."
            )
        if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise ValueError(f"{type(strategy).__name__}.keep_examples returned negative or non-finite weights.")
        return EpochPlan.from_keep(epoch, keep, weights, generator, trainer.state.global_step, active)

    def _remaining_steps_bound(self, epoch: int) -> int:
        """An epoch-based run's step count: the steps made, this epoch's, and the later epochs' unpruned ones (exact
        once the last epoch has started)."""
        epochs, current = self.trainer.args.num_train_epochs, self.history.current
        bound = current.start_step + current.run_steps
        for later in range(epoch + 1, math.ceil(epochs)):
            bound += steps_of_share(epochs_limit(epochs, later), self.unpruned_update_steps)
        return bound

    def weights(self, example_ids: torch.Tensor) -> torch.Tensor:
        """The current epoch's loss weights of these examples."""
        current = self.history.current
        if current is None:
            raise RuntimeError("no epoch has been planned: train through SelectiveBackpropTrainer.train().")
        return current.weights[example_ids.long()]

    def run_summary(self) -> dict[str, float]:
        """The whole run's pruning, for the end-of-training summary (nothing before an epoch was planned)."""
        history = self.history
        if not history.epochs:
            return {}
        return {
            run_key(PRUNED_FRACTION): history.pruned / (history.pruned + history.visited),
            run_key(EPOCH_EXAMPLES): history.visited,
            run_key(EPOCH_PRUNED): history.pruned,
        }
