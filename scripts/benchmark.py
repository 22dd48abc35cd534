"""Benchmarks of selective backprop: the command line of :mod:`hf_sbp.benchmark` (its docstring, or ``--help``, has
the commands and options).

    python scripts/benchmark.py all --quick
    python scripts/benchmark.py report
"""

from hf_sbp.benchmark import main

if __name__ == "__main__":
    main()
