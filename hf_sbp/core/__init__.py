"""The numerical core: plain functions on tensors and arrays, with no ``transformers``, ``Trainer`` or dataset in
sight (a test keeps it so).

- :mod:`.selection`: the losses, the last-layer gradients, their Gram matrix, the match error and the selection
  rules (random, loss-based);
- :mod:`.omp`: OMP on the Gram matrix and its weights; :mod:`.omp_loop` (Numba, on the CPU) and :mod:`.omp_torch`
  (on the Gram matrix's device) run its loop;
- :mod:`.importance`: importance sampling's scores, draws, weights and switch;
- :mod:`.rho_loss`: RHO-LOSS's halves, linear probe and reducible loss;
- :mod:`.pruning`: the epoch plans of dataset-level pruning (InfoBatch, random pruning);
- :mod:`.padding`: trimming a subset's padding columns, truncating the scoring pass;
- :mod:`.schedule`: which steps select.
"""
