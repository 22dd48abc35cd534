"""Part 2, ``throughput.json``: the training step's time per strategy (and per variant of ``--probe_variants``), the
activations it saves for backward (:class:`SavedActivations`) and, on CUDA, its peak memory; with
``--peft lora`` the same rows for LoRA fine-tuning (``"peft": "lora"``), kept beside the full fine-tuning rows, and
the break-even keep of both (:func:`break_even_table`)."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from transformers import PreTrainedModel

from ..example_cache import EXAMPLE_ID_KEY
from ..strategies import strategy_class
from ..trainer import SelectiveBackpropTrainer
from .arguments import BenchmarkArguments
from .common import (
    FULL_BATCH,
    OVERHEAD_STRATEGY,
    RANDOM_SUBSET,
    BenchmarkContext,
    Data,
    collated_batches,
    load_model,
    make_trainer,
    parse_variant,
    per_batch,
    strategy_grid,
    sync,
    timed_training_step,
)

SCORING_FORWARD = "scoring_forward"
"""The pseudo-strategy of the throughput rows that time the no-grad scoring forward alone."""
LORA = "lora"
"""The ``peft`` value of the rows measured with LoRA (rows without ``peft`` are full fine-tuning)."""
LORA_HEADS = ["classifier", "score"]
"""Head module names that LoRA trains in full (``modules_to_save``): ``classifier`` for BERT-like encoders,
``score`` for decoders; names the model lacks are ignored."""


def lora_model(model: PreTrainedModel, r: int = 8) -> PreTrainedModel:
    """``model`` wrapped for LoRA fine-tuning with ``peft``: rank-``r`` adapters (``lora_alpha = 2 r``) on the
    attention projections that ``peft`` targets for the architecture (``query`` and ``value`` for BERT), the
    classification head trained in full (``modules_to_save``), everything else frozen."""
    try:
        import peft
    except ImportError as error:  # an optional dependency: only --peft lora needs it
        raise ImportError("--peft lora needs the peft package: pip install peft") from error
    config = peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, modules_to_save=LORA_HEADS)
    return peft.get_peft_model(model, config)


def peft_mode(row: dict[str, Any]) -> str:
    """The fine-tuning mode of a throughput row: its ``peft`` value, ``none`` (full fine-tuning) if it has none."""
    return row.get("peft") or "none"


def merge_rows(existing: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``throughput.json`` after a run: the ``existing`` rows of the fine-tuning modes that ``new`` does
    not measure (kept, in order), then ``new`` (which replaces the rows of its own modes)."""
    measured = {peft_mode(row) for row in new}
    return [row for row in existing if peft_mode(row) not in measured] + list(new)


def break_even_keep(full_step_s: float, scoring_forward_s: float) -> float:
    """The keep at which a selective step costs as much as a full step, if the subset's forward and backward scale
    with the rows kept: ``F + keep * S = S`` gives ``1 - F / S``, with ``S`` the full step and ``F`` the no-grad
    scoring forward; equivalently ``b / (1 + b)`` with ``b = S / F - 1`` the backward's cost in forwards."""
    return 1.0 - scoring_forward_s / full_step_s


def break_even_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fine-tuning mode of ``rows`` (``throughput.json``): the full step ``full_step_s`` and scoring forward
    ``scoring_forward_s``, the forward's share of the full step, the backward's cost in forwards
    (``backward_forward_ratio = S / F - 1``), the :func:`break_even_keep`, and ``measured_break_even_keep``: the keep
    at which the selective strategy measured at the largest keep (gradmatch if present) would cost a full step, its
    step extrapolated along the random subset's cost per row kept (``None`` without both rows)."""
    table = []
    for mode in dict.fromkeys(peft_mode(row) for row in rows):
        members = [row for row in rows if peft_mode(row) == mode]
        full = next((row["step_s"] for row in members if row["strategy"] == FULL_BATCH), None)
        forward = next((row["step_s"] for row in members if row["strategy"] == SCORING_FORWARD), None)
        if full is None or forward is None:
            continue
        measured = None
        selective = [row for row in members if "ideal_ratio" in row]
        if selective:
            keep = max(row["keep"] for row in selective)
            at_keep = [row for row in selective if row["keep"] == keep]
            chosen = next((row for row in at_keep if row["strategy"] == OVERHEAD_STRATEGY), at_keep[0])
            random = next((row for row in members if row["strategy"] == RANDOM_SUBSET and row["keep"] == keep), None)
            if random is not None:
                per_keep = random["step_s"] / keep  # the subset step's cost per unit of keep
                measured = {
                    "strategy": chosen["strategy"],
                    "keep": keep,
                    "value": keep + (full - chosen["step_s"]) / per_keep,
                }
        table.append(
            {
                "peft": mode,
                "full_step_s": full,
                "scoring_forward_s": forward,
                "scoring_share": forward / full,
                "backward_forward_ratio": full / forward - 1.0,
                "break_even_keep": break_even_keep(full, forward),
                "measured_break_even_keep": measured,
            }
        )
    return table


def indexed(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The batches with example ids (distinct across batches), for strategies with a per-example cache; the others'
    ``training_step`` ignores them."""
    size = len(batches[0]["labels"])
    return [{**batch, EXAMPLE_ID_KEY: torch.arange(i * size, (i + 1) * size)} for i, batch in enumerate(batches)]


def step_trainer(
    model: PreTrainedModel,
    strategy: str,
    keep: float,
    bench: BenchmarkArguments,
    scratch_dir: str,
    batches: list[dict[str, torch.Tensor]],
) -> SelectiveBackpropTrainer:
    """A trainer for timed steps. A strategy with a per-example cache gets one over the batches' rows, warmed by a
    step on every batch (the gradients are dropped): its timed steps are those after the first epoch, where every
    row was seen recently and no scoring pass runs."""
    cached = strategy_class(parse_variant(strategy)[0]).uses_example_cache
    index_space = range(sum(len(batch["labels"]) for batch in batches)) if cached else None
    trainer = make_trainer(
        model, strategy, keep, bench.batch_size, bench.device, scratch_dir, train_dataset=index_space
    )
    if trainer.strategy.needs_irreducible_loss:
        # RHO-LOSS's irreducible losses are computed once before training; a step's cost does not depend on them.
        trainer.set_irreducible_losses(torch.zeros(len(index_space)))
    if cached:
        for batch in batches:
            trainer.training_step(model, batch)
        model.zero_grad(set_to_none=True)
    return trainer


class SavedActivations:
    """While active, counts the bytes of the tensors autograd saves for backward (each storage once; the model's
    parameters and buffers, and views of them, excluded): the activations a training step holds when its forward
    ends, which is the main part of its memory peak and, unlike the process's resident memory, does not depend on
    what the allocator keeps. A no-grad forward (the scoring pass) saves nothing; its transient activations, at most
    a layer's, are not counted.

    Args:
        model: the model whose parameters and buffers are not activations.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        tensors = [*model.parameters(), *model.buffers()]
        self._excluded = {tensor.untyped_storage().data_ptr() for tensor in tensors}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._excluded:
            self._storages[pointer] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        """The bytes counted so far."""
        return sum(self._storages.values())

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def saved_activations_mb(trainer: SelectiveBackpropTrainer, model: torch.nn.Module, batch: dict) -> float:
    """The activations one training step of ``trainer`` saves for its backward (:class:`SavedActivations`), in MB;
    the gradients it makes are dropped."""
    with SavedActivations(model) as saved:
        trainer.training_step(model, batch)
    model.zero_grad(set_to_none=True)
    return saved.bytes / 2**20


def cuda_peak_memory_mb(trainer: SelectiveBackpropTrainer, model: torch.nn.Module, batch: dict) -> float:
    """CUDA only: the allocator's peak during one training step of ``trainer`` above what was allocated before it
    (model, optimizer state, data), in MB: the activations and gradients the step needs. The gradients it makes are
    dropped. (On the CPU the resident memory depends on what the allocator keeps; :func:`saved_activations_mb` is
    the measure there.)"""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    trainer.training_step(model, batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    model.zero_grad(set_to_none=True)
    return (peak - base) / 2**20


def run_throughput(ctx: BenchmarkContext, data: Data) -> list[dict[str, Any]]:
    """Median step time per strategy and keep, all interleaved in one process, with the memory of each
    (rows of ``throughput.json``). With ``--peft lora`` the model is LoRA-wrapped (:func:`lora_model`) and every row
    has ``"peft": "lora"``; the ideal ratio is then ``(1 + 2 keep) / 2`` (a backward costs about one forward when
    the base weights are frozen) instead of ``(1 + 3 keep) / 3``."""
    bench = ctx.bench
    model = load_model(ctx.model_path, data.num_labels, 0, bench.device)
    lora = bench.peft == LORA
    if lora:
        model = lora_model(model, bench.lora_r)
    batches = collated_batches(data.splits["train"], ctx.tokenizer, bench.batch_size, 4, bench.device, bench.seq_len)
    batches = indexed(batches)
    grid = strategy_grid(per_batch(bench.probe_strategy_names), bench.keep_values)
    trainers = {key: step_trainer(model, *key, bench, ctx.scratch_dir, batches) for key in grid}
    # SGD with a zero learning rate keeps the model fixed, so every strategy times the same model;
    # the optimizer step's cost is the same for all and small next to forward and backward.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    times: dict[tuple[str, float], list[float]] = defaultdict(list)

    for repeat in range(bench.repeats + 1):  # the first round warms up and is dropped
        batch = batches[repeat % len(batches)]
        for key in grid:
            elapsed, _ = timed_training_step(trainers[key], model, batch, optimizer, bench.device)
            if repeat:
                times[key].append(elapsed)
        sync(bench.device)
        start = time.perf_counter()
        with torch.no_grad():
            model.eval()
            model(**{k: v for k, v in batch.items() if k not in ("labels", EXAMPLE_ID_KEY)})
            model.train()
        sync(bench.device)
        if repeat:
            times[(SCORING_FORWARD, 1.0)].append(time.perf_counter() - start)
        if repeat % 5 == 0:
            ctx.progress(f"throughput round {repeat}/{bench.repeats}")
    full = statistics.median(times[(FULL_BATCH, 1.0)])
    rows = []
    for (strategy, keep), values in times.items():
        row = {
            "strategy": strategy,
            "keep": keep,
            "device": bench.device,
            "step_s": statistics.median(values),
            "full_step_s": full,
        }
        if lora:
            row.update(peft=LORA, lora_r=bench.lora_r)
        if strategy != SCORING_FORWARD:
            if bench.device == "cuda":
                row["peak_mem_mb"] = cuda_peak_memory_mb(trainers[(strategy, keep)], model, batches[0])
            row["saved_activations_mb"] = saved_activations_mb(trainers[(strategy, keep)], model, batches[0])
        rows.append(row)
    scoring_s = statistics.median(times[(SCORING_FORWARD, 1.0)])
    for row in rows:
        row["ratio_to_full"] = row["step_s"] / full
        trainer = trainers.get((row["strategy"], row["keep"]))
        if trainer is not None and trainer.strategy.selective and trainer.runs_scoring_pass:
            # Scoring forward (a third of a full step; half with LoRA) plus forward and backward on the subset.
            passes = 2 if lora else 3
            row["ideal_ratio"] = (1 + passes * row["keep"]) / passes
            random_times = times.get((RANDOM_SUBSET, row["keep"]))
            if random_times:  # the floor needs the random subset's step at the same keep
                row["floor_s"] = scoring_s + statistics.median(random_times)
                row["ratio_to_floor"] = row["step_s"] / row["floor_s"]
        ctx.progress(
            f"throughput{' lora' if lora else ''} {row['strategy']}@{row['keep']}: {row['step_s']:.3f} s "
            f"({row['ratio_to_full']:.3f} x full)"
        )
    return rows
