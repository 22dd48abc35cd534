"""Generalized OMP (``sbp_omp_batch`` > 1) against OMP at large batches: match error and time.

    python scripts/omp_batch_quality.py                 # batches 1, 4, 8, 16; minutes on a CPU
    python scripts/omp_batch_quality.py --batches 1,2,8 --sizes 1024

Other arguments go to the benchmark's (``--model_name_or_path``, ``--train_file``, ...); see
:mod:`hf_sbp.benchmark.omp_batch`.
"""

from hf_sbp.benchmark.omp_batch import main

if __name__ == "__main__":
    main()
