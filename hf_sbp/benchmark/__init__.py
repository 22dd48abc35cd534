"""Benchmarks of selective backprop: overhead, throughput, gradient match and the paper's training experiment.

    python scripts/benchmark.py all --quick          # everything, about 8 minutes on 2 CPU cores
    python scripts/benchmark.py all                  # the full run, about 70 minutes on 2 CPU cores
    python scripts/benchmark.py overhead|throughput|grad-match|training [--quick]
    python scripts/benchmark.py report               # tables and plots from the JSON already written

(``python -m hf_sbp.benchmark`` is the same command.) Data: the bundled datasets by name
(``--datasets tweets,bbc-news``), any ``datasets`` name that ``run_glue.py`` takes, or local CSV/JSON files
(``--train_file``, ``--validation_file``, ``--test_file``), with the text/label column rules of ``run_glue.py``.
Strategies: ``--strategies`` picks the selective strategies that throughput, grad-match and training compare with
the full batch (default: every registered one; ``--sbp_strategy_modules`` imports modules that register more).
Every JSON file is ``{"machine": {...}, "rows": [...]}`` and lands in ``--output_dir`` (``docs/benchmarks`` by
default).

The code has one module per part: ``common`` (arguments, data, model, trainers, JSON files), ``overhead``,
``throughput``, ``grad_match``, ``training`` (the training runs and their statistics, which ``scripts/demo.py``
shares), ``report`` and ``cli`` (``main``).
"""

from .cli import main

__all__ = ["main"]
