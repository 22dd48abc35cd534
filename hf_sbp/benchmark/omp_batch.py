"""Generalized OMP (``sbp_omp_batch`` > 1) against OMP at large batches: match error and time (a probe, not a part
of ``scripts/benchmark.py all``; ``scripts/omp_batch_quality.py`` is its command line).

The overhead part's batches (by default the bundled all-MiniLM-L6-v2 with a fresh head, the first dataset, 64
tokens, two batches of each size) go through one scoring forward each; the head's inputs are kept. Their last-layer
gradients are taken at three points of training: the fresh head, and the head trained full-batch on those inputs for
30 and 300 steps (gradient descent, step 0.5), so that the residuals shrink and spread as in fine-tuning. For each,
``omp_gram`` runs at keep 0.25 and 0.5 with each ``batch``, and the table gives the trained-gradient error with the
default weights (``sbp_weight_normalization`` none: ``||sum_S w_i g_i - gbar|| / ||gbar||``, the trainer's
``grad_match_error``), averaged over the two batches, and OMP's median time (3 runs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoTokenizer

from ..core.omp import normalize_weights, omp_gram
from ..core.selection import (
    gradient_match_error,
    head_residuals,
    last_layer_gram,
    mean_gradient_target,
    subset_size,
)
from ..glue.bundled import resolve_model_name
from .cli import parse_arguments
from .common import Data, fixed_batches, load_model, make_trainer

HEAD_STEPS = (0, 30, 300)
KEEPS = (0.25, 0.5)
Results = dict[tuple[int, float, int, int], list[tuple[float, float]]]
"""``(rows, keep, head steps, sbp_omp_batch)`` -> ``(match error, seconds)`` per batch of that size."""


def scoring_outputs(
    sizes: list[int], scratch: str, benchmark_args: list[str] = ()
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(features, labels)`` of the overhead part's two batches of each size, from one scoring forward each
    (``benchmark_args``: more ``scripts/benchmark.py`` arguments, e.g. ``--model_name_or_path`` and data files)."""
    bench = parse_arguments(["overhead", "--output_dir", scratch, *benchmark_args])
    path = resolve_model_name(bench.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = Data(bench.dataset_specs()[0][1], tokenizer, bench.seq_len)
    model = load_model(path, data.num_labels, 0, "cpu").eval()
    outputs = {}
    for n in sizes:
        trainer = make_trainer(model, "gradmatch", 0.5, n, "cpu", scratch)
        outputs[n] = []
        for batch in fixed_batches(data.splits["train"], tokenizer, n, bench.seq_len, 2, "cpu"):
            scores = trainer.score_batch(model, {key: value for key, value in batch.items() if key != "labels"})
            outputs[n].append((scores.features.float(), batch["labels"]))
    return outputs


def omp_batch_quality(
    outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]], batches: list[int], repeats: int = 3
) -> Results:
    """The match error and median time of ``omp_gram`` with each ``batch`` on the gradients of ``outputs``, at every
    keep of :data:`KEEPS` and head of :data:`HEAD_STEPS`."""
    results: Results = {}
    for n, pairs in outputs.items():
        for features, labels in pairs:
            H = features.double()
            generator = torch.Generator().manual_seed(0)
            W = 0.02 * torch.randn(int(labels.max()) + 1, H.shape[1], generator=generator, dtype=torch.float64)
            b = torch.zeros(W.shape[0], dtype=torch.float64)
            done = 0
            for steps in HEAD_STEPS:
                for _ in range(steps - done):  # full-batch gradient descent on the head alone
                    r = head_residuals(H @ W.T + b, labels, "single_label_classification").double()
                    W -= 0.5 * r.T @ H / n
                    b -= 0.5 * r.mean(0)
                done = steps
                residuals = head_residuals((H @ W.T + b).float(), labels, "single_label_classification")
                gram = last_layer_gram(residuals, features)
                target = mean_gradient_target(gram)
                for keep in KEEPS:
                    k = subset_size(n, keep)
                    for batch in batches:
                        times = []
                        for _ in range(repeats):
                            start = time.perf_counter()
                            result = omp_gram(gram, k, target_corr=target[0], target_sq_norm=target[1], batch=batch)
                            times.append(time.perf_counter() - start)
                        w = normalize_weights(result.weights, "none") / result.weights.numel()
                        error = gradient_match_error(gram, result.indices, w, normalize=False, target=target)
                        results.setdefault((n, keep, steps, batch), []).append((float(error), statistics.median(times)))
    return results


def quality_table(results: Results, sizes: list[int], batches: list[int]) -> str:
    """A Markdown table: per size, keep and head, each ``batch``'s mean error and median milliseconds."""
    lines = ["| batch | keep | head steps | " + " | ".join(f"sbp_omp_batch {b}" for b in batches) + " |"]
    lines.append("|---|---|---|" + "---|" * len(batches))
    for n in sizes:
        for keep in KEEPS:
            for steps in HEAD_STEPS:
                cells = []
                for batch in batches:
                    runs = results[(n, keep, steps, batch)]
                    error = statistics.mean(e for e, _ in runs)
                    cells.append(f"{error:.2e} ({1e3 * statistics.median(t for _, t in runs):.0f} ms)")
                lines.append(f"| {n} | {keep} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """The command line of ``scripts/omp_batch_quality.py``; prints and returns the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4,8,16", help="sbp_omp_batch values (1 is OMP)")
    parser.add_argument("--sizes", default="1024,2048", help="batch sizes")
    parser.add_argument("--scratch", default="/tmp/hf_sbp_omp_batch_quality", help="the trainers' (unused) output")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each OMP call (median)")
    args, benchmark_args = parser.parse_known_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    sizes = [int(n) for n in args.sizes.split(",")]
    results = omp_batch_quality(scoring_outputs(sizes, args.scratch, benchmark_args), batches, args.repeats)
    table = quality_table(results, sizes, batches)
    print(table, flush=True)
    return table
