"""Dataset-level pruning: which examples an epoch visits, and the loss weight of each (``infobatch``, ``random-prune``).

InfoBatch (Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning", ICLR 2024): at the
start of each epoch, every example whose last recorded loss is below the mean of the recorded losses is left out
with probability ``r`` (``sbp_prune_ratio``), and each such example that is kept has its loss multiplied by
``1 / (1 - r)``, so that the epoch's expected gradient is the full dataset's. Nothing is pruned in the last
``sbp_prune_anneal`` fraction of training. Its baseline leaves out as many examples, drawn uniformly from the whole
training set, with weight 1 (a uniform subset's mean gradient is already unbiased).

Pure functions on tensors, the sampler that makes a ``DataLoader`` visit an epoch's examples, and the per-epoch
record the trainer keeps (for resuming, the learning-rate schedule and the logs); the trainer's side is in
:mod:`hf_sbp.epoch_pruning`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._utils import check_int_at_least


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on ``seed`` and ``epoch``: every process draws the same pruned set and order
    for an epoch, and a resumed run draws what the uninterrupted one drew."""
    check_int_at_least("seed", seed, 0)
    check_int_at_least("epoch", epoch, 0)
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(mixed)


def low_loss_examples(losses: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """The examples InfoBatch may leave out: seen ones whose recorded loss is below the mean of the seen ones' losses.

    Args:
        losses: ``(N,)`` each example's last recorded loss (anything where not seen).
        seen: ``(N,)`` bool, whether the example has a recorded loss. Unseen examples are never low-loss.

    Returns:
        ``(N,)`` bool mask.
    """
    losses, seen = _check_record(losses, seen)
    if not bool(seen.any()):
        return torch.zeros_like(seen)
    mean = losses[seen].double().mean()
    return seen & (losses.double() < mean)


def infobatch_keep(
    losses: torch.Tensor, seen: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoBatch's pruning of one epoch: each low-loss example (:func:`low_loss_examples`) is left out with
    probability ``ratio`` (an independent coin flip), and each one kept gets loss weight ``1 / (1 - ratio)``.

    Returns:
        ``(keep, weights)``: an ``(N,)`` bool mask of the examples the epoch visits and ``(N,)`` float32 loss
        weights (1 for every example but the kept low-loss ones).
    """
    _check_ratio(ratio)
    low = low_loss_examples(losses, seen)
    dropped = low & (torch.rand(low.shape, generator=generator, dtype=torch.float64) < ratio)
    weights = torch.ones(low.shape, dtype=torch.float32)
    weights[low & ~dropped] = 1.0 / (1.0 - ratio)
    return ~dropped, weights


def random_prune_keep(
    losses: torch.Tensor, seen: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoBatch's baseline: draw how many examples :func:`infobatch_keep` would leave out (its coin flips, on the
    same record), then leave out that many drawn uniformly from all ``N`` examples; every weight is 1.

    Returns:
        ``(keep, weights)`` as :func:`infobatch_keep`.
    """
    _check_ratio(ratio)
    low = low_loss_examples(losses, seen)
    count = int((low & (torch.rand(low.shape, generator=generator, dtype=torch.float64) < ratio)).sum())
    keep = torch.ones(low.shape, dtype=torch.bool)
    keep[torch.randperm(low.numel(), generator=generator)[:count]] = False
    return keep, torch.ones(low.shape, dtype=torch.float32)


def pruning_active(progress: float, anneal: float) -> bool:
    """Whether an epoch that starts at training fraction ``progress`` (in ``[0, 1]``) is pruned: only before the last
    ``anneal`` fraction of training (InfoBatch's annealing, which trains the end on every example)."""
    return progress < 1.0 - anneal - 1e-12


def _check_ratio(ratio: float) -> None:
    if not (0.0 < ratio < 1.0):
        raise ValueError(f"ratio={ratio!r} is invalid; the pruning ratio must be in (0, 1).")


def _check_record(losses: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    losses, seen = losses.detach().cpu().reshape(-1), seen.detach().cpu().reshape(-1).bool()
    if losses.shape != seen.shape:
        raise ValueError(f"losses and seen must have the same length; got {losses.numel()} and {seen.numel()}.")
    if not bool(torch.isfinite(losses[seen]).all()):
        raise ValueError("the recorded losses of seen examples must be finite.")
    return losses, seen


@dataclass
class EpochPlan:
    """What one epoch visits.

    Attributes:
        epoch: the epoch's index (0-based, as ``Trainer`` counts).
        order: ``(M,)`` dataset indices of the examples the epoch visits, in the order it visits them.
        weights: ``(N,)`` loss weight of every example during this epoch.
        pruned: how many of the ``N`` examples the epoch leaves out.
        active: whether pruning was active (outside the annealing and with a strategy that prunes).
        start_step: optimizer steps completed when the epoch started.
        update_steps: optimizer steps a whole pass over ``order`` makes (0 until the trainer knows its data loader's
            length).
        run_steps: optimizer steps the run makes in this epoch: ``update_steps``, or fewer in the last epoch of a
            run of a fractional number of epochs.
    """

    epoch: int
    order: torch.Tensor
    weights: torch.Tensor
    pruned: int
    active: bool
    start_step: int
    update_steps: int = 0
    run_steps: int = 0

    @property
    def size(self) -> int:
        """``N``: the training set's size."""
        return self.weights.numel()

    @property
    def pruned_fraction(self) -> float:
        """The share of the training set the epoch leaves out."""
        return self.pruned / self.size if self.size else 0.0

    @classmethod
    def from_keep(
        cls,
        epoch: int,
        keep: torch.Tensor,
        weights: torch.Tensor,
        generator: torch.Generator,
        start_step: int,
        active: bool = True,
    ) -> EpochPlan:
        """The plan of the examples ``keep`` marks, visited in an order shuffled with ``generator``."""
        kept = torch.nonzero(keep.reshape(-1)).reshape(-1)
        if kept.numel() == 0:
            raise ValueError("an epoch must visit at least one example.")
        order = kept[torch.randperm(kept.numel(), generator=generator)]
        pruned = keep.numel() - kept.numel()
        return cls(epoch, order, weights.detach().float().cpu().reshape(-1), pruned, active, start_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "order": self.order, "weights": self.weights, "pruned": self.pruned,
            "active": self.active, "start_step": self.start_step, "update_steps": self.update_steps,
            "run_steps": self.run_steps,
        }  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EpochPlan:
        return cls(
            int(state["epoch"]), state["order"].long(), state["weights"].float(), int(state["pruned"]),
            bool(state["active"]), int(state["start_step"]), int(state["update_steps"]), int(state["run_steps"]),
        )  # fmt: skip


class PruningHistory:
    """The epochs of a pruned run so far: the current one's whole plan, and every epoch's place in the step count.

    It tells where a step lies (:meth:`position`, for resuming), maps a step to the step an unpruned run would be at
    after the same share of its epochs (:meth:`unpruned_step`, for the learning-rate schedule of an epoch-based
    run), and is saved in checkpoints.
    """

    def __init__(self) -> None:
        self.current: EpochPlan | None = None
        self.epochs: list[dict[str, int]] = []
        """Per epoch: ``epoch``, ``start_step``, ``update_steps``, ``run_steps``, ``visited``, ``pruned``."""

    def start(self, plan: EpochPlan) -> None:
        """Record a new epoch (its ``update_steps`` may be set later, with :meth:`set_update_steps`)."""
        if self.epochs and plan.epoch <= self.epochs[-1]["epoch"]:
            raise ValueError(f"epoch {plan.epoch} starts after epoch {self.epochs[-1]['epoch']} was recorded.")
        self.current = plan
        visited = plan.order.numel()
        self.epochs.append(
            {"epoch": plan.epoch, "start_step": plan.start_step, "update_steps": plan.update_steps,
             "run_steps": plan.run_steps, "visited": visited, "pruned": plan.pruned}
        )  # fmt: skip

    def set_update_steps(self, steps: int, run_steps: int | None = None) -> None:
        """The optimizer steps a pass over the current epoch makes, and those the run makes in it (default: all)."""
        check_int_at_least("steps", steps, 1)
        run_steps = steps if run_steps is None else run_steps
        check_int_at_least("run_steps", run_steps, 1)
        self.current.update_steps, self.current.run_steps = steps, run_steps
        self.epochs[-1].update(update_steps=steps, run_steps=run_steps)

    def position(self, global_step: int) -> tuple[int, int]:
        """``(epoch, steps into it)`` of a run that has completed ``global_step`` optimizer steps: the next epoch
        with 0 steps when the last recorded epoch is complete."""
        if not self.epochs:
            return 0, 0
        for record in reversed(self.epochs):
            if global_step >= record["start_step"]:
                done = global_step - record["start_step"]
                if done >= record["update_steps"]:
                    return record["epoch"] + 1, 0
                return record["epoch"], done
        return 0, global_step

    def unpruned_step(self, step: float, steps_per_epoch: int, total_steps: int | None = None) -> float:
        """The step at which an unpruned run, with ``steps_per_epoch`` optimizer steps per epoch and ``total_steps`` in
        all, has covered the same share of its epochs as this run after ``step`` steps. Within an epoch that started
        at ``s0`` and makes ``r`` steps: ``epoch * steps_per_epoch + (step - s0) * share / r``, where ``share`` is the
        unpruned run's steps in that epoch (``steps_per_epoch``; fewer in a last, fractional epoch, so that both runs
        end together). ``step`` itself before the first epoch."""
        for record in reversed(self.epochs):
            if step >= record["start_step"] and record["run_steps"] > 0:
                first = record["epoch"] * steps_per_epoch
                share = steps_per_epoch if total_steps is None else min(steps_per_epoch, total_steps - first)
                return first + (step - record["start_step"]) * share / record["run_steps"]
        return float(step)

    @property
    def visited(self) -> int:
        """Examples visited over the recorded epochs (the current one whole)."""
        return sum(record["visited"] for record in self.epochs)

    @property
    def pruned(self) -> int:
        """Examples left out over the recorded epochs."""
        return sum(record["pruned"] for record in self.epochs)

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and lists only (``torch.load(weights_only=True)`` reads it)."""
        current = self.current.state_dict() if self.current is not None else None
        return {"current": current, "epochs": [dict(record) for record in self.epochs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        current = state.get("current")
        self.current = EpochPlan.from_state_dict(current) if current is not None else None
        self.epochs = [{key: int(value) for key, value in record.items()} for record in state.get("epochs", [])]


class PlannedEpochSampler(torch.utils.data.Sampler[int]):
    """The training sampler of a pruned run: it yields the current epoch's :attr:`EpochPlan.order`, which the trainer
    sets before the epoch's data loader is iterated; its length (so the data loader's) follows it.

    Before a plan is set it yields every index once, in order (``Trainer`` sizes its loop from that length first).
    """

    def __init__(self, size: int) -> None:
        check_int_at_least("size", size, 1)
        self.size = size
        self.order = torch.arange(size)

    def set_order(self, order: torch.Tensor) -> None:
        """Visit ``order`` (dataset indices in ``[0, size)``) in the next passes."""
        order = order.detach().cpu().long().reshape(-1)
        if order.numel() == 0 or int(order.min()) < 0 or int(order.max()) >= self.size:
            raise ValueError(f"an epoch's order must hold indices in [0, {self.size}); got {order.tolist()[:10]}.")
        self.order = order

    def __iter__(self) -> Iterator[int]:
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return self.order.numel()


def epochs_limit(num_train_epochs: float, epoch: int) -> float:
    """The share of epoch ``epoch`` an epoch-based run of ``num_train_epochs`` makes: 1 before the last, the
    fractional remainder in it (``Trainer`` runs ``ceil(num_train_epochs)`` epochs and stops part-way through the
    last when it is fractional)."""
    return max(0.0, min(1.0, float(num_train_epochs) - epoch))


def steps_of_share(share: float, steps: int) -> int:
    """``ceil(share * steps)``, as ``Trainer`` rounds ``num_train_epochs * steps_per_epoch``."""
    return math.ceil(share * steps - 1e-9)
