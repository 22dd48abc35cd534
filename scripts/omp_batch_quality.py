"""Generalized OMP (``sbp_omp_batch`` > 1) against OMP at large batches: match error and time.

The overhead part's batches (the bundled all-MiniLM-L6-v2 with a fresh head, the first dataset, 64 tokens, two batches
of 1024 and of 2048 rows) go through one scoring forward each; the head's inputs are kept. Their last-layer gradients
are taken at three points of training: the fresh head, and the head trained full-batch on those inputs for 30 and 300
steps (gradient descent, step 0.5), so that the residuals shrink and spread as in fine-tuning. For each, ``omp_gram``
runs at keep 0.25 and 0.5 with each ``batch``, and the table gives the trained-gradient error with the default weights
(``sbp_weight_normalization`` none: ``||sum_S w_i g_i - gbar|| / ||gbar||``, the trainer's ``grad_match_error``),
averaged over the two batches, and OMP's median time (3 runs, one BLAS thread).

    python scripts/omp_batch_quality.py                 # batches 1, 4, 8, 16; about 5 minutes on 2 CPU cores
    python scripts/omp_batch_quality.py --batches 1,2,8 --sizes 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoTokenizer

from hf_sbp.benchmark.cli import parse_arguments
from hf_sbp.benchmark.common import Data, fixed_batches, load_model, make_trainer
from hf_sbp.data import resolve_model_name
from hf_sbp.selection import (
    gradient_match_error,
    head_residuals,
    last_layer_gram,
    mean_gradient_target,
    normalize_weights,
    omp_gram,
    subset_size,
)

HEAD_STEPS = (0, 30, 300)
KEEPS = (0.25, 0.5)


def scoring_outputs(sizes: list[int], scratch: str) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(features, labels)`` of the overhead part's two batches of each size, from one scoring forward each."""
    bench = parse_arguments(["overhead", "--output_dir", scratch])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4,8,16", help="sbp_omp_batch values (1 is OMP)")
    parser.add_argument("--sizes", default="1024,2048", help="batch sizes")
    parser.add_argument("--scratch", default="/tmp/hf_sbp_omp_batch_quality", help="the trainers' (unused) output")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    sizes = [int(n) for n in args.sizes.split(",")]
    results: dict[tuple, list[tuple[float, float]]] = {}
    for n, pairs in scoring_outputs(sizes, args.scratch).items():
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
                        for _ in range(3):
                            start = time.perf_counter()
                            result = omp_gram(gram, k, target_corr=target[0], target_sq_norm=target[1], batch=batch)
                            times.append(time.perf_counter() - start)
                        w = normalize_weights(result.weights, "none") / result.weights.numel()
                        error = gradient_match_error(gram, result.indices, w, normalize=False, target=target)
                        results.setdefault((n, keep, steps, batch), []).append((float(error), statistics.median(times)))
    print("| batch | keep | head steps | " + " | ".join(f"sbp_omp_batch {b}" for b in batches) + " |")
    print("|---|---|---|" + "---|" * len(batches))
    for n in sizes:
        for keep in KEEPS:
            for steps in HEAD_STEPS:
                cells = []
                for batch in batches:
                    runs = results[(n, keep, steps, batch)]
                    error = statistics.mean(e for e, _ in runs)
                    cells.append(f"{error:.2e} ({1e3 * statistics.median(t for _, t in runs):.0f} ms)")
                print(f"| {n} | {keep} | {steps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
