"""Example identity and the per-example statistics cache of the ``stale-*`` and dataset-level strategies.

Every training row carries its dataset index (:data:`EXAMPLE_ID_KEY`) from the sampler through
``remove_unused_columns`` and the collator to the trainer, which strips it before the model sees the batch.
:class:`ExampleStatsCache` keeps, per example, what the last forward pass that saw it computed: its loss, its head
residual ``r_i = dl_i/dz_i``, its head input ``h_i`` (optionally projected), and the epoch at which it was seen. The
scoring pass writes the rows it scores, the subset's gradient forward the rows it trains on, so the cache costs no
extra forward pass.

Memory: ``4 (loss) + 4 C (residual) + 2 p (head input, float16) + 4 (epoch)`` bytes per example, with ``C`` the
number of labels and ``p`` the head's input size (or ``sbp_cache_projection_dim``): 784 bytes for a 384-dim head
and 2 labels, 78 MB for 100,000 examples; 80 bytes (8 MB) projected to 32 dimensions. The dataset-level strategies
(``infobatch``, ``random-prune``) read losses alone: 8 bytes per example (``gradients=False``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

EXAMPLE_ID_KEY = "sbp_example_id"
"""The batch key of the rows' dataset indices (added to the training set, removed before the model's forward)."""


class ExampleIdDataset(torch.utils.data.Dataset):
    """A map-style dataset whose rows (mappings) carry their index under :data:`EXAMPLE_ID_KEY`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[index]
        if not isinstance(row, dict) and not hasattr(row, "keys"):
            raise TypeError(
                f"training example {index} is a {type(row).__name__}, but the stale-* strategies need each example "
                "to be a mapping (a dict of features) so that it can carry its index; return dicts from the dataset."
            )
        return {**row, EXAMPLE_ID_KEY: index}


def with_example_ids(dataset: Any) -> Any:
    """``dataset`` with each row's index in a column :data:`EXAMPLE_ID_KEY`: a ``datasets.Dataset`` stays one (a new
    column), any other map-style dataset is wrapped. An ``IterableDataset`` has no indices: ``ValueError``."""
    check_indexable(dataset)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        return dataset.add_column(EXAMPLE_ID_KEY, list(range(len(dataset))))
    return ExampleIdDataset(dataset)


def check_indexable(dataset: Any) -> None:
    """Raise ``ValueError`` unless ``dataset`` is a sized map-style dataset without a column named like the ids."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"the training set is a {type(dataset).__name__}, which has no example indices; the stale-* strategies "
            "cache statistics per example and need a map-style dataset (a datasets.Dataset or a torch Dataset with "
            "__getitem__ and __len__)."
        )
    try:
        len(dataset)
    except TypeError as error:
        raise ValueError(
            f"the training set ({type(dataset).__name__}) has no length, so its examples cannot be indexed; the "
            "stale-* strategies need a map-style dataset with __len__."
        ) from error
    if EXAMPLE_ID_KEY in (getattr(dataset, "column_names", None) or ()):
        raise ValueError(
            f"the training set has a column named {EXAMPLE_ID_KEY!r}, the name the trainer gives the example "
            "indices; rename that column."
        )


@dataclass
class CachedStats:
    """The cached statistics of one batch's rows (float32, on the CPU).

    Attributes:
        losses: ``(n,)`` per-example losses of the last forward that saw each row.
        residuals: ``(n, C)`` head residuals ``dl_i/dz_i``.
        features: ``(n, p)`` head inputs (projected when ``sbp_cache_projection_dim`` > 0).
        age: ``(n,)`` epochs since each row was seen (``inf`` for a row never seen).
        head_bias: whether the head has a bias (its gradient is part of the last-layer gradient).
    """

    losses: torch.Tensor
    residuals: torch.Tensor
    features: torch.Tensor
    age: torch.Tensor
    head_bias: bool


class ExampleStatsCache:
    """Per-example loss, head residual, head input and the epoch seen, for ``num_examples`` examples.

    The storage is allocated at the first write, when the number of labels and the head's input size are known.

    Args:
        num_examples: the training set's size.
        projection_dim: if > 0, head inputs are stored projected to this many dimensions by a fixed Gaussian matrix
            scaled by ``1/sqrt(p)`` (inner products are then kept in expectation, with relative noise about
            ``1/sqrt(p)``); 0 stores them whole. Either way they are stored in float16.
        seed: the projection's seed.
        exchanged: whether writes are kept until :meth:`exchange` shares them with the other processes (DDP); a
            single process keeps nothing beyond the cache itself.
        gradients: whether to keep the head residuals and inputs; without them the cache records each example's
            loss and epoch alone (8 bytes per example), all that a dataset-level strategy reads.
    """

    def __init__(
        self,
        num_examples: int,
        projection_dim: int = 0,
        seed: int = 0,
        exchanged: bool = False,
        gradients: bool = True,
    ) -> None:
        self.num_examples = num_examples
        self.projection_dim = projection_dim
        self.seed = seed
        self.exchanged = exchanged
        self.gradients = gradients
        self.projection: torch.Tensor | None = None
        self.losses = self.residuals = self.features = self.epochs = None
        self.head_bias = True
        self._pending: list[torch.Tensor] = []

    @property
    def allocated(self) -> bool:
        return self.losses is not None

    @property
    def bytes_per_example(self) -> int:
        """Bytes each example takes (0 before the first write)."""
        if not self.allocated:
            return 0
        return 4 + 4 * self.residuals.shape[1] + 2 * self.features.shape[1] + 4

    def _allocate(self, num_outputs: int, feature_dim: int) -> None:
        if not self.gradients:
            num_outputs = feature_dim = 0
        stored = feature_dim
        if self.projection_dim > 0 and self.gradients:
            generator = torch.Generator().manual_seed(self.seed)
            self.projection = torch.randn(feature_dim, self.projection_dim, generator=generator) / math.sqrt(
                self.projection_dim
            )
            stored = self.projection_dim
        n = self.num_examples
        self.losses = torch.zeros(n)
        self.residuals = torch.zeros(n, num_outputs)
        self.features = torch.zeros(n, stored, dtype=torch.float16)
        self.epochs = torch.full((n,), math.nan)
        logger.info(
            f"Per-example statistics cache: {n} examples x {self.bytes_per_example} bytes = "
            f"{n * self.bytes_per_example / 2**20:.1f} MiB."
        )

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.detach().cpu().long().reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_examples):
            raise ValueError(
                f"example ids {ids.tolist()[:10]} are outside [0, {self.num_examples}): the batch's "
                f"{EXAMPLE_ID_KEY!r} must index the training set the trainer was given."
            )
        return ids

    def write(
        self,
        ids: torch.Tensor,
        epoch: float,
        losses: torch.Tensor,
        residuals: torch.Tensor,
        features: torch.Tensor,
        head_bias: bool = True,
    ) -> None:
        """Record what a forward pass computed for the rows ``ids`` at training epoch ``epoch``."""
        ids = self._check_ids(ids)
        if ids.numel() == 0:
            return
        features = features.detach().float().cpu()
        if not self.allocated:
            self._allocate(residuals.shape[-1], features.shape[-1])
        if not self.gradients:
            residuals, features = residuals.new_zeros(ids.numel(), 0), features.new_zeros(ids.numel(), 0)
        if self.projection is not None:
            features = features @ self.projection
        update = torch.cat(
            [
                ids.double()[:, None],
                torch.full((ids.numel(), 1), float(epoch), dtype=torch.float64),
                losses.detach().cpu().double().reshape(-1, 1),
                residuals.detach().cpu().double().reshape(ids.numel(), -1),
                features.double(),
            ],
            dim=1,
        )
        self.head_bias = head_bias
        self._apply(update)
        if self.exchanged:  # without an exchange to empty it, the list would grow with every step
            self._pending.append(update)

    def _apply(self, update: torch.Tensor) -> None:
        update = update[update[:, 0] >= 0]  # rows padded by the exchange have id -1
        ids, c = update[:, 0].long(), self.residuals.shape[1]
        self.epochs[ids] = update[:, 1].float()
        self.losses[ids] = update[:, 2].float()
        self.residuals[ids] = update[:, 3 : 3 + c].float()
        self.features[ids] = update[:, 3 + c :].half()

    def exchange(self, gather: Callable[[torch.Tensor], torch.Tensor], num_outputs: int, feature_dim: int) -> None:
        """Apply every process's writes since the last exchange, so that each holds the same cache (DDP).

        Args:
            gather: pads a ``(rows, width)`` float64 tensor along dim 0 with id -1 and gathers it from every process
                (every process must call this together, as for any collective).
            num_outputs, feature_dim: the head's output and input sizes (for a process that has written nothing
                yet, so that its tensor has the common width).
        """
        if not self.allocated:
            self._allocate(num_outputs, feature_dim)
        width = 3 + self.residuals.shape[1] + self.features.shape[1]
        pending = torch.cat(self._pending) if self._pending else torch.zeros(0, width, dtype=torch.float64)
        self._pending = []
        # Applied in process order: a row two processes saw (a DistributedSampler repeats rows to even out the
        # shards) ends with the same values everywhere.
        self._apply(gather(pending).cpu())

    def lookup(self, ids: torch.Tensor, epoch: float) -> CachedStats:
        """The cached statistics of the rows ``ids`` at training epoch ``epoch`` (``age`` inf where never seen)."""
        ids = self._check_ids(ids)
        if not self.allocated:
            n = ids.numel()
            return CachedStats(torch.zeros(n), torch.zeros(n, 0), torch.zeros(n, 0), torch.full((n,), math.inf), True)
        age = float(epoch) - self.epochs[ids]
        age = torch.where(torch.isnan(age), torch.full_like(age, math.inf), age)
        return CachedStats(self.losses[ids], self.residuals[ids], self.features[ids].float(), age, self.head_bias)

    def loss_record(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(losses, seen)``: every example's last recorded loss (0 where never seen) and whether it was seen."""
        if not self.allocated:
            return torch.zeros(self.num_examples), torch.zeros(self.num_examples, dtype=torch.bool)
        return self.losses.clone(), ~torch.isnan(self.epochs)

    def state_dict(self) -> dict[str, Any]:
        """The whole cache (tensors and numbers only, for ``torch.load(weights_only=True)``)."""
        state: dict[str, Any] = {"num_examples": self.num_examples, "projection_dim": self.projection_dim}
        state["gradients"] = self.gradients
        if self.allocated:
            state.update(losses=self.losses, residuals=self.residuals, features=self.features, epochs=self.epochs)
            state.update(head_bias=self.head_bias, projection=self.projection)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("gradients", True) != self.gradients:
            raise ValueError(
                f"the checkpoint's statistics cache {'keeps' if state.get('gradients', True) else 'does not keep'} "
                "last-layer gradients and this run's does the opposite; resume with the checkpoint's strategy."
            )
        if state["num_examples"] != self.num_examples or state["projection_dim"] != self.projection_dim:
            raise ValueError(
                f"the checkpoint's statistics cache holds {state['num_examples']} examples (projection dim "
                f"{state['projection_dim']}), but this run has {self.num_examples} (projection dim "
                f"{self.projection_dim}); resume with the same training set and settings."
            )
        if "losses" in state:
            self.losses, self.residuals = state["losses"], state["residuals"]
            self.features, self.epochs = state["features"], state["epochs"]
            self.head_bias, self.projection = bool(state["head_bias"]), state["projection"]
        self._pending = []
