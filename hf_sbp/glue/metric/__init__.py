"""The offline GLUE `evaluate` metric shipped with ``hf_sbp`` (loaded by path, so it needs no Hub).

``GLUE_OFFLINE_PATH`` is the folder of the ``glue_offline`` module: ``evaluate.load(GLUE_OFFLINE_PATH, "cola")``
works like ``evaluate.load("glue", "cola")`` with no network. The module file is package data (see
``pyproject.toml``), so an installed ``hf_sbp`` carries it.
"""

from __future__ import annotations

import os

GLUE_OFFLINE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "glue_offline")


def load_glue_offline(config_name: str, **kwargs):
    """``evaluate.load`` of the offline GLUE metric with ``config_name`` (a GLUE task, ``accuracy``,
    ``multiclass`` or ``regression``); extra keyword arguments go to ``evaluate.load``."""
    import evaluate

    return evaluate.load(GLUE_OFFLINE_PATH, config_name, **kwargs)
