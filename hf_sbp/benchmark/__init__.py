"""Benchmarks of selective backprop: overhead, throughput, gradient match, the paper's training experiment and time
to accuracy.

    python scripts/benchmark.py all --quick          # everything, about 15 minutes on 2 CPU cores
    python scripts/benchmark.py all                  # the full run, about 4 hours on 2 CPU cores (sum of its parts)
    python scripts/benchmark.py overhead|throughput|grad-match|training|time-to-accuracy|padding [--quick]
    python scripts/benchmark.py throughput --peft lora   # the step times with LoRA, beside full fine-tuning's
    python scripts/benchmark.py report               # tables and plots from the JSON already written

The other quick parts take about 8 minutes together, time-to-accuracy --quick about 5 (one cell: tweets, no noise,
seed 0); in the full run the training part takes about 55 minutes, grad-match about 10 on an idle machine (two tasks,
classification and regression, three weight modes of gradmatch; 56 minutes under load), and time-to-accuracy about a
minute per run (2 datasets x noise 0, 0.2 x 3 seeds = 12 cells, each the full batch plus every strategy at keep 0.5
on the full batch's wall-clock budget: 5 to 6 minutes per cell with four strategies, 11 to 14 with every registered
one, 2 h 25 min for that grid; it is resumable: a rerun skips
the runs already in its JSON file, see :mod:`hf_sbp.benchmark.time_to_accuracy`).

(``python -m hf_sbp.benchmark`` is the same command.) Data: the bundled datasets by name
(``--datasets tweets,bbc-news``), any ``datasets`` name that ``run_glue.py`` takes, or local CSV/JSON files
(``--train_file``, ``--validation_file``, ``--test_file``), with the text/label column rules of ``run_glue.py``.
Strategies: ``--strategies`` picks the selective strategies that the parts compare with the full batch (default:
every registered one; ``--sbp_strategy_modules`` imports modules that register more). The dataset-level ones
(``infobatch``, ``random-prune``) run in time-to-accuracy only: the per-step parts would time a full batch's step.
Every JSON file is ``{"machine": {...}, "rows": [...]}`` and lands in ``--output_dir`` (``docs/benchmarks`` by
default).

The code has one module per part: ``common`` (arguments, data, model, trainers, JSON files), ``overhead``,
``throughput``, ``grad_match``, ``training`` (the training runs and their statistics, which ``scripts/demo.py``
shares), ``time_to_accuracy``, ``padding`` (re-padding of the subset and the shortened scoring pass: ``padding.json``
and ``scoring_length.json``, 8 to 12 minutes for both datasets at ``--repeats`` 15 to 30, about 2 quick), ``report``
and ``cli`` (``main``).
"""

from .cli import main

__all__ = ["main"]
