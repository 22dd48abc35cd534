"""Benchmarks of selective backprop: overhead, throughput, gradient match, time to accuracy and padding.

``python scripts/benchmark.py --help`` (or ``python -m hf_sbp.benchmark --help``) lists the commands and options
(:data:`hf_sbp.benchmark.cli.USAGE`); ``docs/benchmarks/README.md`` says how each figure is made and how long the
parts take. One module per part: ``common`` (arguments, data, model, trainers, JSON files), ``overhead``,
``throughput``, ``grad_match``, ``time_to_accuracy`` (whose runs ``scripts/demo.py`` shares; with
``wall_clock``, its clocks and schedule, ``tta_stats``, its statistics, and ``tta_report``, its generated summary),
``padding``, ``report`` (``report.md``), ``palette`` and ``cli`` (``main``).
"""

from .cli import main

__all__ = ["main"]
