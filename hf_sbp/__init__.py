"""hf_sbp: Selective Backprop for Hugging Face ``Trainer``.

``SelectiveBackpropTrainer`` is a drop-in ``transformers.Trainer`` that, per training batch, scores the
examples with a cheap no-grad forward, keeps a weighted subset (gradient matching with OMP, loss-based,
uniformly random, or any strategy registered with :func:`register_strategy`) and runs forward + backward on that
subset only; a :class:`DatasetPruningStrategy` prunes the dataset per epoch instead.
"""

from ._version import __version__
from .config import SelectiveBackpropArguments, SelectiveBackpropConfig
from .strategies import (
    DatasetPruningStrategy,
    SelectionBatch,
    SelectionStrategy,
    register_strategy,
    registered_strategies,
)
from .trainer import SelectiveBackpropTrainer

__all__ = [
    "DatasetPruningStrategy",
    "SelectionBatch",
    "SelectionStrategy",
    "SelectiveBackpropArguments",
    "SelectiveBackpropConfig",
    "SelectiveBackpropTrainer",
    "__version__",
    "register_strategy",
    "registered_strategies",
]
