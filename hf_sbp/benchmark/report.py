"""The report: ``README.md`` in the output folder (the hand-written ``summary.md``, then a table per JSON file) and
the training and time-to-accuracy plots."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from .._utils import markdown_table
from ..config import WEIGHT_NORMALIZATIONS
from ..strategies import registered_strategies, strategy_class
from .common import load_rows, prunes_dataset, strategy_order
from .throughput import break_even_table, peft_mode
from .time_to_accuracy import JSON_NAME as TIME_TO_ACCURACY
from .time_to_accuracy import TARGET_FRACTION, comparison_table, first_to_target, pruning_table, selected_runs
from .training import accuracy_at, equal_budget_table

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
    "navy",
    "darkgoldenrod",
    "teal",
    "magenta",
    "lime",
    "maroon",
)
"""Plot colours of the selective strategies, assigned in registration order (``gradmatch``, ``loss``, ``random``
first), then to unregistered names found in results; they repeat after sixteen."""
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
        "matrix + OMP + match error + indexing, against the real checkpoint's no-grad scoring forward; OMP = "
        "`omp_gram` alone. `sbp_omp_batch` 1 is OMP; the rows with 8 (generalized OMP, 8 atoms per step, a method "
        "change: see `docs/method.md`) were timed on the same batches, beside the same forwards. OMP loop: `numba` "
        "(compiled, on the CPU) or `torch` (on the Gram matrix's device), `sbp_omp_impl`.\n\n"
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
            ]
        )
    return (
        "## Step time and memory (`throughput.json`)\n\nMedian step times, all strategies interleaved in "
        "one process; `floor` = scoring forward + random-subset step at the same keep (the best this design "
        "can do); peak memory is the highest memory during three training steps above what the process held "
        "before them (model, optimizer state, data), in a fresh process per strategy (sampled RSS on CPU, "
        "allocator peak on GPU). `vs full` compares with the full step of the same fine-tuning: LoRA rows "
        "(`--peft lora`: rank-8 adapters on the attention projections, the classifier trained in full) against "
        "the LoRA full step, whose ideal selective ratio is `(1 + 2 keep) / 2` instead of `(1 + 3 keep) / 3`.\n\n"
        + markdown_table(
            ["fine-tuning", "strategy", "keep", "device", "step s", "vs full", "ideal vs full", "vs floor", "peak MB"],
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


def _label(strategy: str, keep: float) -> str:
    return f"{strategy}@{keep}" if _selects_subset(strategy) and not prunes_dataset(strategy) else strategy


def plot_time_to_accuracy(rows: list[dict[str, Any]], output_dir: str) -> str:
    """Validation accuracy against training wall-clock seconds, one panel per dataset and noise: per strategy the
    mean over seeds of the last accuracy measured by each time (the runs :func:`selected_runs` picks), the target
    (dashed, mean over seeds) and the budget (dotted); returns the PNG file name written in ``output_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = selected_runs(rows)
    colors = strategy_colors(r["strategy"] for r in runs)
    groups = sorted({(r["dataset"], r["label_noise"]) for r in runs})
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (dataset, noise) in zip(axes[0], groups, strict=True):
        members = [r for r in runs if r["dataset"] == dataset and r["label_noise"] == noise]
        end = max(point[0] for r in members for point in r["curve"])
        grid = np.linspace(0.0, end, 400)
        for strategy, keep in sorted({(r["strategy"], r["keep"]) for r in members}, key=lambda p: (-p[1], p[0])):
            curves = [r["curve"] for r in members if r["strategy"] == strategy and r["keep"] == keep]
            values = np.array([[accuracy_at(curve, t) for t in grid] for curve in curves])
            covered = ~np.isnan(values).any(axis=0)  # from the time every seed has been evaluated once
            label = f"{_label(strategy, keep)} ({len(curves)} run{'s' if len(curves) > 1 else ''})"
            style = KEEP_STYLES.get(keep, ":")
            ax.plot(grid[covered], values[:, covered].mean(0), style, color=colors[strategy], label=label)
            for curve in curves:
                ax.plot(*zip(*curve, strict=True), "o", color=colors[strategy], ms=2.5, alpha=0.5)
        targets = [r["target"] for r in members]
        budgets = [r["budget_s"] for r in members]
        ax.axhline(float(np.mean(targets)), color="black", ls="--", lw=1, label=f"target ({TARGET_FRACTION} x full)")
        ax.axvline(float(np.mean(budgets)), color="gray", ls=":", lw=1, label="budget")
        ax.set_title(f"{dataset}, label noise {noise}")
        ax.set_xlim(left=0)
        ax.set_xlabel("training wall-clock (s, evaluation excluded)")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    name = "time_to_accuracy.png"
    fig.savefig(os.path.join(output_dir, name), dpi=110)
    plt.close(fig)
    return name


def _seconds(value: float) -> str:
    return "not reached" if math.isinf(value) else "-" if math.isnan(value) else f"{value:.1f}"


def _times(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "∞"
    if value == 0:  # a finite time over a baseline that never reached the target
        return "baseline not reached"
    return f"{value:.2f}x"


def _first_line(entry: dict[str, Any]) -> str:
    where = f"**{entry['dataset']}, noise {entry['label_noise']}, keep {entry['keep']}**"
    if entry["winner"] is None:
        return f"- {where}: no strategy reached the target in most of its runs."
    keep = entry["keep"]
    line = f"- {where}: {_label(entry['winner'], keep)} first, in {entry['winner_s']:.1f} s (median)"
    if not math.isnan(entry["winner_vs_random"]) and entry["winner"] != "random":
        line += f", {_times(entry['winner_vs_random'])} the random subset's time"
    if entry["runner_up"] is not None:
        runner = _label(entry["runner_up"], keep)
        if math.isinf(entry["runner_up_s"]):
            line += f"; no other strategy reached the target (next: {runner})"
        else:
            line += f"; next {runner} in {entry['runner_up_s']:.1f} s"
            if not math.isnan(entry["runner_up_vs_random"]) and entry["runner_up"] != "random":
                line += f" ({_times(entry['runner_up_vs_random'])} random's)"
            if not math.isnan(entry["lead_ratio"]):
                line += f": the winner needed {_times(entry['lead_ratio'])} its time"
    return line + "."


def _pruning_lines(rows: list[dict[str, Any]]) -> str:
    table = pruning_table(rows)
    if not table:
        return ""
    body = [
        [
            e["dataset"], e["label_noise"], e["strategy"], e["runs"], f"{e['median_pruned_fraction']:.3f}",
            f"{e['median_steps_vs_full']:.2f}", f"{e['median_final_accuracy']:.4f}",
            "-" if math.isnan(e["median_flipped_share_visited"]) else f"{e['median_flipped_share_visited']:.3f}",
            f"{e['median_flipped_share_train']:.3f}",
        ]
        for e in table
    ]  # fmt: skip
    return (
        "\n\n### Dataset-level pruning\n\nMedians over seeds: the share of the examples the epochs left out, the "
        "steps made over the full batch's, the final accuracy, and, under label noise, the share of mislabelled "
        "examples among those the pruned epochs visited beside their share of the training subset.\n\n"
        + markdown_table(
            [
                "dataset",
                "noise",
                "strategy",
                "runs",
                "left out",
                "steps / full",
                "final acc",
                "mislabelled visited",
                "mislabelled in data",
            ],
            body,
            fmt=str,
        )  # fmt: skip
    )


GOAL_RATIO = 0.9
"""A strategy meets the goal when its median time to target is at most this fraction of each baseline's."""


def _goal_lines(table: list[dict[str, Any]]) -> str:
    """Per dataset, noise and keep: the strategies whose median time to target is at most :data:`GOAL_RATIO` of the
    random subset's and the full batch's (and, for a dataset-level strategy, ``random-prune``'s), or that none was."""
    lines = []
    for key in dict.fromkeys((e["dataset"], e["label_noise"], e["keep"]) for e in table):
        entries = [e for e in table if (e["dataset"], e["label_noise"], e["keep"]) == key]
        met = []
        for e in entries:
            ratios = [e["vs_random"], e["vs_full_batch"]]
            if prunes_dataset(e["strategy"]) and e["strategy"] != "random-prune":
                ratios.append(e["vs_random_prune"])
            if e["strategy"] not in ("none", "random") and all(r <= GOAL_RATIO for r in ratios):
                met.append(f"{_label(e['strategy'], e['keep'])} ({', '.join(_times(r) for r in ratios)})")
        where = f"- **{key[0]}, noise {key[1]}, keep {key[2]}**: "
        lines.append(where + (", ".join(met) if met else "no strategy (every one needed more than 0.9x a baseline)"))
    return (
        f"A strategy meets it when its median time to target is at most {GOAL_RATIO}x the random subset's and the full "
        "batch's (a dataset-level one: and `random-prune`'s), ratios in brackets in that order.\n\n" + "\n".join(lines)
    )


def _time_to_accuracy_section(rows: list[dict[str, Any]], output_dir: str) -> str:
    table = comparison_table(rows)
    body = [
        [
            e["dataset"],
            e["label_noise"],
            e["keep"],
            e["strategy"],
            f"{e['reached']}/{e['runs']}",
            _seconds(e["median_time_to_target_s"]),
            _times(e["vs_random"]),
            _times(e["vs_full_batch"]),
            _times(e["vs_random_prune"]),
            "-" if math.isinf(e["median_share_of_budget"]) else f"{e['median_share_of_budget']:.2f}",
            f"{e['median_final_accuracy']:.4f}",
            f"{e['median_budget_s']:.1f}",
            f"{e['median_target']:.4f}",
            f"{e['median_steps']:.0f}/{e['median_planned_steps']:.0f}",
        ]
        for e in table
    ]
    sittings = sorted({r.get("sitting") or "-" for r in rows})
    plot = plot_time_to_accuracy(rows, output_dir)
    return (
        "## Time to accuracy (`time_to_accuracy.json`)\n\nPer dataset, label noise and seed, the full batch "
        "(`none`) trains for a fixed number of epochs over a fixed training subset; its training time is the budget "
        f"and {TARGET_FRACTION} x its final validation accuracy the target. Every other strategy trains on the "
        "same data from the same initial weights for the same budget, with its learning-rate schedule (warm-up, "
        "linear decay) sized to the steps its measured step time fits in the budget. Times are training "
        "wall-clock seconds, evaluation excluded; an evaluation on a fixed validation sample is made about 12 times "
        "per run, so a time to target is the first evaluation at or above the target. Medians over seeds (a "
        "strategy that missed the target in most runs has no median: `not reached`); `vs random` and `vs full` "
        "divide by the median of the random subset's and the full batch's runs of the same sittings (times "
        "compare only within a sitting); the dataset-level strategies (`infobatch`, `random-prune`: whole batches, "
        "keep 1.0) appear beside every keep's random subset, run for the full batch's epochs (pruned, so they end "
        "before the budget) with the full batch's schedule stretched over them, and `vs random-prune` divides by "
        "their own baseline's median; `share` is the time to target over the budget (the full batch's shows "
        "how long its accuracy kept rising); `steps / planned`: the steps made and the schedule's length (fewer "
        "made: the budget ran out first, the step time having been underestimated). "
        f"{len(sittings)} sitting{'s' if len(sittings) > 1 else ''}: {', '.join(f'`{s}`' for s in sittings)}.\n\n"
        + markdown_table(
            [
                "dataset",
                "noise",
                "keep",
                "strategy",
                "reached",
                "median time to target s",
                "vs random",
                "vs full",
                "vs random-prune",
                "share",
                "final acc",
                "budget s",
                "target",
                "steps / planned",
            ],
            body,
            fmt=str,
        )
        + "\n\n### First to the target\n\n"
        + "\n".join(_first_line(entry) for entry in first_to_target(table))
        + "\n\n### The goal: 10% sooner than every baseline\n\n"
        + _goal_lines(table)
        + _pruning_lines(rows)
        + f"\n\n![{plot}]({plot})"
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


def _scoring_length_section(rows: list[dict[str, Any]]) -> str:
    table = [
        (
            r["dataset"],
            r["strategy"],
            r["max_length"] if r["max_length"] is not None else "full",
            r["step"],
            "-" if r.get("scoring_ratio") is None else f"{r['scoring_ratio']:.2f}",
            f"{r['rel_error_full']:.3f}",
            "-" if r.get("overlap_with_full_length") is None else f"{r['overlap_with_full_length']:.2f}",
        )
        for r in rows
    ]
    headers = ["dataset", "strategy", "scoring max length", "step", "scoring time x full", "full-model error",
               "overlap with full-length subset"]  # fmt: skip
    return (
        "## A shorter scoring pass (`scoring_length.json`)\n\n"
        "Gradmatch's subset scored on the first L tokens: the relative error of its trained gradient against the "
        f"batch mean (autograd, whole model) and the scoring pass's time (`{rows[0].get('command', '')}`).\n\n"
        + markdown_table(headers, table)
    )


def _machines_section(machines: dict[str, dict[str, Any]], tta_rows: list[dict[str, Any]]) -> str:
    lines = [f"- `{name}`: {json.dumps(m)}" for name, m in machines.items()]
    by_sitting = {r.get("sitting"): r.get("machine") for r in tta_rows if r.get("sitting")}
    if len(by_sitting) > 1:
        lines += [f"  - sitting `{sitting}`: {json.dumps(m)}" for sitting, m in sorted(by_sitting.items())]
    devices = {m.get("device") for m in machines.values()} | {(m or {}).get("device") for m in by_sitting.values()}
    if "cuda" not in devices:
        lines.append(
            "- No CUDA GPU was available for these measurements: every row is `device: cpu`. GPU rows "
            "(`overhead`, `throughput` and a `--quick` time-to-accuracy run with `--device cuda`) are still to be made."
        )
    return "## Machines\n\n" + "\n".join(lines)


def write_report(output_dir: str) -> str:
    """Write ``<output_dir>/README.md``: the hand-written summary (``summary.md``) followed by tables from the JSON
    files present (and the training and time-to-accuracy plots; a part without its JSON file has no section), and
    the machines they were measured on; returns its path."""
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
        (TIME_TO_ACCURACY, lambda rows: _time_to_accuracy_section(rows, output_dir)),
        ("padding", _padding_section),
        ("scoring_length", _scoring_length_section),
    ):
        machine, rows = load_rows(output_dir, name)
        if rows:
            machines[name] = machine
            sections.append(section(rows))
    if machines:
        sections.append(_machines_section(machines, load_rows(output_dir, TIME_TO_ACCURACY)[1]))
    text = "\n\n".join(sections) + "\n"
    path = os.path.join(output_dir, "README.md")
    with open(path, "w") as handle:
        handle.write(text)
    print(f"wrote {path}", flush=True)
    return path
