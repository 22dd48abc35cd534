"""The report: ``report.md`` in the output folder (a table per JSON file) and the generated
time-to-accuracy ``summary.md`` (:mod:`.tta_report`)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .._utils import markdown_table
from ..config import WEIGHT_NORMALIZATIONS
from .common import load_rows, strategy_order
from .throughput import break_even_table, peft_mode
from .time_to_accuracy import JSON_NAME as TIME_TO_ACCURACY
from .tta_report import render_summary, update_readme


def _overhead_section(rows: list[dict[str, Any]]) -> str:
    return (
        "## Selection overhead (`overhead.json`)\n\nMedians; selection = hook + residuals + Gram "
        "matrix + OMP + match error + indexing, against the real checkpoint's no-grad scoring forward; OMP = "
        "`omp_gram` alone. `sbp_omp_batch` 1 is OMP; the rows with 8 (generalized OMP, 8 atoms per step, a method "
        "change: see `docs/method.md`) were timed on the same batches, beside the same forwards. OMP loop: `numba` "
        "(compiled, on the CPU) or `torch` (on the Gram matrix's device), `sbp_omp_impl`. Match error: the "
        "trainer's `grad_match_error` (the subset's last-layer gradient against the batch mean's, default weights, "
        "fresh head), mean over the batches.\n\n"
        + markdown_table(
            [
                "batch",
                "seq",
                "keep",
                "device",
                "OMP loop",
                "forward ms",
                "selection ms",
                "selection / forward",
                "of which OMP ms",
                "sbp_omp_batch",
                "match error",
            ],
            [
                [
                    r["batch_size"],
                    r["seq_len"],
                    r["keep"],
                    r["device"],
                    r.get("omp_impl", "numba"),  # rows from before the torch loop: the compiled one
                    f"{1e3 * r['forward_s']:.1f}",
                    f"{1e3 * r['selection_s']:.2f}",
                    f"{100 * r['selection_s'] / r['forward_s']:.2f}%",
                    "-" if r.get("omp_s") is None else f"{1e3 * r['omp_s']:.2f}",
                    r.get("omp_batch", 1),
                    "-" if r.get("grad_match_error") is None else f"{r['grad_match_error']:.4f}",
                ]
                for r in rows
            ],
            fmt=str,
        )
    )


PEFT_LABELS = {"none": "full fine-tuning", "lora": "LoRA"}
"""How the report names the fine-tuning modes of ``throughput.json``."""


def _keep_text(keep: float) -> str:
    return f"{keep:.2f}" if keep > 0 else "none (never cheaper)"


def _break_even_section(rows: list[dict[str, Any]]) -> str:
    table = []
    for entry in break_even_table(rows):
        measured = entry["measured_break_even_keep"]
        table.append(
            [
                PEFT_LABELS.get(entry["peft"], entry["peft"]),
                f"{entry['full_step_s']:.3f}",
                f"{entry['scoring_forward_s']:.3f}",
                f"{entry['scoring_share']:.3f}",
                f"{entry['backward_forward_ratio']:.2f}",
                _keep_text(entry["break_even_keep"]),
                "-"
                if measured is None
                else f"{_keep_text(measured['value'])} ({measured['strategy']} at {measured['keep']})",
            ]
        )
    if not table:
        return ""
    return (
        "\n\n### Break-even keep\n\nThe keep at which a selective step costs as much as a full step. With `S` the "
        "full step and `F` the no-grad scoring forward over the whole batch, a selective step costs `F + keep S` "
        "(if the subset's forward and backward scale with the rows kept), so the break-even keep is `1 - F / S`; "
        "equivalently `b / (1 + b)`, with `b = S / F - 1` the backward (and optimizer step) in forwards: 2/3 when a "
        "backward costs two forwards (full fine-tuning), 1/2 when it costs one (LoRA, frozen base weights). The "
        "last column extrapolates a selective strategy's measured step along the random subset's cost per row "
        "kept (selection overhead included). Below the break-even keep selection saves time per step; above it, "
        "it costs more than the full batch.\n\n"
        + markdown_table(
            [
                "fine-tuning",
                "full step s",
                "scoring forward s",
                "forward share",
                "backward / forward",
                "break-even keep",
                "from the measured step",
            ],
            table,
            fmt=str,
        )
    )


def _throughput_section(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        mem = "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"
        saved = "-" if r.get("saved_activations_mb") is None else f"{r['saved_activations_mb']:.1f}"
        ideal = f"{r['ideal_ratio']:.3f}" if "ideal_ratio" in r else "-"
        floor = f"{r['ratio_to_floor']:.3f}" if "ratio_to_floor" in r else "-"
        table.append(
            [
                PEFT_LABELS.get(peft_mode(r), peft_mode(r)),
                r["strategy"],
                r["keep"],
                r["device"],
                f"{r['step_s']:.3f}",
                f"{r['ratio_to_full']:.3f}",
                ideal,
                floor,
                mem,
                saved,
            ]
        )
    return (
        "## Step time and memory (`throughput.json`)\n\nMedian step times, all strategies interleaved in "
        "one process; `floor` = scoring forward + random-subset step at the same keep (the best this design "
        "can do); `saved MB` counts the tensors one step's autograd graph keeps for its backward (each storage "
        "once, parameters excluded): the activations, the main part of a step's memory, whatever the allocator "
        "does; `peak MB` (CUDA rows only) is the allocator's peak during one training step above what was "
        "allocated before it (model, optimizer state, data). On the CPU the resident memory depends on what "
        "glibc's allocator keeps, so CPU rows have no peak. `vs full` compares with the full step of the same "
        "fine-tuning: LoRA rows (`--peft lora`: rank-8 adapters on the attention projections, the classifier "
        "trained in full) against the LoRA full step, whose ideal selective ratio is `(1 + 2 keep) / 2` instead of "
        "`(1 + 3 keep) / 3`.\n\n"
        + markdown_table(
            [
                "fine-tuning",
                "strategy",
                "keep",
                "device",
                "step s",
                "vs full",
                "ideal vs full",
                "vs floor",
                "peak MB",
                "saved MB",
            ],
            table,
            fmt=str,
        )
        + _break_even_section(rows)
    )


def _grad_match_label(row: dict[str, Any]) -> str:
    mode = row.get("weight_normalization")
    return f"{row['strategy']} ({mode})" if mode else row["strategy"]


def _grad_match_section(rows: list[dict[str, Any]]) -> str:
    # Files written before the regression task and the weight modes have neither field: classification, one mode.
    steps = sorted({r["step"] for r in rows})
    tasks = list(dict.fromkeys(r.get("task", "classification") for r in rows))
    modes = {mode: position for position, mode in enumerate(WEIGHT_NORMALIZATIONS)}
    table = []
    for task in tasks:
        for layer in ("last", "full"):
            for keep in sorted({r["keep"] for r in rows}, reverse=True):
                cell = [r for r in rows if r.get("task", "classification") == task and r["layer"] == layer]
                cell = [r for r in cell if r["keep"] == keep]
                order = {name: position for position, name in enumerate(strategy_order(r["strategy"] for r in cell))}
                labels = sorted(
                    {(r["strategy"], r.get("weight_normalization")) for r in cell},
                    key=lambda pair: (order[pair[0]], modes.get(pair[1], -1)),
                )
                for strategy, mode in labels:
                    runs = [r for r in cell if r["strategy"] == strategy and r.get("weight_normalization") == mode]
                    vals = {r["step"]: r["rel_error"] for r in runs}
                    every = [e for r in runs for e in r.get("rel_errors", [])]
                    table.append(
                        [task, layer, keep, _grad_match_label(runs[0])]
                        + [f"{vals[s]:.3f}" if s in vals else "-" for s in steps]
                        + [f"{np.mean(list(vals.values())):.3f}", f"{np.median(every):.3f}" if every else "-"]
                    )
    return (
        "## Gradient match (`grad_match.json`)\n\nRelative error `||(1/m) sum_S w_i g_i - gbar|| / ||gbar||` of the "
        "gradient each strategy's subset actually trains (its weights as the trainer uses them, magnitude included) "
        "against the batch mean gradient `gbar`, from autograd over the last layer and the whole model, on held-out "
        "batches at several steps of a full-batch run (columns: step; `mean`: over the steps, `median`: over every "
        "probe batch and step). `gradmatch` is measured in each `sbp_weight_normalization` mode; `regression` is the "
        "same text with a continuous target (`hf_sbp.benchmark.grad_match.regression_data`).\n\n"
        + markdown_table(
            ["task", "layer", "keep", "strategy"] + [str(s) for s in steps] + ["mean", "median"], table, fmt=str
        )
    )


def _padding_section(rows: list[dict[str, Any]]) -> str:
    table = [
        (
            r["dataset"],
            r["strategy"],
            _keep_text(r["keep"]),
            f"{r['mean_pad_tokens_untrimmed']:.0f} -> {r['mean_pad_tokens_trimmed']:.0f}",
            f"{r['mean_columns_untrimmed']:.1f} -> {r['mean_columns_trimmed']:.1f}",
            f"{r['step_s_untrimmed']:.3f} -> {r['step_s_trimmed']:.3f}",
            f"{r['step_ratio_paired_median']:.3f} [{r['step_ratio_paired_quartiles'][0]:.3f}, "
            f"{r['step_ratio_paired_quartiles'][1]:.3f}]",
        )
        for r in rows
    ]
    headers = ["dataset", "strategy", "keep", "padding tokens per subset", "columns", "step s", "paired ratio [IQR]"]
    return (
        "## Re-padding the subset (`padding.json`)\n\n"
        "Dynamic padding; each selected subset with and without `sbp_trim_padding`, step times measured side by side "
        f"(`{rows[0].get('command', '')}`).\n\n" + markdown_table(headers, table)
    )


def _machines_section(machines: dict[str, dict[str, Any]]) -> str:
    lines = [f"- `{name}`: {json.dumps(m)}" for name, m in machines.items()]
    if "cuda" not in {m.get("device") for m in machines.values()}:
        lines.append(
            "- No CUDA GPU was available for these measurements: every row is `device: cpu` (`scripts/gpu_check.sh` "
            "makes the GPU rows)."
        )
    return "## Machines\n\n" + "\n".join(lines)


def write_report(output_dir: str, readme: str | None = None) -> str:
    """Write ``<output_dir>/report.md``, a table per JSON file present (a part without its file has no section),
    with the machines, the time-to-accuracy ``summary.md`` (:func:`render_summary`) and, if
    ``readme`` has one, its marked results block (:func:`update_readme`); returns the report's path."""
    sections = ["# Benchmark tables", "Generated by `python scripts/benchmark.py report` from the JSON files beside "
                "it; do not edit. The time-to-accuracy results are in [summary.md](summary.md)."]  # fmt: skip
    machines = {}
    for name, section in (
        ("overhead", _overhead_section),
        ("throughput", _throughput_section),
        ("grad_match", _grad_match_section),
        ("padding", _padding_section),
    ):
        machine, rows = load_rows(output_dir, name)
        if rows:
            machines[name] = machine
            sections.append(section(rows))
    machine, rows = load_rows(output_dir, TIME_TO_ACCURACY)
    if rows:
        machines[TIME_TO_ACCURACY] = machine
    if machines:
        sections.append(_machines_section(machines))
    path = os.path.join(output_dir, "report.md")
    with open(path, "w") as handle:
        handle.write("\n\n".join(sections) + "\n")
    print(f"wrote {path}", flush=True)
    summary = render_summary(output_dir)
    if summary is not None:
        print(f"wrote {summary}", flush=True)
    if readme is not None and update_readme(readme, output_dir):
        print(f"wrote the results block of {readme}", flush=True)
    return path
