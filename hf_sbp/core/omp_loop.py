"""OMP's inner loop, compiled with Numba: :func:`hf_sbp.core.omp.omp_gram` checks the inputs, this module loops.

Compiled because as NumPy calls the loop was dispatch-bound: at ``n`` rows and keep ``q`` it takes at least ``q n``
steps (more when atoms are removed) of a few dozen small operations each, and at a few microseconds of dispatch a
call those cost more than the step's arithmetic. Everything here is plain loops on arrays; nothing calls BLAS, so no
thread pool is involved. What OMP costs per step is measured by ``scripts/benchmark.py overhead``
(``docs/benchmarks/overhead.json``).

Reductions (dot products) may reassociate (:func:`_dot`), so that they vectorise; every other operation runs in the
order it is written. Results therefore differ from a NumPy implementation's in the last bits of a float64, no more.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# cache=True: compiled once per machine and dtype of K (10 to 20 s), into __pycache__ beside this file (or Numba's
# user-wide cache when that is not writable), then loaded by each process in a fraction of a second.
_jit = njit(cache=True, nogil=True)


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dot(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """``a[:size] . b[:size]``; reassociation lets the reduction vectorise (it is latency-bound otherwise)."""
    total = 0.0
    for i in range(size):
        total += a[i] * b[i]
    return total


# The loops below work on slices that start at 0 through these helpers: indices known to be non-negative let LLVM
# drop Numba's negative-index wraparound and vectorise them (3 to 4 times faster than the same loops over a range
# that starts elsewhere).


@_jit
def _subtract_scaled(out: np.ndarray, x: float, a: np.ndarray, size: int) -> None:
    """``out[:size] -= x * a[:size]``."""
    for i in range(size):
        out[i] -= x * a[i]


@_jit
def _copy(out: np.ndarray, a: np.ndarray, size: int) -> None:
    """``out[:size] = a[:size]`` (``out`` may be ``a`` shifted left: ascending order reads before it writes)."""
    for i in range(size):
        out[i] = a[i]


@_jit
def _rotate(a: np.ndarray, b: np.ndarray, cos: float, sin: float, size: int) -> None:
    """``(a, b) = (cos a + sin b, cos b - sin a)`` on the first ``size`` entries: a Givens rotation."""
    for i in range(size):
        x, y = a[i], b[i]
        a[i] = cos * x + sin * y
        b[i] = cos * y - sin * x


@_jit
def _forward_solve(Lt: np.ndarray, size: int, b: np.ndarray, out: np.ndarray) -> None:
    """``out[:size] = L^-1 b[:size]`` for the lower-triangular ``L`` stored transposed, column ``c`` of ``L`` in row
    ``c`` of ``Lt``: column-oriented substitution reads ``Lt`` by rows, and its updates vectorise."""
    _copy(out, b, size)
    for c in range(size):
        x = out[c] / Lt[c, c]
        out[c] = x
        _subtract_scaled(out[c + 1 :], x, Lt[c, c + 1 :], size - c - 1)


@_jit
def _backward_solve(Lt: np.ndarray, size: int, z: np.ndarray, out: np.ndarray) -> None:
    """``out[:size] = L^-T z[:size]``: row-oriented substitution on the upper-triangular ``Lt = L^T``."""
    for i in range(size - 1, -1, -1):
        out[i] = (z[i] - _dot(Lt[i, i + 1 :], out[i + 1 :], size - i - 1)) / Lt[i, i]


@_jit
def _cholesky_delete(Lt: np.ndarray, size: int, j: int, z: np.ndarray) -> None:
    """In place: turn ``L`` (stored transposed in ``Lt[:size, :size]``), the Cholesky factor of ``A``, into that of
    ``A`` without row and column ``j`` (in ``Lt[:size - 1, :size - 1]``; row and column ``size - 1`` become zero),
    and ``z = L^-1 b`` into ``L'^-1 b'`` for ``b`` without entry ``j``.

    Rows of ``L`` above ``j`` stay; rows below move up one, keeping their first ``j`` entries. Their trailing block
    ``L33`` and the column ``l32`` above it satisfy ``L33' L33'^T = [l32 L33] [l32 L33]^T``: Givens rotations of
    ``l32`` against each column of ``L33`` in turn zero ``l32`` and leave ``L33'`` lower triangular, in ``O(size^2)``
    rather than a refactorisation's ``O(size^3)``. The rows below ``j`` say ``L31 z1 + l32 z_j + L33 z3 = b3``, so the
    same rotations applied to ``[z_j; z3]`` give ``z3'``.
    """
    m = size - j - 1  # rows (and columns) of L33
    extra = Lt[j]  # column j of L: l32 in entries j + 1 .. size - 1
    for r in range(m):
        c = j + 1 + r
        column = Lt[c]  # column c of L, nonzero from entry c on
        a = column[c]
        b = extra[c]
        rho = math.hypot(a, b)
        if rho == 0.0:
            continue
        cos, sin = a / rho, b / rho
        _rotate(column[c:], extra[c:], cos, sin, size - c)
        zc, zj = z[c], z[j]
        z[c] = cos * zc + sin * zj
        z[j] = cos * zj - sin * zc
    # Rows of L below j move up one: in Lt, entries j + 1 .. size - 1 of every column move to j .. size - 2, and the
    # trailing columns move up-left one.
    for c in range(j):
        _copy(Lt[c, j:], Lt[c, j + 1 :], size - 1 - j)
        Lt[c, size - 1] = 0.0
    for c in range(j, size - 1):
        _copy(Lt[c, c:], Lt[c + 1, c + 1 :], size - 1 - c)
        Lt[c, size - 1] = 0.0
        z[c] = z[c + 1]
    Lt[size - 1, :size] = 0.0
    z[size - 1] = 0.0


@_jit
def omp_loop(
    K: np.ndarray,
    corr: np.ndarray,
    target_sq: float,
    k: int,
    ridge: float,
    nonnegative: bool,
    stop_at: float,
    batch: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`hf_sbp.core.omp.omp_gram`'s loop on its checked arrays: ``(support, weights, residuals)``.

    ``K`` is an ``(n, n)`` C-contiguous float32 or float64 Gram matrix, ``corr`` the float64 target correlations,
    ``k <= n``; the loop stops once the objective is at most ``stop_at`` (``-inf``: never). ``target_sq`` may be NaN
    (no residuals are reported then). ``batch`` atoms enter per step (1: OMP). All arithmetic is in float64.
    """
    n = K.shape[0]
    diag = np.empty(n)
    for i in range(n):
        diag[i] = K[i, i]
    track = math.isfinite(target_sq)
    # Thresholds relative to the problem's own scale, so that rank-deficient, duplicated, tiny or huge Gram matrices
    # behave alike: an atom needs a correlation that is not round-off, and a Cholesky pivot that is not numerically
    # zero (a duplicate or a combination of chosen atoms).
    scale = diag.max() if n else 0.0
    corr_floor = 1e-12 * math.sqrt(max(scale, 0.0) * max(abs(target_sq), 0.0)) if track else 0.0
    corr_floor = max(corr_floor, 1e-300)
    pivot_floor = 1e-10

    # The chosen atoms in the order of L's rows, and each one's row of K_S (its slot).
    support = np.zeros(k, dtype=np.intp)
    slots = np.zeros(k, dtype=np.intp)
    s = 0
    # The Cholesky factor of K_SS + ridge I, transposed (column c of L in row c of Lt), and z = L^-1 c_S, the forward
    # half of the refit w_S = L^-T z: a new atom appends a column to Lt and an entry to z, a deletion rotates both.
    Lt = np.zeros((k, k))
    z = np.zeros(k)
    weights = np.zeros(k)  # w_S, in the order of the support
    new = np.zeros(k)  # a refit
    previous = np.zeros(k)  # Lawson-Hanson's feasible point
    v = np.zeros(k)  # a new atom's row of L
    row_k = np.zeros(k)  # a row of K (or c) at the support's atoms: the new atom's K_jS, or c_S

    # Candidates (atoms neither chosen nor found dependent) hold the first `candidates` positions of a permutation
    # of the atoms; residual correlations are computed for them only (at keep 0.5 a third of the O(n |S|) work is
    # spared). `corr_at` and `residual_corr` are in the order of positions.
    atom_at = np.arange(n)
    position = np.arange(n)
    candidates = n
    corr_at = corr.copy()
    residual_corr = corr.copy()
    # The chosen atoms' columns of K, one per slot, in K's dtype (float32 halves the memory that the residual update
    # reads, and converts to float64 exactly); row p holds the atom at position p, so that a swap of two positions
    # exchanges two contiguous rows. A dropped atom frees its slot (a free slot weighs nothing).
    K_S = np.zeros((n, k), dtype=K.dtype)
    slot_weights = np.zeros(k)
    free_slots = np.zeros(k, dtype=np.intp)
    n_free = 0
    used_slots = 0
    chosen = np.zeros(max(batch, 1), dtype=np.intp)
    dropped = np.zeros(k, dtype=np.intp)

    objective = target_sq
    residuals = np.zeros(2 * n + k + 2)
    n_residuals = 0
    if track:
        residuals[0] = math.sqrt(max(objective, 0.0))
        n_residuals = 1

    for _ in range(2 * n + k):
        if s >= k or candidates == 0 or objective <= stop_at:
            break
        want = min(batch, k - s)
        # The `want` largest scores above the floor, best first; among exact ties the lowest-numbered atom first.
        n_chosen = 0
        for _pick in range(want):
            best_p = -1
            best = corr_floor
            for p in range(candidates):
                score = residual_corr[p] if nonnegative else abs(residual_corr[p])
                if score > best or (score == best and best_p >= 0 and atom_at[p] < atom_at[best_p]):
                    taken = False
                    for q in range(n_chosen):
                        if chosen[q] == atom_at[p]:
                            taken = True
                    if not taken:
                        best, best_p = score, p
            if best_p < 0:
                break
            chosen[n_chosen] = atom_at[best_p]
            n_chosen += 1
        if n_chosen == 0:
            break  # no atom can lower the objective (NNLS optimality when nonnegative)

        added = 0
        for q in range(n_chosen):
            j = chosen[q]
            for i in range(s):
                row_k[i] = K[j, support[i]]
            _forward_solve(Lt, s, row_k, v)
            pivot_sq = diag[j] + ridge - _dot(v, v, s)
            # j is chosen or dependent: no longer a candidate.
            p, last = position[j], candidates - 1
            _swap(p, last, atom_at, position, corr_at, residual_corr, K_S, used_slots)
            candidates -= 1
            if not pivot_sq > pivot_floor * (diag[j] + ridge):
                continue  # linearly dependent on the chosen atoms: it cannot lower the objective
            pivot = math.sqrt(pivot_sq)
            for i in range(s):
                Lt[i, s] = v[i]
            Lt[s, s] = pivot
            z[s] = (corr[j] - _dot(v, z, s)) / pivot
            if n_free:
                n_free -= 1
                slot = free_slots[n_free]
            else:
                slot = used_slots
                used_slots += 1
            K_row = K[j]  # K is symmetric: j's row, contiguous, rather than its column
            for p in range(n):
                K_S[p, slot] = K_row[atom_at[p]]
            support[s] = j
            slots[s] = slot
            s += 1
            added += 1
        if added == 0:
            continue
        _backward_solve(Lt, s, z, new)

        if nonnegative and added > 1:
            # Generalized OMP: an atom of this step whose refit weight is not positive does not enter (it has no
            # positive weight that Lawson-Hanson could lower to zero), and the others are refitted without it. The
            # step's best atom alone would enter with a positive weight.
            while added > 1:
                n_dropped = 0
                for i in range(s - added, s):
                    if new[i] <= 0.0:
                        dropped[n_dropped] = i
                        n_dropped += 1
                if n_dropped == 0:
                    break
                if n_dropped == added:  # all but the step's best (the first of the step's atoms)
                    for i in range(n_dropped - 1):
                        dropped[i] = dropped[i + 1]
                    n_dropped -= 1
                s, candidates, n_free = _remove(
                    dropped[:n_dropped], s, candidates, n_free, Lt, z, support, slots, slot_weights, free_slots,
                    atom_at, position, corr_at, residual_corr, K_S, used_slots,
                )  # fmt: skip
                added -= n_dropped
                _backward_solve(Lt, s, z, new)

        if nonnegative and _any_not_positive(new, s):
            size = s - added
            previous[:size] = weights[:size]
            previous[size:s] = 0.0
            while True:
                # Lawson-Hanson: the segment from the feasible `previous` to `new` lowers the convex objective;
                # stop where the first weight reaches zero, drop it (and any other that reaches zero), and refit.
                alpha = math.inf
                for i in range(s):
                    if new[i] <= 0.0:
                        alpha = min(alpha, _step_to_zero(previous[i], new[i]))
                alpha = min(max(alpha, 0.0), 1.0)
                n_dropped = 0
                for i in range(s):
                    moved = previous[i] + alpha * (new[i] - previous[i])
                    if new[i] <= 0.0 and _step_to_zero(previous[i], new[i]) <= alpha:
                        moved = 0.0
                    if moved > 0.0:
                        previous[i - n_dropped] = moved
                    else:
                        dropped[n_dropped] = i
                        n_dropped += 1
                s, candidates, n_free = _remove(
                    dropped[:n_dropped], s, candidates, n_free, Lt, z, support, slots, slot_weights, free_slots,
                    atom_at, position, corr_at, residual_corr, K_S, used_slots,
                )  # fmt: skip
                if s == 0:
                    break
                _backward_solve(Lt, s, z, new)
                if not _any_not_positive(new, s):
                    break
        weights[:s] = new[:s]

        if s:
            for i in range(s):
                slot_weights[slots[i]] = weights[i]
            for p in range(candidates):
                residual_corr[p] = corr_at[p] - _dot(K_S[p], slot_weights, used_slots)
            # Objective of the exact (ridge) least-squares solution on S: ||t||^2 - w . c_S.
            for i in range(s):
                row_k[i] = corr[support[i]]
            objective = target_sq - _dot(weights, row_k, s)
        else:
            for p in range(candidates):
                residual_corr[p] = corr_at[p]
            objective = target_sq
        if track:
            residuals[n_residuals] = math.sqrt(max(objective, 0.0))
            n_residuals += 1

    return support[:s].copy(), weights[:s].copy(), residuals[:n_residuals].copy()


@_jit
def _any_not_positive(weights: np.ndarray, size: int) -> bool:
    """Whether any of ``weights[:size]`` is ``<= 0``."""
    for i in range(size):
        if weights[i] <= 0.0:
            return True
    return False


@_jit
def _step_to_zero(previous: float, new: float) -> float:
    """How far along the segment from ``previous`` (> 0) to ``new`` (<= 0) a weight reaches zero (0 when it does
    not decrease)."""
    denom = previous - new
    return previous / denom if denom > 0 else 0.0


@_jit
def _swap(
    p: int,
    q: int,
    atom_at: np.ndarray,
    position: np.ndarray,
    corr_at: np.ndarray,
    residual_corr: np.ndarray,
    K_S: np.ndarray,
    used_slots: int,
) -> None:
    """Exchange the atoms at positions ``p`` and ``q``: their entries, and their rows of ``K_S``."""
    if p == q:
        return
    a, b = atom_at[p], atom_at[q]
    atom_at[p], atom_at[q] = b, a
    position[a], position[b] = q, p
    corr_at[p], corr_at[q] = corr_at[q], corr_at[p]
    residual_corr[p], residual_corr[q] = residual_corr[q], residual_corr[p]
    row_p, row_q = K_S[p], K_S[q]
    for slot in range(used_slots):
        row_p[slot], row_q[slot] = row_q[slot], row_p[slot]


@_jit
def _remove(
    dropped: np.ndarray,
    s: int,
    candidates: int,
    n_free: int,
    Lt: np.ndarray,
    z: np.ndarray,
    support: np.ndarray,
    slots: np.ndarray,
    slot_weights: np.ndarray,
    free_slots: np.ndarray,
    atom_at: np.ndarray,
    position: np.ndarray,
    corr_at: np.ndarray,
    residual_corr: np.ndarray,
    K_S: np.ndarray,
    used_slots: int,
) -> tuple[int, int, int]:
    """Take the atoms at rows ``dropped`` (increasing) of the factor out of the subset: they are candidates again.

    Each is deleted from the Cholesky factor (and z), last first, in ``O(|S|^2)``. Returns the new ``s``,
    ``candidates`` and count of free slots."""
    for d in range(len(dropped) - 1, -1, -1):
        _cholesky_delete(Lt, s, dropped[d], z)
        s -= 1
    for d in range(len(dropped)):
        atom = support[dropped[d]]
        _swap(position[atom], candidates, atom_at, position, corr_at, residual_corr, K_S, used_slots)
        candidates += 1
        slot = slots[dropped[d]]
        slot_weights[slot] = 0.0
        free_slots[n_free] = slot
        n_free += 1
    kept = 0
    d = 0
    for i in range(s + len(dropped)):
        if d < len(dropped) and dropped[d] == i:
            d += 1
            continue
        support[kept] = support[i]
        slots[kept] = slots[i]
        kept += 1
    return s, candidates, n_free
