"""The package version (one home: ``hf_sbp.__version__`` and the model card read it here)."""

__version__ = "0.1.0"
