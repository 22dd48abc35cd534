"""The report: ``README.md`` in the output folder (the hand-written ``summary.md``, then a table per JSON file) and
the training plots."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from .._utils import markdown_table
from ..strategies import registered_strategies, strategy_class
from .common import load_rows, strategy_order
from .training import equal_budget_table

FULL_BATCH_COLOR = "black"
PALETTE = (
    "tab:green",
    "tab:orange",
    "tab:blue",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:gray",
)
"""Plot colours of the selective strategies, assigned in registration order (``gradmatch``, ``loss``, ``random``
first), then to unregistered names found in results; they repeat after ten."""
KEEP_STYLES = {0.5: "-", 0.25: "--", 1.0: "-"}
"""Line styles of the keep values (other keeps are dotted)."""


def _selects_subset(name: str) -> bool:
    # Results of a strategy whose module is not imported are taken for a selective one.
    return name not in registered_strategies() or strategy_class(name).selective


def strategy_colors(names: Iterable[str] = ()) -> dict[str, str]:
    """A plot colour for every registered strategy and every name in ``names``: black for those that select no
    subset, the :data:`PALETTE` in registration order for the others (then for unregistered names)."""
    colors = {}
    selective = 0
    for name in strategy_order([*registered_strategies(), *names]):
        if not _selects_subset(name):
            colors[name] = FULL_BATCH_COLOR
        else:
            colors[name] = PALETTE[selective % len(PALETTE)]
            selective += 1
    return colors


def plot_training(rows: list[dict[str, Any]], output_dir: str) -> list[str]:
    """Validation accuracy against training time and against examples backpropagated, one panel per dataset and
    noise (mean and std over seeds); returns the PNG file names written in ``output_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = strategy_colors(r["strategy"] for r in rows)
    groups = sorted({(r["dataset"], r["label_noise"]) for r in rows})
    files = []
    for x_key, x_label, fname in (
        ("time", "training wall-clock (s)", "accuracy_vs_time.png"),
        ("examples", "examples backpropagated", "accuracy_vs_backprop.png"),
    ):
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        for ax, (dataset, noise) in zip(axes[0], groups, strict=True):
            members = [r for r in rows if r["dataset"] == dataset and r["label_noise"] == noise]
            for strategy, keep in sorted({(r["strategy"], r["keep"]) for r in members}):
                runs = [r for r in members if r["strategy"] == strategy and r["keep"] == keep]
                length = min(len(r["curve"]) for r in runs)
                if x_key == "time":
                    xs = np.mean([[p[0] for p in r["curve"][:length]] for r in runs], axis=0)
                else:
                    xs = np.mean([r["curve_backprop_examples"][:length] for r in runs], axis=0)
                ys = np.array([[p[1] for p in r["curve"][:length]] for r in runs])
                color = colors[strategy]
                label = f"{strategy} keep {keep}" if _selects_subset(strategy) else strategy
                ax.plot(xs, ys.mean(0), KEEP_STYLES.get(keep, ":"), color=color, label=label, marker="o", ms=3)
                ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=color, alpha=0.1)
            ax.set_title(f"{dataset}, label noise {noise}")
            ax.set_xlabel(x_label)
            ax.set_ylabel("validation accuracy")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(output_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def _overhead_section(rows: list[dict[str, Any]]) -> str:
    return (
        "## Selection overhead (`overhead.json`)\n\nMedians; selection = hook + residuals + Gram "
        "matrix + OMP + match error + indexing, against the real checkpoint's no-grad scoring forward.\n\n"
        + markdown_table(
            ["batch", "seq", "keep", "device", "forward ms", "selection ms", "selection / forward"],
            [
                [
                    r["batch_size"],
                    r["seq_len"],
                    r["keep"],
                    r["device"],
                    f"{1e3 * r['forward_s']:.1f}",
                    f"{1e3 * r['selection_s']:.2f}",
                    f"{100 * r['selection_s'] / r['forward_s']:.2f}%",
                ]
                for r in rows
            ],
            fmt=str,
        )
    )


def _throughput_section(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        mem = "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"
        ideal = f"{r['ideal_ratio']:.3f}" if "ideal_ratio" in r else "-"
        floor = f"{r['ratio_to_floor']:.3f}" if "ratio_to_floor" in r else "-"
        table.append(
            [
                r["strategy"],
                r["keep"],
                r["device"],
                f"{r['step_s']:.3f}",
                f"{r['ratio_to_full']:.3f}",
                ideal,
                floor,
                mem,
            ]
        )
    return (
        "## Step time and memory (`throughput.json`)\n\nMedian step times, all strategies interleaved in "
        "one process; `floor` = scoring forward + random-subset step at the same keep (the best this design "
        "can do); peak memory is the highest memory during three training steps above what the process held "
        "before them (model, optimizer state, data), in a fresh process per strategy (sampled RSS on CPU, "
        "allocator peak on GPU).\n\n"
        + markdown_table(
            ["strategy", "keep", "device", "step s", "vs full", "ideal vs full", "vs floor", "peak MB"], table, fmt=str
        )
    )


def _grad_match_section(rows: list[dict[str, Any]]) -> str:
    steps = sorted({r["step"] for r in rows})
    table = []
    for layer in ("last", "full"):
        for keep in sorted({r["keep"] for r in rows}, reverse=True):
            for strategy in strategy_order(r["strategy"] for r in rows):
                vals = {
                    r["step"]: r["rel_error"]
                    for r in rows
                    if r["layer"] == layer and r["keep"] == keep and r["strategy"] == strategy
                }
                table.append([layer, keep, strategy] + [f"{vals[s]:.3f}" if s in vals else "-" for s in steps])
    return (
        "## Gradient match (`grad_match.json`)\n\nRelative error of each strategy's weighted subset "
        "gradient against the full-batch mean gradient, from autograd, on held-out batches at several "
        "steps of a full-batch run (columns: step).\n\n"
        + markdown_table(["layer", "keep", "strategy"] + [str(s) for s in steps], table, fmt=str)
    )


def _training_section(rows: list[dict[str, Any]], output_dir: str) -> str:
    finals = defaultdict(list)
    for r in rows:
        finals[(r["dataset"], r["label_noise"], r["strategy"], r["keep"])].append(r)
    table = []
    for (dataset, noise, strategy, keep), runs in sorted(finals.items()):
        acc = [r["test_accuracy"] for r in runs]
        table.append(
            [
                dataset,
                noise,
                strategy,
                keep,
                f"{np.mean(acc):.4f} ± {np.std(acc):.4f}",
                f"{np.mean([r['train_time_s'] for r in runs]):.1f}",
                int(np.mean([r["backprop_examples"] for r in runs])),
                len(runs),
            ]
        )
    budget_rows = [
        [
            b["dataset"],
            b["label_noise"],
            b["keep"],
            f"{b['budget_s']:.1f}",
            b["strategy"],
            f"{b['mean']:.4f} ± {b['std']:.4f}",
            b["runs"],
        ]
        for b in equal_budget_table(rows)
    ]
    plots = plot_training(rows, output_dir)
    return (
        "## Training (`training.json`)\n\nTest accuracy after the same number of steps (mean ± std over "
        "seeds), training time excluding evaluation, and examples backpropagated.\n\n"
        + markdown_table(
            ["dataset", "noise", "strategy", "keep", "test acc", "train s", "backprop ex", "runs"], table, fmt=str
        )
        + "\n\n### Accuracy at an equal wall-clock budget\n\nValidation accuracy of each strategy at the "
        "training time the random subset needed for the full run (its median over seeds), mean ± std "
        "over seeds.\n\n"
        + markdown_table(["dataset", "noise", "keep", "budget s", "strategy", "val acc", "runs"], budget_rows, fmt=str)
        + "\n\n"
        + "\n".join(f"![{p}]({p})" for p in plots)
    )


def write_report(output_dir: str) -> str:
    """Write ``<output_dir>/README.md``: the hand-written summary (``summary.md``) followed by tables from the JSON
    files present (and the training plots); returns its path."""
    sections = []
    summary_path = os.path.join(output_dir, "summary.md")
    if os.path.isfile(summary_path):
        with open(summary_path) as handle:
            sections.append(handle.read().strip())
    else:
        sections.append("# Benchmarks")
    machines = {}
    for name, section in (
        ("overhead", _overhead_section),
        ("throughput", _throughput_section),
        ("grad_match", _grad_match_section),
        ("training", lambda rows: _training_section(rows, output_dir)),
    ):
        machine, rows = load_rows(output_dir, name)
        if rows:
            machines[name] = machine
            sections.append(section(rows))
    if machines:
        sections.append("## Machines\n\n" + "\n".join(f"- `{name}`: {json.dumps(m)}" for name, m in machines.items()))
    text = "\n\n".join(sections) + "\n"
    path = os.path.join(output_dir, "README.md")
    with open(path, "w") as handle:
        handle.write(text)
    print(f"wrote {path}", flush=True)
    return path
