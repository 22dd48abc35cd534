import os

import pytest
import torch

# Everything in the suite runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, where CUDA is not available (``pytest -m gpu`` selects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); scripts/gpu_check.sh runs it"
    )
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
