"""``python -m hf_sbp.benchmark``: the benchmark's command line (see :mod:`hf_sbp.benchmark`)."""

from .cli import main

if __name__ == "__main__":
    main()
