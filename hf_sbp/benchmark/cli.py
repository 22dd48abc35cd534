"""The benchmark's command line: ``main(argv)`` parses the arguments and runs the parts asked for."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import datasets
from transformers import AutoTokenizer, HfArgumentParser
from transformers.utils import logging as hf_logging

from ..glue.bundled import resolve_model_name
from .arguments import BenchmarkArguments
from .common import PARTS, BenchmarkContext, Data, load_rows, machine_info, write_json
from .grad_match import run_grad_match
from .overhead import run_overhead
from .padding import run_padding
from .report import write_report
from .throughput import merge_rows, run_throughput
from .tta_grid import run_time_to_accuracy

USAGE = """Benchmarks of selective backprop.

    python scripts/benchmark.py all --quick          # every part, short
    python scripts/benchmark.py all                  # every part, the full sizes
    python scripts/benchmark.py overhead|throughput|grad-match|time-to-accuracy|padding [--quick]
    python scripts/benchmark.py throughput --peft lora   # the step times with LoRA, beside full fine-tuning's
    python scripts/benchmark.py report               # report.md, summary.md and the README's results block

Data: the bundled datasets by name (--datasets tweets,bbc-news), any datasets name that run_glue.py takes, or local
CSV/JSON files (--train_file, --validation_file, --test_file), with the text/label column rules of run_glue.py.
Strategies: --strategies picks the selective strategies compared with the full batch (default: every registered
one; --sbp_strategy_modules imports modules that register more); the dataset-level ones (infobatch, random-prune)
run in time-to-accuracy only. Every JSON file is {"machine": {...}, "rows": [...]} in --output_dir
(docs/benchmarks by default). time-to-accuracy is resumable: a rerun skips the runs already in its JSON file.
docs/benchmarks/README.md describes every part and how to read its results.
"""

TIMING_PARTS = ("overhead", "throughput", "grad-match")
"""The parts that time fixed batches of the first dataset."""


def parse_arguments(argv: list[str] | None = None) -> BenchmarkArguments:
    """The arguments of ``argv`` (``sys.argv[1:]`` if ``None``); the command may come first without ``--command``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # the command is positional: `benchmark.py overhead --quick`
        argv = ["--command", argv[0], *argv[1:]]
    parser = HfArgumentParser(
        BenchmarkArguments, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    (bench,) = parser.parse_args_into_dataclasses(args=argv)
    return bench


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark command of ``argv``: a part, ``all`` (every part, then the report) or ``report``."""
    bench = parse_arguments(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if bench.command == "report":
        write_report(bench.output_dir, bench.readme)
        return
    # The trainers save nothing, but each needs an output folder: one scratch folder for the whole run.
    with tempfile.TemporaryDirectory(prefix="hf_sbp_bench_") as scratch_dir:
        started = time.perf_counter()
        model_path = resolve_model_name(bench.model_name_or_path)
        ctx = BenchmarkContext(bench, model_path, AutoTokenizer.from_pretrained(model_path), scratch_dir, started)
        machine = machine_info(bench.device)
        parts = PARTS if bench.command == "all" else (bench.command,)
        specs = bench.dataset_specs()
        timing_data = Data(specs[0][1], ctx.tokenizer, bench.seq_len) if set(parts) & set(TIMING_PARTS) else None
        for part in parts:
            ctx.progress(f"{part} ...")
            name = part.replace("-", "_")
            if part == "time-to-accuracy":  # resumable: it appends to its JSON file after every run
                run_time_to_accuracy(ctx, machine)
                continue
            if part == "overhead":
                rows = run_overhead(ctx, timing_data)
            elif part == "throughput":  # the rows of the other fine-tuning mode (full or LoRA) stay
                rows = merge_rows(load_rows(bench.output_dir, name)[1], run_throughput(ctx, timing_data))
            elif part == "padding":
                rows = run_padding(ctx)
            else:
                rows = run_grad_match(ctx, timing_data)
            write_json(os.path.join(bench.output_dir, f"{name}.json"), machine, rows)
    write_report(bench.output_dir, bench.readme)
    ctx.progress("done")
