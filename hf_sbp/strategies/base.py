"""The strategy API: what a selection rule sees (:class:`SelectionBatch`), what it must do
(:class:`SelectionStrategy`), and the registry that makes a name in ``sbp_strategy`` mean a class.

A strategy is one class. The trainer owns everything else: the no-grad scoring pass (run when the
strategy's ``needs_scoring`` is true), the subset's forward and backward, the loss weighting, the
schedule, logging, and saving the strategy's :meth:`~SelectionStrategy.state_dict` in checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from ..core.selection import head_residuals, last_layer_gram, mean_gradient_target, per_example_loss
from ..example_cache import CachedStats
from ..subset_loss import custom_losses_and_residuals


@dataclass(eq=False)
class SelectionBatch:
    """One training batch as a strategy sees it; the trainer fills it.

    Attributes:
        n: the number of rows.
        labels: the batch's labels (on the model's device).
        problem_type: the loss family (``single_label_classification``, ``multi_label_classification`` or
            ``regression``), inferred with the rule of ``transformers``' sequence classifiers; ``None`` when the
            strategy needs no per-example losses (no scoring pass, unweighted, no ``observe``).
        generator: the trainer's seeded CPU generator for the selection's random draws. It is saved in checkpoints
            and offset by the process index, so draws made with it resume exactly and differ across processes.
        step: the trainer's ``global_step`` (optimizer steps completed before this batch).
        label_smoothing: ``label_smoothing_factor`` of the arguments (single-label classification only).
        logits: ``(s, C)`` logits of the scoring pass for its ``s`` rows (``scored_rows``); ``None`` unless the
            scoring pass ran.
        features: ``(s, d)`` inputs of the classification head in the scoring pass; ``None`` without it.
        head_bias: whether the head has a bias (its gradient is part of the last-layer gradient).
        example_ids: ``(n,)`` dataset indices of the rows (CPU), for strategies that set ``uses_example_cache``;
            else ``None``.
        scored_rows: the rows the scoring pass covered, in the order of ``logits``; ``None`` when it covered the
            whole batch (always, unless the strategy's :meth:`~SelectionStrategy.rows_to_score` chose fewer) or
            did not run.
        cached: for strategies that set ``uses_example_cache``: every row's cached statistics (see
            :class:`hf_sbp.example_cache.CachedStats`), the rows just scored included.
        epoch_weights: for a :class:`DatasetPruningStrategy`: ``(n,)`` the loss weight the current epoch's plan
            gives each row (see :mod:`hf_sbp.core.pruning`); else ``None``.
        irreducible_losses: for strategies that set ``needs_irreducible_loss``: ``(n,)`` every row's irreducible
            loss (CPU; see :mod:`hf_sbp.irreducible_loss`); else ``None``.
        example_loss: when the trainer has a ``compute_loss_func``, the per-example losses it defines,
            ``(logits, labels) -> (n,)`` (see :func:`hf_sbp.subset_loss.custom_example_losses`): ``losses`` and
            ``residuals`` are then its values and their gradients in the logits. ``None``: the rule of
            ``problem_type``.

    ``residuals``, ``losses``, ``gram`` and ``gram_target`` are computed from ``logits`` and ``features`` on first
    use and then kept, so a strategy that does not read them does not pay for them. They describe the scored rows.
    """

    n: int
    labels: torch.Tensor
    problem_type: str | None
    generator: torch.Generator
    step: int = 0
    label_smoothing: float = 0.0
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    head_bias: bool = True
    example_ids: torch.Tensor | None = None
    scored_rows: torch.Tensor | None = None
    cached: CachedStats | None = None
    epoch_weights: torch.Tensor | None = None
    irreducible_losses: torch.Tensor | None = None
    example_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def _scores(self, what: str) -> None:
        if self.logits is None or self.problem_type is None or (what == "gram" and self.features is None):
            raise RuntimeError(
                f"batch.{what} needs the scoring pass, which did not run for this batch; a strategy that reads it "
                "must set the class attribute needs_scoring = True."
            )

    @property
    def scored_labels(self) -> torch.Tensor:
        """The labels of the scored rows (``labels`` itself when the scoring pass covered the batch)."""
        rows = self.scored_rows
        return self.labels if rows is None else self.labels.index_select(0, rows.to(self.labels.device))

    @cached_property
    def residuals(self) -> torch.Tensor:
        """``(n, C)`` head residuals ``r_i = dl_i/dz_i`` (float32); see :func:`hf_sbp.core.selection.head_residuals`."""
        self._scores("residuals")
        if self.example_loss is not None:
            return self._custom_scores[1]
        return head_residuals(self.logits, self.scored_labels, self.problem_type, self.label_smoothing)

    @cached_property
    def losses(self) -> torch.Tensor:
        """``(n,)`` per-example losses (float32); their mean is the model's loss on the batch."""
        self._scores("losses")
        if self.example_loss is not None:
            return self._custom_scores[0]
        return per_example_loss(self.logits, self.scored_labels, self.problem_type, self.label_smoothing)

    @cached_property
    def _custom_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        # compute_loss_func's losses and their residuals: one pass through the loss computes both.
        return custom_losses_and_residuals(self.example_loss, self.logits, self.scored_labels)

    @cached_property
    def gram(self) -> torch.Tensor:
        """``(n, n)`` Gram matrix of the last-layer gradients, ``K_ij = (r_i . r_j)(h_i . h_j + 1)`` (float32)."""
        self._scores("gram")
        return last_layer_gram(self.residuals, self.features, bias=self.head_bias)

    @cached_property
    def gram_target(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch-mean gradient ``gbar`` seen through ``gram``: ``(c, s)`` with ``c_i = <g_i, gbar>`` and
        ``s = ||gbar||^2`` in float64 (see :func:`hf_sbp.core.selection.mean_gradient_target`); computed once, for OMP's
        target and the trainer's match error alike."""
        return mean_gradient_target(self.gram)


class SelectionStrategy:
    """A rule that picks the rows of each batch to backpropagate. Subclass it and register it by name:

    .. code-block:: python

        @register_strategy("smallest-loss")
        class SmallestLoss(SelectionStrategy):
            needs_scoring = True

            def select(self, batch, k):
                return torch.argsort(batch.losses)[:k].cpu(), torch.ones(k)

    Class attributes:
        needs_scoring: whether the trainer runs the no-grad scoring pass over the whole batch before
            :meth:`select`, filling ``batch.logits`` and ``batch.features`` (and with them ``residuals``, ``losses``
            and ``gram``).
        selective: ``False`` only for the plain ``Trainer`` step (``none``): no subset is chosen at all.
        weighted: whether :meth:`select` returns weights other than 1. The trainer then computes the per-example
            losses to weight them (an unweighted subset trains with the model's own loss), and a ``compute_loss``
            override must support the weights (see ``SelectiveBackpropTrainer.supports_selection_weights``).
        description: one line for ``--help``, the README and the model card.
        settings: the ``sbp_*`` arguments the strategy reads besides ``sbp_keep``, the schedule and the seed, so
            the model card can say what applies to it.
        uses_example_cache: whether the trainer gives every training row its dataset index (``batch.example_ids``)
            and keeps a per-example statistics cache, written by every forward it runs (``batch.cached``; see
            :mod:`hf_sbp.example_cache`). The training set must then be map-style (not an ``IterableDataset``).
        caches_gradients: with ``uses_example_cache``: whether the cache keeps each example's head residual and
            input (the last-layer gradient, for ``stale-gradmatch``), or only its loss (a few bytes per example).
        prunes_dataset: the kind of strategy, not a setting: ``True`` exactly for a :class:`DatasetPruningStrategy`
            (which works on the dataset, per epoch), ``False`` for a per-batch one; :func:`register_strategy`
            refuses a class that sets it otherwise.
        default_keep: the keep fraction when ``sbp_keep`` is not given.
        needs_irreducible_loss: with ``uses_example_cache``: whether the trainer computes every training example's
            irreducible loss when ``train()`` starts (RHO-LOSS's IL models, :mod:`hf_sbp.irreducible_loss`), saves
            them with checkpoints and gives each batch its rows' (``batch.irreducible_losses``).

    Args:
        args: the trainer's arguments (a :class:`~hf_sbp.SelectiveBackpropConfig`); read the ``sbp_*`` values
            from them.
    """

    name: ClassVar[str] = ""
    needs_scoring: ClassVar[bool] = False
    selective: ClassVar[bool] = True
    weighted: ClassVar[bool] = False
    description: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ()
    uses_example_cache: ClassVar[bool] = False
    caches_gradients: ClassVar[bool] = True
    prunes_dataset: ClassVar[bool] = False
    default_keep: ClassVar[float] = 0.5
    needs_irreducible_loss: ClassVar[bool] = False

    def __init__(self, args: Any) -> None:
        self.args = args

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose rows of ``batch`` and their loss weights.

        Args:
            batch: the batch (see :class:`SelectionBatch`).
            k: the subset size that ``sbp_keep`` asks for, ``round(keep * n)`` and at least 1. A strategy may
                return fewer or more rows (Jiang's coin flips do) but at least one.

        Returns:
            ``(indices, weights)``: distinct integer row indices in ``[0, n)`` and finite non-negative weights of the
            same length, not all 0 (the trainer raises, naming the strategy, for anything else). The subset's loss
            is ``(1/m) sum_S w_i l_i`` with ``m`` rows, so weight 1 means "counts like one example of a smaller
            batch". Weights that are all NaN give up on the batch: the step trains it whole (``sbp/fallback_steps``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement select(batch, k).")

    def rows_to_score(self, batch: SelectionBatch) -> torch.Tensor:
        """The rows of ``batch`` that the scoring pass must cover, called before it runs for a strategy that
        ``needs_scoring``: by default all of them. A strategy with cached statistics returns fewer (an empty tensor
        skips the scoring pass); ``batch.logits`` and ``batch.features`` then describe those rows only."""
        return torch.arange(batch.n)

    def observe(self, indices: torch.Tensor, subset: SelectionBatch) -> None:
        """Receive what the subset's gradient forward computed, for strategies that learn from history.

        Called after the forward pass of each selective step, only when a subclass overrides it (the trainer then
        captures the head's input during that forward). ``indices`` are the rows of the batch that were selected;
        ``subset`` describes them, in that order: its ``logits`` and ``features`` come from the gradient forward
        (in training mode, detached), so ``subset.losses`` and ``subset.residuals`` are what was just trained on,
        and ``subset.example_ids`` are their dataset indices where known.
        """

    def end_step(self, sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Called at the end of every selective training step, on every process together, only when a subclass
        overrides it: the place to agree across processes on state that decides whether the next step scores (DDP
        syncs buffers in every forward, so a scoring pass on some processes only would desynchronise them).
        ``sum_across_processes`` sums a CPU float64 tensor over the processes (a collective every process must
        call the same number of times); ``None`` on a single process."""

    def step_metrics(self) -> dict[str, float]:
        """This step's values of the strategy's own selection metrics (keys of
        :data:`hf_sbp.selection_metrics.METRICS`, e.g. a switch's state), read by the trainer after :meth:`select`
        and logged, averaged, like the trainer's own; none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What must survive a checkpoint (histories, caches). Tensors, numbers, strings, lists and dicts only,
        so that ``torch.load(weights_only=True)`` can read it back. The trainer saves its generator itself."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @classmethod
    def observes(cls) -> bool:
        """Whether the strategy overrides :meth:`observe` (the trainer skips the capture otherwise)."""
        return cls.observe is not SelectionStrategy.observe

    @classmethod
    def ends_steps(cls) -> bool:
        """Whether the strategy overrides :meth:`end_step` (the trainer skips the call, and its collective,
        otherwise)."""
        return cls.end_step is not SelectionStrategy.end_step


class DatasetPruningStrategy(SelectionStrategy):
    """A rule that prunes the dataset per epoch instead of selecting within batches. Subclass it, implement
    :meth:`keep_examples` and register it by name:

    .. code-block:: python

        @register_strategy("skip-learnt")
        class SkipLearnt(DatasetPruningStrategy):
            def keep_examples(self, losses, seen, generator):
                keep = ~seen | (losses > 0.05)  # examples not seen yet, or not yet learnt
                return keep, torch.ones_like(losses)

    At the start of each epoch the trainer asks :meth:`keep_examples` which examples the epoch visits and with which
    loss weights, from each example's loss recorded by the forward passes it already runs (a few bytes per example),
    and trains every row of each batch with its epoch weight; ``sbp_keep`` and the batch schedule (``sbp_start``,
    ``sbp_end``, ``sbp_interrupt``) do not apply, and epochs have fewer steps (see :mod:`hf_sbp.epoch_pruning`). Set
    ``weighted = True`` when the weights are not all 1; ``description`` and ``settings`` mean what they mean for a
    per-batch strategy, and so do :meth:`state_dict` and :meth:`load_state_dict`. Nothing else is to be set or
    overridden: the trainer runs no scoring pass for it and it observes nothing.
    """

    prunes_dataset: ClassVar[bool] = True
    uses_example_cache: ClassVar[bool] = True
    caches_gradients: ClassVar[bool] = False
    default_keep: ClassVar[float] = 1.0

    def keep_examples(
        self, losses: torch.Tensor, seen: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples the next epoch visits, and their loss weights.

        Args:
            losses: ``(N,)`` every training example's loss from the last forward pass that saw it.
            seen: ``(N,)`` bool, whether the example has been seen (its loss is meaningless otherwise).
            generator: a generator that depends only on the seed and the epoch (every process draws the same).

        Returns:
            ``(keep, weights)``: an ``(N,)`` bool mask (at least one example kept) and ``(N,)`` non-negative loss
            weights, applied as selection weights are, to every step of the epoch.
        """
        raise NotImplementedError(f"{type(self).__name__} prunes the dataset and must implement keep_examples().")

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row of the batch, with the weight its epoch's plan gives it (not to be overridden)."""
        if batch.epoch_weights is None:
            raise RuntimeError(
                f"sbp_strategy={self.name!r} prunes the dataset per epoch, and this batch came with no epoch plan: "
                "train it through SelectiveBackpropTrainer.train()."
            )
        return torch.arange(batch.n), batch.epoch_weights.float().cpu()


def _check_kind(cls: type[SelectionStrategy], name: str) -> None:
    """The class attributes that describe the kind of strategy, as its base class fixes them."""
    pruning = issubclass(cls, DatasetPruningStrategy)
    if bool(cls.prunes_dataset) != pruning:
        raise TypeError(
            f"@register_strategy({name!r}): {cls.__name__} sets prunes_dataset={cls.prunes_dataset!r}; a strategy "
            "that prunes the dataset per epoch subclasses DatasetPruningStrategy (and only those do), a per-batch one "
            "subclasses SelectionStrategy."
        )
    if pruning:
        per_batch = [label for label, used in (
            ("needs_scoring", cls.needs_scoring),
            ("needs_irreducible_loss", cls.needs_irreducible_loss),
            ("caches_gradients", cls.caches_gradients),
            ("uses_example_cache = False", not cls.uses_example_cache),
            ("selective = False", not cls.selective),
            ("observe()", cls.observes()),
            ("end_step()", cls.ends_steps()),
            ("select()", cls.select is not DatasetPruningStrategy.select),
        ) if used]  # fmt: skip
        if per_batch:
            raise TypeError(
                f"@register_strategy({name!r}): {cls.__name__} is a DatasetPruningStrategy and sets or overrides "
                f"{per_batch}, which belong to per-batch strategies; subclass SelectionStrategy for those."
            )
    elif "keep_examples" in {attribute for klass in cls.__mro__ for attribute in vars(klass)}:
        raise TypeError(
            f"@register_strategy({name!r}): {cls.__name__} defines keep_examples(), which only a strategy that "
            "prunes the dataset has: subclass DatasetPruningStrategy."
        )


_REGISTRY: dict[str, type[SelectionStrategy]] = {}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def register_strategy(name: str):
    """Class decorator: make ``name`` a valid ``sbp_strategy`` that means this :class:`SelectionStrategy`.

    Names are lower-case letters, digits, ``-``, ``_`` and ``.``. Registering another class under a taken name is
    an error; re-running the same class definition (a reloaded module) replaces it.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"strategy name {name!r} is invalid; use lower-case letters, digits, '-', '_' and '.', starting with a "
            "letter or digit."
        )

    def decorator(cls: type[SelectionStrategy]) -> type[SelectionStrategy]:
        if not (isinstance(cls, type) and issubclass(cls, SelectionStrategy)):
            raise TypeError(
                f"@register_strategy({name!r}) decorates {cls!r}, which is not a SelectionStrategy subclass."
            )
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ + existing.__module__ != cls.__qualname__ + cls.__module__:
            raise ValueError(
                f"a strategy named {name!r} is already registered ({existing.__module__}.{existing.__qualname__}); "
                "choose another name."
            )
        _check_kind(cls, name)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def registered_strategies() -> tuple[str, ...]:
    """The names ``sbp_strategy`` accepts, in the order they were registered (the built-in ones first)."""
    return tuple(_REGISTRY)


def strategy_class(name: str) -> type[SelectionStrategy]:
    """The class registered as ``name``; a ``ValueError`` naming the registered ones if there is none."""
    if name not in _REGISTRY:
        raise ValueError(
            f"sbp_strategy={name!r} is not a registered strategy; choose one of {list(_REGISTRY)}, or register "
            "your own with @hf_sbp.register_strategy (and import its module first, e.g. with "
            "--sbp_strategy_modules)."
        )
    return _REGISTRY[name]


def checked_selection(indices: Any, weights: Any, n: int, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A strategy's choice for a batch of ``n`` as CPU tensors (long indices, float32 weights), or a clear error naming
    the strategy and the bad value if it broke the contract of ``SelectionStrategy.select``: integer indices, distinct,
    in ``[0, n)``, at least one; one finite weight ``>= 0`` per index, not all 0. Weights that are all NaN are the
    strategy's way to give up on the batch (the trainer then trains it whole), so they pass."""
    indices = torch.as_tensor(indices).detach().cpu()
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        # long() would truncate 2.7 to 2 (or turn a mask into rows 0 and 1): another subset than the one meant.
        raise ValueError(
            f"strategy {strategy!r} returned indices of dtype {indices.dtype} ({_shown(indices)}); "
            "select() must return integer row indices (a LongTensor), not floats or a mask."
        )
    indices = indices.long().reshape(-1)
    weights = torch.as_tensor(weights).detach().cpu().float()
    m = indices.numel()
    in_range = m > 0 and int(indices.min()) >= 0 and int(indices.max()) < n
    if weights.shape != (m,) or not in_range or indices.unique().numel() != m:
        raise ValueError(
            f"strategy {strategy!r} returned {m} indices ({_shown(indices)}) and weights of shape "
            f"{tuple(weights.shape)} for a batch of {n}; select() must return at least one distinct index in "
            f"[0, {n}) and one weight per index."
        )
    if bool(weights.isnan().all()):
        return indices, weights
    shown = _shown(weights)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(
            f"strategy {strategy!r} returned non-finite weights ({shown}); select() must return finite weights >= 0 "
            "(or all NaN to give up on the batch, which then trains whole)."
        )
    if bool((weights < 0).any()):
        row = int(torch.argmin(weights))
        raise ValueError(
            f"strategy {strategy!r} returned a negative weight ({float(weights[row]):.4g} for row {int(indices[row])}; "
            f"weights {shown}); select() must return weights >= 0: a negative weight would ascend that row's loss."
        )
    if not bool((weights > 0).any()):
        raise ValueError(
            f"strategy {strategy!r} returned weights that are all 0 for its {m} rows; the step would train nothing. "
            "select() must give at least one row a positive weight."
        )
    return indices, weights


def _shown(values: torch.Tensor, most: int = 10) -> str:
    """The first ``most`` values, as an error message quotes them (``[0.9, 2.7]``, not float32's ``0.899999976``)."""
    flat = values.reshape(-1)
    items = [str(v) if isinstance(v, bool) else f"{v:.4g}" for v in flat[:most].tolist()]
    return "[" + ", ".join(items) + (", ...]" if flat.numel() > most else "]")
