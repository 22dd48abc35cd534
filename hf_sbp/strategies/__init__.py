"""Selection strategies: one registered class each.

``sbp_strategy`` accepts every name registered with :func:`register_strategy`. The built-in ones are
``gradmatch``, ``loss``, ``random``, ``none``, ``stale-gradmatch``, ``stale-loss``,
``importance``, ``stale-importance``, ``rho-loss``, ``stale-rho-loss`` (per batch), ``infobatch`` and
``random-prune`` (per epoch, over the dataset); a strategy defined in user code is registered the same way and
works with the trainer, ``HfArgumentParser`` flags, the scripts (``--sbp_strategy_modules``) and the model card.
"""

from .base import (
    DatasetPruningStrategy,
    SelectionBatch,
    SelectionStrategy,
    register_strategy,
    registered_strategies,
    strategy_class,
)
from .full_batch import FullBatch
from .gradmatch import GradientMatching
from .loss import LossBased
from .random_subset import RandomSubset
from .stale import StaleGradientMatching, StaleLossBased

# isort: split
from .importance import ImportanceSampling, StaleImportanceSampling
from .rho_loss import RhoLoss, StaleRhoLoss

# Imported last: registration order is the order of --help, the README table and the plots (per-batch ones first).
# isort: split
from .pruning import InfoBatch, RandomPrune

__all__ = [
    "DatasetPruningStrategy",
    "FullBatch",
    "GradientMatching",
    "ImportanceSampling",
    "InfoBatch",
    "LossBased",
    "RandomPrune",
    "RandomSubset",
    "SelectionBatch",
    "SelectionStrategy",
    "StaleImportanceSampling",
    "StaleGradientMatching",
    "StaleLossBased",
    "RhoLoss",
    "StaleRhoLoss",
    "register_strategy",
    "registered_strategies",
    "strategy_class",
]
