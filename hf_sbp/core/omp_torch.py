"""OMP's loop in torch, on the Gram matrix's device: :func:`hf_sbp.core.omp.omp_gram` checks the inputs,
this module loops, as :mod:`hf_sbp.core.omp_loop` does on the CPU.

The algorithm is :func:`hf_sbp.core.omp_loop.omp_loop`'s, step for step: the same choice of atoms (largest residual
correlation above the same floor, the lowest-numbered atom among exact ties), the same test of linear dependence, the
same generalized-OMP and Lawson-Hanson drops, the same stopping rules. What differs is how it is written, so that the
host never waits for the device inside the loop:

* No branch reads a number from the device. Every step runs the same operations, and what a step does (add atoms,
  drop atoms, accept the refit, or nothing once finished) is chosen by masks (``torch.where``). The loop runs in
  blocks of ``k`` steps and reads one flag (finished?) between blocks: plain OMP, which never drops an atom, finishes
  within the first block. The result comes back in one transfer.
* Lawson-Hanson's inner loop (drop, refit, check again) and generalized OMP's drops are steps of their own, marked by
  a phase (:data:`_ADD`, :data:`_GOMP`, :data:`_LH`): a step in a drop phase adds nothing and reports no residual,
  exactly as the compiled loop's inner iterations.
* Shapes are fixed: the support is a ``k``-vector padded with ``n``; the Cholesky factor of ``K_SS + ridge I`` is
  ``k x k``, the identity outside the support, refactorised at the start of every step (one ``cholesky_ex`` call, no
  Givens rotations: dropping atoms is then a compaction of the support) and extended by one row per added atom.

All arithmetic is in float64; ``K`` stays in its own dtype and its rows are read into float64 as needed. MPS has no
float64: :func:`hf_sbp.core.omp.omp_gram` keeps the compiled loop there. Nothing here imports ``transformers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_ADD, _GOMP, _LH = 0, 1, 2
"""The phase of a step: add atoms (an outer step of the compiled loop), or drop more after a generalized-OMP or a
Lawson-Hanson drop (its inner loops)."""
_PIVOT_FLOOR = 1e-10
"""A new atom is linearly dependent on the chosen ones when its Cholesky pivot is at most this share of its norm."""


@dataclass
class _State:
    """The loop's tensors, all on ``K``'s device: what the compiled loop keeps in local variables."""

    support: torch.Tensor  # (k,) long: the chosen atoms in the order of the factor's rows, ``n`` beyond ``s``
    s: torch.Tensor  # () long: the support's size
    weights: torch.Tensor  # (k,) float64: the last accepted refit, zero beyond ``s``
    previous: torch.Tensor  # (k,) float64: Lawson-Hanson's feasible point
    candidate: torch.Tensor  # (n,) bool: atoms neither chosen nor found dependent
    residual_corr: torch.Tensor  # (n,) float64: ``c - K[:, S] w_S``
    objective: torch.Tensor  # () float64: ``||t||^2 - w . c_S``
    phase: torch.Tensor  # () long: _ADD, _GOMP or _LH
    added: torch.Tensor  # () long: atoms added by the current outer step (generalized OMP's drops look at them)
    outer: torch.Tensor  # () long: outer steps taken (the compiled loop's iteration count)
    residuals: torch.Tensor  # (2 n + k + 2,) float64: the objective's square root after each accepted step
    n_residuals: torch.Tensor  # () long
    done: torch.Tensor  # () bool


def omp_torch_loop(
    K: torch.Tensor,
    corr: torch.Tensor,
    target_sq: float,
    k: int,
    ridge: float,
    nonnegative: bool,
    stop_at: float,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """:func:`hf_sbp.core.omp.omp_gram`'s loop on its checked tensors, on ``K``'s device.

    The arguments are :func:`hf_sbp.core.omp_loop.omp_loop`'s: ``K`` an ``(n, n)`` floating Gram matrix with finite
    entries, ``corr`` the ``(n,)`` float64 target correlations on the same device, ``k <= n``, ``target_sq`` possibly
    NaN (no residuals then), ``stop_at`` ``-inf`` to never stop early, ``batch`` atoms per step (1: OMP).

    Returns:
        ``(support, weights, residuals)``: a LongTensor and a float64 tensor on ``K``'s device, in the order of the
        compiled loop's, and the residuals as a list.
    """
    track = math.isfinite(target_sq)
    if k == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=K.device)
        return empty.long(), empty, [math.sqrt(max(target_sq, 0.0))] if track else []
    loop, st = _start(K, corr, target_sq, k, ridge, nonnegative, stop_at, batch)
    while True:
        for _ in range(k):
            loop.step(st)
        if bool(st.done):  # the one read per block of k steps
            break
    host = torch.cat([torch.stack([st.s, st.n_residuals]).to(torch.float64), st.residuals]).cpu()
    s, n_residuals = int(host[0]), int(host[1])
    return st.support[:s].clone(), st.weights[:s].clone(), host[2 : 2 + n_residuals].tolist()


def _start(
    K: torch.Tensor,
    corr: torch.Tensor,
    target_sq: float,
    k: int,
    ridge: float,
    nonnegative: bool,
    stop_at: float,
    batch: int,
) -> tuple[_Loop, _State]:
    """The loop's constants and its state before the first step (``k >= 1``)."""
    device, n = K.device, K.shape[0]
    f64 = {"dtype": torch.float64, "device": device}
    track = math.isfinite(target_sq)
    diag = torch.diagonal(K).to(torch.float64)
    # The compiled loop's floors, relative to the problem's own scale.
    floor = 1e-12 * torch.sqrt(diag.max().clamp(min=0.0) * abs(target_sq)) if track else torch.zeros((), **f64)
    corr_floor = floor.clamp(min=1e-300)
    cap = 2 * n + k  # the compiled loop's bound on outer steps
    residuals = torch.zeros(cap + 2, **f64)
    if track:
        residuals[0] = math.sqrt(max(target_sq, 0.0))
    zero = torch.zeros((), dtype=torch.long, device=device)
    st = _State(
        support=torch.full((k,), n, dtype=torch.long, device=device),
        s=zero,
        weights=torch.zeros(k, **f64),
        previous=torch.zeros(k, **f64),
        candidate=torch.ones(n, dtype=torch.bool, device=device),
        residual_corr=corr.clone(),
        objective=torch.tensor(target_sq, **f64),
        phase=zero,
        added=zero,
        outer=zero,
        residuals=residuals,
        n_residuals=zero + (1 if track else 0),
        done=torch.zeros((), dtype=torch.bool, device=device),
    )
    loop = _Loop(K, corr, diag, corr_floor, target_sq, k, ridge, nonnegative, stop_at, batch, cap, track)
    st.done = loop.finished(st)
    return loop, st


class _Loop:
    """One step of the loop (:meth:`step`), with the problem's constants."""

    def __init__(
        self,
        K: torch.Tensor,
        corr: torch.Tensor,
        diag: torch.Tensor,
        corr_floor: torch.Tensor,
        target_sq: float,
        k: int,
        ridge: float,
        nonnegative: bool,
        stop_at: float,
        batch: int,
        cap: int,
        track: bool,
    ) -> None:
        self.K, self.corr, self.diag, self.corr_floor = K, corr, diag, corr_floor
        self.n, self.k, self.ridge, self.nonnegative = K.shape[0], k, ridge, nonnegative
        self.target_sq, self.stop_at, self.batch, self.cap, self.track = target_sq, stop_at, batch, cap, track
        device = K.device
        self.pos = torch.arange(k, device=device)
        self.atoms = torch.arange(self.n, device=device)
        self.slots = torch.arange(cap + 2, device=device)
        self.picks = min(batch, k)  # at most k - s atoms enter a step, so never more than k
        f64 = {"dtype": torch.float64, "device": device}
        self.ridge_t, self.one, self.zero = (torch.tensor(x, **f64) for x in (ridge, 1.0, 0.0))
        self.minus_inf = torch.tensor(-math.inf, **f64)

    def finished(self, st: _State) -> torch.Tensor:
        """The compiled loop's test at the top of an outer step: ``k`` atoms, no candidate left, a negligible
        objective, or the bound on steps."""
        return (st.s >= self.k) | ~st.candidate.any() | (st.objective <= self.stop_at) | (st.outer >= self.cap)

    def step(self, st: _State) -> None:
        """One step: an outer step of the compiled loop (phase :data:`_ADD`), or one pass of its inner drop loops."""
        live = ~st.done
        adding = live & (st.phase == _ADD)
        st.outer = st.outer + adding
        L, z, proceed = self._add_atoms(st, live, adding)
        act = self.pos < st.s
        new = _solve(L.mT, z, upper=True)  # the refit w_S = L^-T z, zero beyond s
        gomp_drop, lh_drop = self._drop_atoms(st, proceed, act, new)
        self._accept(st, live, proceed & ~(gomp_drop | lh_drop), act, new, gomp_drop, lh_drop)

    def _factor(self, st: _State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(L, z, idx)``: the factor of ``K_SS + ridge I`` for the current support (the identity beyond ``s``),
        ``z = L^-1 c_S``, and the support with its padding clamped to a valid row."""
        K, n, pos = self.K, self.n, self.pos
        act = pos < st.s
        idx = st.support.clamp(max=n - 1)
        rows = K.index_select(0, idx).to(torch.float64)  # K[S, :]; cholesky_ex reads K[later, earlier] only
        both = act[:, None] & act[None, :]
        A = torch.where(both, rows.index_select(1, idx), self.zero) + torch.diag(
            torch.where(act, self.ridge_t, self.one)
        )
        L = torch.linalg.cholesky_ex(A).L
        z = _solve(L, torch.where(act, self.corr.index_select(0, idx), self.zero), upper=False)
        return L, z, idx

    def _pick(self, st: _State, adding: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Up to ``batch`` atoms at once (fewer if ``k`` leaves less room): the largest scores above the floor, best
        first, the lowest-numbered atom among exact ties (argmax returns the first maximum). Returns ``[(atom,
        valid)]`` and how many are valid."""
        score = st.residual_corr if self.nonnegative else st.residual_corr.abs()
        score = torch.where(st.candidate, score, self.minus_inf)
        want = (self.k - st.s).clamp(max=self.batch)
        picked, n_picked = [], torch.zeros_like(st.s)
        for q in range(self.picks):
            j = torch.argmax(score)
            valid = adding & (q < want) & (score.gather(0, j.view(1)).squeeze(0) > self.corr_floor)
            score = torch.where((self.atoms == j) & valid, self.minus_inf, score)
            picked.append((j, valid))
            n_picked = n_picked + valid
        return picked, n_picked

    def _add_atoms(
        self, st: _State, live: torch.Tensor, adding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pick atoms and add them in turn, each tested for dependence on the atoms chosen so far (this step's
        included), extending the factor by one row each. Returns the factor ``L``, ``z`` and whether the step goes on
        to its refit."""
        K, corr, pos = self.K, self.corr, self.pos
        L, z, idx = self._factor(st)
        picked, n_picked = self._pick(st, adding)
        added_now = torch.zeros_like(st.s)
        s, support = st.s, st.support
        for j, valid in picked:
            act = pos < s
            row = K.index_select(0, j.view(1)).squeeze(0).index_select(0, idx).to(torch.float64)  # K[j, S]
            row = torch.where(act, row, self.zero)
            v = _solve(L, row, upper=False)  # zero from s on: L is the identity there
            d = self.diag.gather(0, j.view(1)).squeeze(0) + self.ridge
            pivot_sq = d - v @ v
            independent = valid & (pivot_sq > _PIVOT_FLOOR * d)
            st.candidate = st.candidate & ~((self.atoms == j) & valid)  # chosen, or dependent for good
            pivot = pivot_sq.clamp(min=torch.finfo(torch.float64).tiny).sqrt()
            at_s = pos == s
            L = torch.where(independent & at_s[:, None], torch.where(at_s, pivot, v)[None, :], L)
            z_s = (corr.gather(0, j.view(1)).squeeze(0) - v @ z) / pivot
            z = torch.where(independent & at_s, z_s, z)
            support = torch.where(independent & at_s, j, support)
            idx = torch.where(independent & at_s, j, idx)
            s = s + independent
            added_now = added_now + independent
        st.s, st.support = s, support
        st.added = torch.where(adding, added_now, st.added)
        st.done = st.done | (adding & (n_picked == 0))  # no atom can lower the objective (NNLS optimality)
        # An outer step whose atoms were all dependent does nothing more (the compiled loop's `continue`).
        proceed = (adding & (added_now > 0)) | (live & (st.phase != _ADD))
        return L, z, proceed

    def _drop_atoms(
        self, st: _State, proceed: torch.Tensor, act: torch.Tensor, new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generalized OMP's and Lawson-Hanson's drops of the refit ``new`` over the support ``act``: the dropped atoms
        are candidates again and the support closes up, in order. Returns whether each kind of drop happened."""
        phase, s = st.phase, st.s
        drop = torch.zeros_like(act)
        gomp_drop = torch.zeros_like(proceed)
        lh_drop = torch.zeros_like(proceed)
        if self.nonnegative and self.batch > 1:
            # Generalized OMP: this step's atoms whose refit weight is not positive do not enter; if none is
            # positive, the step's best (its first) stays.
            first = s - st.added
            mine = act & (self.pos >= first)
            bad = mine & (new <= 0.0)
            bad = torch.where(bad.sum() == st.added, bad & (self.pos != first), bad)
            gomp_drop = proceed & (phase != _LH) & (st.added > 1) & bad.any()
            drop = torch.where(gomp_drop, bad, drop)
            st.added = st.added - torch.where(gomp_drop, bad.sum(), 0)
        if self.nonnegative:
            # Lawson-Hanson: from the feasible point towards the refit until the first weight reaches zero; drop the
            # weights that reach zero. Entering from an outer step, the feasible point is the accepted weights, with
            # zero for the step's new atoms.
            negative = act & (new <= 0.0)
            lh_drop = proceed & ~gomp_drop & negative.any()
            entering = phase != _LH
            previous = torch.where(entering & (self.pos >= s - st.added), self.zero, st.weights)
            previous = torch.where(entering, previous, st.previous)
            denom = previous - new
            to_zero = torch.where(denom > 0.0, previous / denom, self.zero)  # where the weight reaches zero
            alpha = torch.where(negative, to_zero, math.inf).min().clamp(0.0, 1.0)
            moved = previous + alpha * (new - previous)
            moved = torch.where(negative & (to_zero <= alpha), self.zero, moved)
            drop = torch.where(lh_drop, act & ~(moved > 0.0), drop)
            st.previous = torch.where(lh_drop, _compact(moved, act & ~drop, self.zero), st.previous)
        dropping = gomp_drop | lh_drop
        n = self.n
        freed = torch.zeros(n + 1, dtype=torch.bool, device=self.K.device)
        freed = freed.scatter(0, torch.where(drop, st.support, n), True)[:n]
        st.candidate = st.candidate | freed
        kept = act & ~drop
        st.support = torch.where(dropping, _compact(st.support, kept, n), st.support)
        st.s = st.s - drop.sum()
        return gomp_drop, lh_drop

    def _accept(
        self,
        st: _State,
        live: torch.Tensor,
        accept: torch.Tensor,
        act: torch.Tensor,
        new: torch.Tensor,
        gomp_drop: torch.Tensor,
        lh_drop: torch.Tensor,
    ) -> None:
        """Accept the refit where ``accept``: new residual correlations, objective ``||t||^2 - w . c_S`` and its square
        root reported; then the next step's phase, and whether the loop has finished."""
        K, corr, n = self.K, self.corr, self.n
        w = torch.where(act, new, self.zero)
        st.weights = torch.where(accept, w, st.weights)
        idx = st.support.clamp(max=n - 1)
        residual_corr = corr - w @ K.index_select(0, idx).to(torch.float64)  # K symmetric: K[S, :] for K[:, S]
        st.residual_corr = torch.where(accept, residual_corr, st.residual_corr)
        objective = self.target_sq - w @ torch.where(act, corr.index_select(0, idx), self.zero)
        st.objective = torch.where(accept, objective, st.objective)
        if self.track:
            at = accept & (self.slots == st.n_residuals)
            st.residuals = torch.where(at, objective.clamp(min=0.0).sqrt(), st.residuals)
            st.n_residuals = st.n_residuals + accept
        st.phase = torch.where(accept, _ADD, torch.where(gomp_drop, _GOMP, torch.where(lh_drop, _LH, st.phase)))
        st.done = st.done | (live & (st.phase == _ADD) & self.finished(st))


def _solve(L: torch.Tensor, b: torch.Tensor, upper: bool) -> torch.Tensor:
    """``L^-1 b`` for a triangular ``L`` and a vector ``b``."""
    return torch.linalg.solve_triangular(L, b[:, None], upper=upper).squeeze(1)


def _compact(values: torch.Tensor, kept: torch.Tensor, fill: torch.Tensor | int) -> torch.Tensor:
    """``values[kept]`` moved to the front in their order, ``fill`` after them: fixed shapes, no host read."""
    order = torch.argsort((~kept).to(torch.uint8), stable=True)
    return torch.where(torch.arange(values.numel(), device=values.device) < kept.sum(), values[order], fill)
