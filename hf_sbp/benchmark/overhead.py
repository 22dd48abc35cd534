"""Part 1, ``overhead.json``: what selection adds to a batch, against the no-grad scoring forward it follows."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from ..core.selection import index_rows
from ..head import HeadCapture
from ..strategies import gradmatch
from ..trainer import SelectiveBackpropTrainer
from .common import OVERHEAD_STRATEGY, BenchmarkContext, Data, collated_batches, load_model, make_trainer, sync

BATCH_SIZES = (16, 32, 64, 128, 256, 1024, 2048)
"""Batch sizes of the full run (the quick one: the first three). Large per-device batches are common on GPUs, and
OMP's cost grows faster than the forward's (``O(n k^2)`` against ``O(n)``)."""
LARGE_BATCH = 1024
"""Batches of this many rows or more are timed :data:`LARGE_BATCH_REPEATS` times at most: a no-grad forward over
1024 rows of 64 tokens takes about 10 s on 2 CPU cores, over 2048 rows about 20 s."""
LARGE_BATCH_REPEATS = 3
OMP_BATCH = 8
"""At :data:`LARGE_BATCH` rows and more, selection is also timed with ``sbp_omp_batch`` at this value (generalized
OMP: this many atoms per step, a method change: see ``docs/method.md``), in rows of their own (``omp_batch`` says
which) after the same forwards; every row's ``grad_match_error`` shows what the greedier subset costs in match."""


@contextlib.contextmanager
def reused_scoring(trainer: SelectiveBackpropTrainer, scores: dict | None = None) -> Iterator[None]:
    """Within the context, the trainer's scoring pass returns its first result for each batch again.

    ``select_batch`` would otherwise repeat the forward that the loop has just timed, on the same batch in eval mode
    without gradients (the same result): at 1024 and 2048 rows that doubles a part that takes minutes. The selection
    still runs right after a real forward over the batch, as in training. A batch is known by its tensors (the
    trainer may pass a copy of the batch's dict), which the cache keeps, so that no other tensor can take their ids.
    Trainers of the same model can share the cache ``scores``.
    """
    own = trainer.__dict__.get("score_batch")
    score_batch = trainer.score_batch
    scores = {} if scores is None else scores

    def reused(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> Any:
        key = tuple((name, id(value)) for name, value in inputs.items())
        if key not in scores:
            scores[key] = (list(inputs.values()), score_batch(model, inputs))
        return scores[key][1]

    trainer.score_batch = reused
    try:
        yield
    finally:
        if own is None:
            del trainer.score_batch  # the instance attribute: the class's method shows again
        else:
            trainer.score_batch = own


@contextlib.contextmanager
def timed_omp(times: list[float]) -> Iterator[None]:
    """Within the context, append the duration of every OMP call of the ``gradmatch`` strategy to ``times``."""
    omp_gram = gradmatch.omp_gram

    def timed(*args: Any, **kwargs: Any) -> Any:
        gram = args[0] if args else kwargs["gram"]
        # On a GPU, wait for the Gram matrix first (its kernels are queued before the call) and for OMP's last
        # kernels after it, so that the time is OMP's alone.
        sync(gram.device.type)
        start = time.perf_counter()
        try:
            return omp_gram(*args, **kwargs)
        finally:
            sync(gram.device.type)
            times.append(time.perf_counter() - start)

    gradmatch.omp_gram = timed
    try:
        yield
    finally:
        gradmatch.omp_gram = omp_gram


def hook_cost_s(
    model: PreTrainedModel, trainer: SelectiveBackpropTrainer, batch: dict[str, torch.Tensor], repeats: int = 200
) -> float:
    """What the capture hook adds to one forward: the head called with and without it (seconds)."""
    head = dict(model.named_modules())[trainer.head_name]
    features = trainer.score_batch(model, batch).features
    capture = HeadCapture([(trainer.head_name, head)])
    with torch.no_grad():
        timings = {}
        for hooked in (False, True):
            start = time.perf_counter()
            for _ in range(repeats):
                if hooked:
                    with capture.capturing():
                        head(features)
                else:
                    head(features)
            timings[hooked] = (time.perf_counter() - start) / repeats
    return max(0.0, timings[True] - timings[False])


def _overhead_row(
    bench: Any, batch_size: int, keep: float, impl: str, omp_batch: int, forward: list[float],
    selection: list[float], omp: list[float], errors: dict[int, float],
) -> dict[str, Any]:  # fmt: skip
    """A row of ``overhead.json`` (but its ``repeats``): the medians of the times measured, and the mean over the
    batches of the selection's match error (``None`` where no OMP ran)."""
    known = [error for error in errors.values() if not math.isnan(error)]  # NaN: not logged, no OMP ran
    return {
        "batch_size": batch_size,
        "seq_len": bench.seq_len,
        "keep": keep,
        "omp_batch": omp_batch,
        "device": bench.device,
        "omp_impl": impl,
        "forward_s": statistics.median(forward),
        "selection_s": statistics.median(selection),
        "omp_s": statistics.median(omp) if omp else None,  # no OMP at keep 1.0: the whole batch
        "grad_match_error": statistics.mean(known) if known else None,
    }


def run_overhead(ctx: BenchmarkContext, data: Data) -> list[dict[str, Any]]:
    """Median forward and selection times per batch size and keep (rows of ``overhead.json``).

    ``selection_s`` is everything ``select_batch`` does besides its scoring forward (residuals, Gram matrix,
    finiteness checks, OMP, match error), plus gathering the subset's rows and the capture hook's cost; ``omp_s``
    is OMP alone (:func:`hf_sbp.core.omp.omp_gram`, as the ``gradmatch`` strategy calls it); ``omp_batch`` is
    ``sbp_omp_batch`` (1: OMP; :data:`OMP_BATCH` in the extra rows of large batches, timed right after OMP on the
    same batches, beside the same forwards); ``omp_impl`` is the OMP loop (``sbp_omp_impl``: ``"numba"`` on the CPU,
    ``"torch"`` on the Gram matrix's device), one row each for ``--omp_impls``; ``grad_match_error`` is the
    trainer's own (``last_selection.grad_match_error``: the subset's last-layer gradient against the batch mean's,
    from the Gram matrix, with the default weights), on the pretrained encoder with a fresh head.
    """
    bench = ctx.bench
    model = load_model(ctx.model_path, data.num_labels, 0, bench.device).eval()
    batch_sizes = bench.overhead_batch_size_values or (BATCH_SIZES[:3] if bench.quick else BATCH_SIZES)
    rows = []
    for batch_size in batch_sizes:
        batches = collated_batches(data.splits["train"], ctx.tokenizer, batch_size, 2, bench.device, bench.seq_len)
        repeats = bench.repeats if batch_size < LARGE_BATCH else min(bench.repeats, LARGE_BATCH_REPEATS)
        scores: dict = {}  # the scoring pass's results, shared by the keeps' trainers
        hook_s = None
        for keep in bench.keep_values if bench.quick else sorted({0.25, 0.5, *bench.keep_values}):
            # One trainer per OMP loop and atoms per step, all timed on the same batches beside the same forwards.
            omp_batches = (1, OMP_BATCH) if batch_size >= LARGE_BATCH and keep < 1.0 else (1,)
            variants = [(impl, b) for impl in bench.omp_impl_values for b in omp_batches]
            trainers = {
                (impl, b): make_trainer(
                    model, OVERHEAD_STRATEGY, keep, batch_size, bench.device, ctx.scratch_dir, sbp_omp_batch=b,
                    sbp_omp_impl=impl,
                )
                for impl, b in variants
            }  # fmt: skip
            forward, selection, omp = [], {v: [] for v in variants}, {v: [] for v in variants}
            errors: dict[Any, dict[int, float]] = {v: {} for v in variants}  # per variant, per batch
            omp_times: list[float] = []
            with contextlib.ExitStack() as stack:
                for trainer in trainers.values():
                    stack.enter_context(reused_scoring(trainer, scores))
                stack.enter_context(timed_omp(omp_times))
                for trainer in trainers.values():
                    trainer.select_batch(model, batches[0])  # warm up (the first keep's trainer finds the head)
                if hook_s is None:  # the same at every keep
                    hook_s = hook_cost_s(model, trainers[variants[0]], batches[0])
                for repeat in range(repeats):
                    batch = batches[repeat % 2]
                    forward_inputs = {k: v for k, v in batch.items() if k != "labels"}
                    sync(bench.device)
                    start = time.perf_counter()
                    with torch.no_grad():
                        model(**forward_inputs)
                    sync(bench.device)
                    forward.append(time.perf_counter() - start)
                    for variant, trainer in trainers.items():
                        omp_times.clear()
                        start = time.perf_counter()
                        indices, _ = trainer.select_batch(model, batch)
                        index_rows(batch, indices, batch_size)
                        sync(bench.device)
                        elapsed = time.perf_counter() - start - trainer.last_selection.scoring_s
                        selection[variant].append(elapsed + hook_s)
                        omp[variant].extend(omp_times)
                        errors[variant][repeat % 2] = trainer.last_selection.grad_match_error
            for impl, b in variants:
                measured = (forward, selection[impl, b], omp[impl, b], errors[impl, b])
                row = _overhead_row(bench, batch_size, keep, impl, b, *measured)
                rows.append({**row, "repeats": repeats})
                share = 100 * row["selection_s"] / row["forward_s"]
                ctx.progress(
                    f"overhead b={batch_size} keep={keep} omp_batch={b} omp_impl={impl}: "
                    f"forward {row['forward_s'] * 1e3:.1f} ms, "
                    f"selection {row['selection_s'] * 1e3:.2f} ms ({share:.2f}%), "
                    f"of which OMP {1e3 * (row['omp_s'] or 0.0):.2f} ms ({repeats} repeats), "
                    f"match error {row['grad_match_error']}"
                )
    return rows
