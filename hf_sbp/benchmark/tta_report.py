"""``docs/benchmarks/summary.md``, generated from ``time_to_accuracy_summary.json`` (the tables) and
``time_to_accuracy.json`` (one accuracy-vs-training-time plot per cell): no figure in it is typed by hand."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .._utils import markdown_table
from .common import RANDOM_SUBSET, load_rows
from .palette import strategy_colors
from .time_to_accuracy import JSON_NAME, SUMMARY_NAME
from .tta_grid import current_rows, write_summary
from .tta_stats import (
    CONFIDENCE,
    FASTER,
    MIN_SEEDS_FOR_VERDICT,
    NO_DIFFERENCE,
    REFERENCE_RATIO,
    RESOLUTION_POWER,
    SLOWER,
    TOO_FEW_SEEDS,
    median_curves,
    paired_seeds,
)

SUMMARY_FILE = "summary.md"


def _interval(value: dict[str, float] | None, digits: int = 2) -> str:
    """``median [low, high]``, or a dash."""
    if not value or value.get("median") is None or math.isnan(value["median"]):
        return "-"
    return f"{value['median']:.{digits}f} [{value['ci_low']:.{digits}f}, {value['ci_high']:.{digits}f}]"


def _points(value: dict[str, float] | None) -> str:
    """An accuracy difference in points: ``+1.2 [-0.3, +2.0]``."""
    if not value or value.get("median") is None or math.isnan(value["median"]):
        return "-"
    return f"{100 * value['median']:+.1f} [{100 * value['ci_low']:+.1f}, {100 * value['ci_high']:+.1f}]"


def _label(row: dict[str, Any]) -> str:
    return row["strategy"] if row["schedule"] != "time" else f"{row['strategy']}@{row['keep']:g}"


def _verdict(row: dict[str, Any], name: str) -> str:
    wall, cost = row.get(f"verdict_vs_{name}"), row.get(f"verdict_vs_{name}_cost")
    if wall is None:
        return "-"
    return wall if wall == cost else f"{wall} (cost clock: {cost})"


def cell_table(rows: list[dict[str, Any]]) -> str:
    """The table of one (dataset, noise) cell: per strategy, seeds, time to target as a share of the budget, the time
    ratios to the random subset and the full batch with their verdicts, and the accuracy difference at T."""
    header = [
        "strategy", "seeds", "censored", "time to target / T", "vs random", "verdict vs random", "vs full batch",
        "verdict vs full", "acc. at T - random (points)", "acc. at T - full (points)", "vs random, cost clock",
    ]  # fmt: skip
    body = []
    for row in rows:
        body.append(
            [
                _label(row),
                str(row["seeds"]),
                str(row["censored"]),
                _interval(row["time_to_target_share"]),
                _interval(row["time_ratio_vs_random"]),
                _verdict(row, "random"),
                _interval(row["time_ratio_vs_full"]),
                _verdict(row, "full"),
                _points(row["acc_diff_vs_random_at_T"]),
                _points(row["acc_diff_vs_full_at_T"]),
                _interval(row["time_ratio_vs_random_cost"]),
            ]
        )
    return markdown_table(header, body)


def _draw_cell(ax, runs: list[dict[str, Any]], summary_rows: list[dict[str, Any]]) -> None:
    """Accuracy against training time for one cell on ``ax``: per strategy the median over seeds at every evaluation
    mark (x: the mark's fraction of the budget), a band from the smallest to the largest seed, the median target."""
    colors = strategy_colors(row["strategy"] for row in summary_rows)
    targets = []
    for row in summary_rows:
        triples = paired_seeds(runs, row["dataset"], row["label_noise"], row["strategy"], row["keep"], row["keep"])
        curve = median_curves(triples)
        if not curve:
            continue
        targets += [full["target"] for _, _, full in triples]
        x = [point["mark"] for point in curve]
        color = colors[row["strategy"]]
        ax.plot(x, [p["median"] for p in curve], "-", color=color, label=f"{_label(row)} ({row['seeds']} seeds)")
        ax.fill_between(x, [p["low"] for p in curve], [p["high"] for p in curve], color=color, alpha=0.12, lw=0)
    if targets:
        ax.axhline(sorted(targets)[len(targets) // 2], color="black", ls="--", lw=1, label="target (median)")
    ax.set_xlabel("training time / budget T (evaluation excluded)")
    ax.set_xlim(0, 1.02)
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def plot_cells(runs: list[dict[str, Any]], summary_rows: list[dict[str, Any]], path: str) -> None:
    """One panel per (dataset, noise) cell of ``summary_rows`` (see :func:`_draw_cell`), written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["dataset"], r["label_noise"]) for r in summary_rows})
    columns = min(2, len(cells))
    lines = math.ceil(len(cells) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(6.4 * columns, 4.2 * lines), squeeze=False)
    for ax, (dataset, noise) in zip(axes.flat, cells, strict=False):
        _draw_cell(ax, runs, [r for r in summary_rows if (r["dataset"], r["label_noise"]) == (dataset, noise)])
        ax.set_title(f"{dataset}, label noise {noise:g}")
    for ax in list(axes.flat)[len(cells) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _protocol(summary: dict[str, Any]) -> str:
    drift = summary.get("drift") or {}
    paragraphs = [
        f"Protocol {summary['protocol']} (`docs/benchmarks/README.md` has the whole of it): per dataset, label noise "
        "and seed the full batch trains on a step schedule and sets the budget T (its training time) and the target "
        f"({summary['target_fraction']:g} x its final validation accuracy); every per-batch strategy then trains on "
        "a learning-rate schedule of its own elapsed time t / T and stops at T; dataset-level pruning trains the full "
        "batch's epochs, pruned. Every run is evaluated at the same fractions of T, off the clock.",
        "Each ratio is per seed against the same seed's baseline of the same sitting; the tables give the median "
        f"over seeds and its {CONFIDENCE:.0%} bootstrap interval, and a verdict only where the interval excludes 1 "
        f"(0 for an accuracy difference) and there are at least {MIN_SEEDS_FOR_VERDICT} seeds. A run that never "
        "reached the target counts as the budget (censored). The cost clock counts forward-equivalents (a scoring "
        "forward over n rows n, a training step on k rows 3k).",
        f"The grid so far: {summary['runs']} runs, {summary['grid_wall_s'] / 3600:.1f} h of wall clock (loading and "
        "evaluation included).",
    ]
    if drift.get("seeds"):
        paragraphs.append(
            "Drift (the full batch run again at the end of a seed's runs: its training time over the first's): median "
            f"{drift['median']:.3f}, from {drift['min']:.3f} to {drift['max']:.3f} over {drift['seeds']} seeds."
        )
    return "## Protocol\n\n" + "\n\n".join(paragraphs)


def _cell_sizes(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    return (
        f"{cell['train_examples']} training examples x {cell['epochs']} epochs in batches of {cell['batch_size']} (at "
        f"most {cell['max_seq_length']} tokens), peak learning rate {cell['learning_rate']:g}; {cell['eval_points']} "
        f"evaluation marks on {cell['eval_samples']} validation examples; median budget T "
        f"{cell['median_budget_s']:.1f} s, median target {cell['median_target']:.4f}.\n\n"
    )


def _resolution(cell: dict[str, Any] | None) -> str:
    """What the cell's verdicts can resolve (:func:`.tta_stats.resolution`), against each baseline."""
    found = [(key, value) for key, value in ((cell or {}).get("resolution") or {}).items() if value]
    if not found:
        return ""
    names = {"vs_random": "the random subset", "vs_full": "the full batch"}
    scatter = " and ".join(
        f"{value['log_sd']:.2f} against {names[key]} ({value['strategies']} strategies, {value['seeds']} seeds)"
        for key, value in found
    )
    detectable = " and ".join(f"{value['detectable_ratio']:.2f} against {names[key]}" for key, value in found)
    needed = " and ".join(f"{value['seeds_for_reference_ratio']} seeds against {names[key]}" for key, value in found)
    return (
        "\n\nResolution: the per-seed log time ratios scatter about each strategy's mean with a standard deviation of "
        f"{scatter}. With {found[0][1]['verdict_seeds']} seeds a `faster` verdict is likely ({RESOLUTION_POWER:.0%}) "
        f"only for a true ratio at or below {detectable}; calling a ratio of {REFERENCE_RATIO:g} would take about "
        f"{needed}."
    )


def _extras(rows: list[dict[str, Any]]) -> str:
    """The irreducible-loss share of the budget (RHO-LOSS, included in its times) and, under label noise, the share
    of mislabelled rows among those each strategy backpropagated beside the training subset's."""
    lines = []
    for row in rows:
        if row.get("il_share_of_budget"):
            lines.append(f"- {_label(row)}: its irreducible losses took {row['il_share_of_budget']:.1%} of the budget "
                         "(median; counted in its times).")  # fmt: skip
    noisy = [r for r in rows if r.get("flipped_share_backprop") is not None]
    if noisy:
        train = noisy[0]["flipped_share_train"]
        shares = ", ".join(f"{_label(r)} {r['flipped_share_backprop']:.1%}" for r in noisy)
        lines.append(f"- Mislabelled share of the rows backpropagated (median): {shares}; training subset {train:.1%}.")
    return "\n\n" + "\n".join(lines) if lines else ""


def render_summary(output_dir: str) -> str | None:
    """Write ``<output_dir>/summary.md`` and its plots from the time-to-accuracy rows: the summary JSON is computed
    from them afresh first (so it always matches the rows, an interrupted grid's included); returns its path, or
    ``None`` when there are no rows of the current protocol."""
    row_machine, all_rows = load_rows(output_dir, JSON_NAME)
    if current_rows(all_rows):
        write_summary(output_dir, row_machine, all_rows)
    path = os.path.join(output_dir, f"{SUMMARY_NAME}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        summary = json.load(handle)
    machine, summary_rows = summary["machine"], summary["rows"]
    runs = current_rows(load_rows(output_dir, JSON_NAME)[1])
    sections = [
        "# Time to accuracy: summary",
        "Generated by `python scripts/benchmark.py report` from `time_to_accuracy_summary.json` and "
        f"`time_to_accuracy.json`; do not edit. Machine: {machine.get('cpu_model', '?')}, "
        f"{machine.get('cpu_cores', '?')} cores, device {machine.get('device', '?')}, torch "
        f"{machine.get('torch_version', '?')}.",
        _protocol(summary),
    ]
    cells = sorted({(r["dataset"], r["label_noise"]) for r in summary_rows})
    if runs:
        plot_cells(runs, summary_rows, os.path.join(output_dir, COMBINED_PLOT))
    for dataset, noise in cells:
        members = [r for r in summary_rows if (r["dataset"], r["label_noise"]) == (dataset, noise)]
        image = f"tta_{dataset}_noise{noise:g}.png"
        if runs:
            plot_cells(runs, members, os.path.join(output_dir, image))
        flagged = [_label(r) for r in members if r.get("clocks_disagree")]
        extras = _extras(members)
        note = f"\n\nVerdicts that differ between the two clocks: {', '.join(flagged)}." if flagged else ""
        cell = next((c for c in summary.get("cells", []) if (c["dataset"], c["label_noise"]) == (dataset, noise)), None)
        sections.append(
            f"## {dataset}, label noise {noise:g}\n\n{_cell_sizes(cell)}{cell_table(members)}{note}{extras}"
            + _resolution(cell)
            + (f"\n\n![accuracy against training time]({image})" if runs else "")
        )
    path = os.path.join(output_dir, SUMMARY_FILE)
    with open(path, "w") as handle:
        handle.write("\n\n".join(sections) + "\n")
    return path


README_START = "<!-- time-to-accuracy results: generated by `python scripts/benchmark.py report`; do not edit -->"
README_END = "<!-- end of time-to-accuracy results -->"
COMBINED_PLOT = "time_to_accuracy.png"


def _short(row: dict[str, Any], name: str) -> str:
    ratio, verdict = row[f"time_ratio_vs_{name}"], row[f"verdict_vs_{name}"]
    if verdict is None or math.isnan(ratio["median"]):
        return "-"
    return f"{ratio['median']:.2f} {verdict}"


def _cell_name(row: dict[str, Any]) -> str:
    return f"{row['dataset']}, noise {row['label_noise']:g}"


def decided_cells(rows: list[dict[str, Any]]) -> list[str]:
    """The cells (``"dataset, noise x"``, in the rows' order) where some strategy has a verdict: enough seeds."""
    return list(dict.fromkeys(_cell_name(r) for r in rows if r.get("verdict_vs_full") not in (None, TOO_FEW_SEEDS)))


def bottom_line(rows: list[dict[str, Any]]) -> str:
    """What the verdicts tell a user to do: the strategies `faster` than both the random subset and the full batch in
    a cell, else the advice to train the full batch or the random subset; the cells where the random subset alone is
    `faster` than the full batch (there it is the cheaper choice); and the strategies `slower` than both."""

    def named(found: list[dict[str, Any]]) -> str:
        return ", ".join(f"`{_label(row)}` ({_cell_name(row)})" for row in found)

    def against_both(verdict: str) -> str:
        return named([row for row in rows if row.get("verdict_vs_random") == verdict == row.get("verdict_vs_full")])

    decided = decided_cells(rows)
    if not decided:
        return (
            "**Bottom line:** no cell has enough seeds for a verdict yet; until one has, train the full batch "
            "(`none`), or `random` for cheaper steps."
        )
    winners, losers = against_both(FASTER), against_both(SLOWER)
    if winners:
        text = (
            f"**Bottom line:** `faster` than both the random subset and the full batch: {winners}. On a task like "
            "those, switch to it; elsewhere train the full batch (`none`), or `random` for cheaper steps."
        )
    else:
        text = (
            f"**Bottom line:** where the grid has verdicts ({'; '.join(decided)}), no strategy is `faster` than both "
            "the random subset and the full batch: train the full batch (`none`), or `random` for cheaper steps."
        )
    random_wins = named([r for r in rows if r["strategy"] == RANDOM_SUBSET and r.get("verdict_vs_full") == FASTER])
    if random_wins:
        text += f" The random subset alone is `faster` than the full batch: {random_wins}."
    return text + (f" Slower than both: {losers}." if losers else "")


def resolution_line(summary: dict[str, Any]) -> str:
    """What the grid can resolve, cell by cell (:func:`.tta_stats.resolution`), in one sentence; empty without it.
    Only cells with verdicts count (as in :func:`bottom_line`): a scatter from a seed or two says little."""
    decided = decided_cells(summary.get("rows", []))
    found = []
    for cell in summary.get("cells", []):
        both = (cell.get("resolution") or {}).values()
        if all(both) and both and _cell_name(cell) in decided:
            found.append((_cell_name(cell), *both))
    if not found:
        return ""
    ratios = "; ".join(f"{name}: {r['detectable_ratio']:.2f} / {f['detectable_ratio']:.2f}" for name, r, f in found)
    seeds = [value["seeds_for_reference_ratio"] for _, *pair in found for value in pair]
    span = f"{min(seeds)}" if min(seeds) == max(seeds) else f"{min(seeds)} to {max(seeds)}"
    return (
        f"**What the grid can resolve:** with {found[0][1]['verdict_seeds']} seeds a `faster` verdict is likely "
        f"({RESOLUTION_POWER:.0%}) only for a true time ratio to the random subset / the full batch at or below "
        f"{ratios} (the scatter of the seeds); a difference of {1 - REFERENCE_RATIO:.0%} would take about {span} "
        "seeds per cell."
    )


def readme_block(summary: dict[str, Any], image: str) -> str:
    """The README's results: per strategy (rows) and cell (columns), the median time-to-target ratio against the random
    subset and against the full batch with their verdicts, and the combined plot at ``image``."""
    rows = summary["rows"]
    cells = sorted({(r["dataset"], r["label_noise"]) for r in rows})
    labels = list(dict.fromkeys(_label(r) for r in rows))
    body = []
    for label in labels:
        line = [label]
        for cell in cells:
            row = next((r for r in rows if _label(r) == label and (r["dataset"], r["label_noise"]) == cell), None)
            line.append("-" if row is None else f"{_short(row, 'random')} / {_short(row, 'full')} ({row['seeds']})")
        body.append(line)
    header = ["strategy", *[f"{dataset}, noise {noise:g}" for dataset, noise in cells]]
    return "\n\n".join(
        [
            README_START,
            bottom_line(rows),
            f"Time to {summary['target_fraction']:.0%} of the full batch's accuracy on the full batch's wall-clock "
            "budget, as a ratio to the random subset's / the full batch's time (median over seeds, seeds in brackets; "
            f"below 1 is sooner), with the verdict of the {CONFIDENCE:.0%} bootstrap interval (`{FASTER}`, `{SLOWER}`, "
            f"`{NO_DIFFERENCE}`, or `{TOO_FEW_SEEDS}` under {MIN_SEEDS_FOR_VERDICT}). {summary['runs']} runs, "
            f"{summary['grid_wall_s'] / 3600:.1f} h; intervals, accuracy differences and the cost clock in "
            "[docs/benchmarks/summary.md](docs/benchmarks/summary.md).",
            markdown_table(header, body),
            *filter(None, [resolution_line(summary)]),
            f"![accuracy against training time]({image})",
            README_END,
        ]
    )


def update_readme(readme: str, output_dir: str) -> bool:
    """Rewrite the marked results block of ``readme`` from ``output_dir``'s summary; ``False`` (nothing written) when
    the README has no block or there is no summary."""
    path = os.path.join(output_dir, f"{SUMMARY_NAME}.json")
    if not os.path.isfile(readme) or not os.path.isfile(path):
        return False
    with open(readme) as handle:
        text = handle.read()
    if README_START not in text or README_END not in text:
        return False
    with open(path) as handle:
        summary = json.load(handle)
    image = os.path.relpath(os.path.join(output_dir, COMBINED_PLOT), os.path.dirname(os.path.abspath(readme)))
    before, rest = text.split(README_START, 1)
    _, after = rest.split(README_END, 1)
    with open(readme, "w") as handle:
        handle.write(before + readme_block(summary, image) + after)
    return True
