"""hf_sbp: Selective Backprop for Hugging Face ``Trainer``.

``SelectiveBackpropTrainer`` is a drop-in ``transformers.Trainer`` that, per training batch, scores the
examples with a cheap no-grad forward, keeps a weighted subset (gradient matching with OMP, loss-based,
or uniformly random) and runs forward + backward on that subset only.
"""

from .config import SelectiveBackpropConfig
from .trainer import SelectiveBackpropTrainer

__version__ = "0.1.0"

__all__ = ["SelectiveBackpropConfig", "SelectiveBackpropTrainer", "__version__"]
