"""What every part of the benchmark shares: the strategies it compares, the machine description, the JSON files,
the data, the model and the trainers it times (its arguments are in :mod:`.arguments`)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    set_seed,
)

from ..config import SelectiveBackpropArguments, SelectiveBackpropConfig
from ..glue.arguments import DataTrainingArguments
from ..glue.run_glue import first_rows, label_info, load_raw_datasets, text_columns
from ..strategies import registered_strategies, strategy_class
from ..trainer import SelectiveBackpropTrainer

if TYPE_CHECKING:
    from .arguments import BenchmarkArguments

DEFAULT_OUTPUT_DIR = "docs/benchmarks"
"""Where the committed results live; the report rewrites the README's results block only from there."""
PARTS = ("overhead", "throughput", "grad-match", "time-to-accuracy", "padding")
"""The measurements, in the order ``all`` runs them; each writes ``<part>.json`` (``-`` as ``_``)."""
COMMANDS = (*PARTS, "all", "report")
FULL_BATCH = "none"
"""The plain ``Trainer`` step: the baseline every selective strategy is compared with."""
RANDOM_SUBSET = "random"
"""The uniformly random subset: a smaller batch at no selection cost, the baseline every selective strategy's
verdict is paired with."""
PRUNING_BASELINE = "random-prune"
"""The baseline of the dataset-level strategies: as many examples left out per epoch, uniformly at random."""
OVERHEAD_STRATEGY = "gradmatch"
"""The strategy whose selection cost the overhead part measures (the most expensive built-in one)."""
PEFT_MODES = ("none", "lora")
"""``--peft`` values: full fine-tuning, or LoRA on the attention projections (throughput part only)."""


def selective_strategies() -> tuple[str, ...]:
    """The registered strategies that select a subset (all but ``none``), in registration order."""
    return tuple(name for name in registered_strategies() if strategy_class(name).selective)


VARIANT = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<settings>[^\[\]]*)\]$")
"""A strategy variant's label: ``name[sbp_key=value;sbp_key=value]``."""


def parse_variant(label: str) -> tuple[str, dict[str, Any]]:
    """``(strategy, settings)`` of a strategy label: a registered name (no settings), or a variant
    ``name[sbp_key=value;...]`` that runs ``name`` with those ``sbp_*`` settings of
    :class:`~hf_sbp.SelectiveBackpropArguments` (``rho-loss[sbp_il_model=linear_probe]``). Values are read as
    ``true``/``false``, integers, floats or strings; the trainer's arguments check them when a run is built."""
    match = VARIANT.match(label.strip())
    if match is None:
        return label.strip(), {}
    settings: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(SelectiveBackpropArguments)} - {"sbp_strategy", "sbp_keep"}
    for item in match["settings"].split(";"):
        key, equals, text = (part.strip() for part in item.partition("="))
        if not equals or key not in fields:
            raise ValueError(
                f"strategy variant {label!r} has the setting {item.strip()!r}; write name[sbp_key=value;...] with "
                f"sbp_* settings other than sbp_strategy and sbp_keep (the grid's), one of {sorted(fields)}."
            )
        settings[key] = _setting_value(text)
    return match["name"].strip(), settings


def _setting_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_strategies(text: str, option: str = "--strategies") -> list[str]:
    """The comma-separated selective strategy labels of ``text`` (every registered strategy if empty), checked
    against the registry: a ``ValueError`` names an unknown or non-selective name and the registered choices. A
    label is a registered name or a variant of one (:func:`parse_variant`)."""
    labels = list(dict.fromkeys(label.strip() for label in text.split(",") if label.strip()))
    if not labels:
        return list(selective_strategies())
    for label in labels:
        name, _ = parse_variant(label)
        if name not in registered_strategies():
            raise ValueError(
                f"{option} names {name!r}, which is not a registered strategy; choose from "
                f"{list(selective_strategies())}, or register your own with @hf_sbp.register_strategy and import its "
                "module with --sbp_strategy_modules."
            )
        if not strategy_class(name).selective:
            raise ValueError(
                f"{option} names {name!r}, which selects no subset: it is the full-batch baseline that every part "
                f"runs anyway; choose from {list(selective_strategies())}."
            )
    return labels


def prunes_dataset(label: str) -> bool:
    """Whether ``label`` (a strategy or a variant of one) is a dataset-level strategy (``infobatch``,
    ``random-prune``); ``False`` for a name that is not registered (results of a strategy whose module is not
    imported)."""
    name = parse_variant(label)[0]
    return name in registered_strategies() and strategy_class(name).prunes_dataset


def run_keep(name: str, keep: float) -> float:
    """The ``sbp_keep`` a run of ``name`` takes: ``keep`` for a strategy that selects within batches, 1.0 for the
    full batch and the dataset-level strategies (they train whole batches)."""
    base = parse_variant(name)[0]
    return keep if strategy_class(base).selective and not prunes_dataset(base) else 1.0


def per_batch(names: Iterable[str]) -> list[str]:
    """The strategies of ``names`` that select within batches: the ones the per-step parts (throughput, grad-match,
    padding) measure; a dataset-level strategy's step is the full batch's."""
    return [name for name in names if not prunes_dataset(name)]


def strategy_order(names: Iterable[str]) -> list[str]:
    """``names`` without repeats, in registration order, each strategy's variants right after it; names not
    registered (results of a strategy whose module is not imported) follow, alphabetically."""
    registered = {name: position for position, name in enumerate(registered_strategies())}

    def key(label: str) -> tuple:
        name = parse_variant(label)[0]
        return (registered.get(name, len(registered)), name, label != name, label)

    return sorted(set(names), key=key)


def strategy_grid(strategies: list[str], keeps: list[float]) -> list[tuple[str, float]]:
    """The full-batch baseline, then every (strategy, keep) pair of the per-batch strategies, keep by keep, then the
    dataset-level strategies at keep 1.0 (they train whole batches)."""
    batch = [(strategy, keep) for keep in keeps for strategy in per_batch(strategies)]
    return [(FULL_BATCH, 1.0)] + batch + [(strategy, 1.0) for strategy in strategies if prunes_dataset(strategy)]


def split_list(text: str) -> list[str]:
    """The non-empty items of a comma-separated list."""
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass
class BenchmarkContext:
    """What a part of the benchmark runs with: its arguments, the model and its tokenizer, a scratch folder for the
    trainers' (unused) output, and the clock of the progress lines."""

    bench: BenchmarkArguments
    model_path: str
    tokenizer: PreTrainedTokenizerBase
    scratch_dir: str
    started: float = field(default_factory=time.perf_counter)

    def progress(self, message: str) -> None:
        """Print ``message`` with the seconds since the benchmark started."""
        progress(message, self.started)


# ---- machine, progress and JSON ---------------------------------------------------------------------


def machine_info(device: str) -> dict[str, Any]:
    """The CPU (or GPU), core and thread counts and versions the numbers were measured with."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(
    path: str,
    machine: dict[str, Any],
    rows: list[dict[str, Any]],
    verbose: bool = True,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``{"machine": machine, **extra, "rows": rows}`` to ``path`` atomically (never a half-written file); say
    so unless ``verbose`` is false."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump({"machine": machine, **(extra or {}), "rows": rows}, handle, indent=1)
    os.replace(tmp, path)
    if verbose:
        print(f"wrote {path}", flush=True)


def load_rows(output_dir: str, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The machine and the rows of ``<output_dir>/<name>.json``; ``({}, [])`` if there is no such file."""
    path = os.path.join(output_dir, f"{name}.json")
    if not os.path.isfile(path):
        return {}, []
    with open(path) as handle:
        payload = json.load(handle)
    return payload["machine"], payload["rows"]


def progress(message: str, started: float) -> None:
    """Print ``message`` with the seconds since ``started`` (a ``time.perf_counter`` value)."""
    print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)


def sync(device: str) -> None:
    """Wait for the device's queued work (a timing barrier on CUDA; nothing on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed_training_step(
    trainer: SelectiveBackpropTrainer,
    model: PreTrainedModel,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    device: str,
) -> tuple[float, float]:
    """``(wall-clock s, CPU s)`` of one training step of ``trainer`` on ``batch`` with its optimizer step, waiting for
    the device's queued work at both ends. CPU seconds are this process's (``time.process_time``, all threads): on a
    machine shared with other work they are the steadier of the two."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.training_step(model, batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


# ---- data, model and trainers -----------------------------------------------------------------------


class Data:
    """A classification dataset tokenised for a model: its splits (``labels`` as class ids) and label count.

    Args:
        spec: which data, with the rules of ``run_glue.py`` (bundled or ``datasets`` name, or local files).
        tokenizer: the model's tokenizer.
        max_length: tokens per example at most (longer ones are truncated).
        limit: keep only the first ``limit`` rows of each split.
    """

    def __init__(
        self,
        spec: DataTrainingArguments,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        limit: int | None = None,
    ) -> None:
        raw = load_raw_datasets(spec, do_predict=spec.test_file is not None)
        if limit is not None:
            raw = {split: part.select(range(min(limit, len(part)))) for split, part in raw.items()}
        info = label_info(raw["train"])
        if info.is_regression:
            raise ValueError("the benchmark measures accuracy; its datasets must be classification, not regression.")
        self.num_labels = info.num_labels
        self.label_names = info.label_names
        first, second = text_columns(raw["train"].column_names)

        def encode(batch):
            texts = (batch[first],) if second is None else (batch[first], batch[second])
            out = tokenizer(*texts, truncation=True, max_length=max_length)
            labels = batch["label"]
            out["labels"] = [info.label_to_id[v] for v in labels] if info.label_to_id else labels
            return out

        self.splits = {}
        for split in raw:
            self.splits[split] = raw[split].map(encode, batched=True, remove_columns=raw[split].column_names)
        self.test_split = "test" if "test" in self.splits else "validation"


def load_model(path: str, num_labels: int, seed: int, device: str) -> PreTrainedModel:
    """The sequence classifier at ``path`` with a fresh head initialised under ``seed``, on ``device``."""
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model.to(device)


def collated_batches(
    dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    count: int,
    device: str,
    seq_len: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``batch_size`` real rows of ``dataset`` (shuffled with seed 0; reused when it has fewer),
    on ``device``: padded to exactly ``seq_len`` tokens, or with ``seq_len=None`` to each batch's longest row, as the
    trainer's dataloader pads them (dynamic padding)."""
    if seq_len is None:
        collate = DataCollatorWithPadding(tokenizer)
    else:
        collate = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=seq_len)
    rows = first_rows(dataset.shuffle(seed=0), batch_size * count)
    batches = []
    for start in range(0, batch_size * count, batch_size):
        chunk = [rows[i % len(rows)] for i in range(start, start + batch_size)]
        batches.append({k: v.to(device) for k, v in collate(chunk).items()})
    return batches


def benchmark_config(
    strategy: str, keep: float, batch_size: int, device: str, output_dir: str, **extra: Any
) -> SelectiveBackpropConfig:
    """The arguments of a benchmark trainer: ``strategy`` (a name or a variant, :func:`parse_variant`) at ``keep``,
    ``batch_size`` rows per step, nothing saved or reported, no progress bar (``extra``: more fields)."""
    name, settings = parse_variant(strategy)
    return SelectiveBackpropConfig(
        output_dir=output_dir,
        sbp_strategy=name,
        sbp_keep=keep,
        **settings,
        per_device_train_batch_size=batch_size,
        report_to="none",
        save_strategy="no",
        use_cpu=device == "cpu",
        disable_tqdm=True,
        **extra,
    )


def make_trainer(
    model: PreTrainedModel,
    strategy: str,
    keep: float,
    batch_size: int,
    device: str,
    output_dir: str,
    train_dataset: Any = None,
    **extra: Any,
) -> SelectiveBackpropTrainer:
    """A trainer whose ``training_step`` and ``select_batch`` are called by hand (no accumulation). ``train_dataset``
    only sizes the per-example cache of a strategy that uses one (batches then carry example ids)."""
    args = benchmark_config(strategy, keep, batch_size, device, output_dir, **extra)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=train_dataset)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def evaluating_trainer(
    model: PreTrainedModel,
    *,
    strategy: str,
    keep: float,
    seed: int,
    steps: int,
    warmup_steps: int,
    batch_size: int,
    eval_batch_size: int,
    learning_rate: float,
    device: str,
    train: Any,
    validation: Any,
    tokenizer: Any,
    output_dir: str,
    trainer_class: type[SelectiveBackpropTrainer] = SelectiveBackpropTrainer,
    **extra: Any,
) -> SelectiveBackpropTrainer:
    """A ``trainer_class`` trainer of one seeded benchmark run: ``steps`` steps of ``strategy`` at ``keep`` with a
    linear schedule warming up over ``warmup_steps``, dynamic padding, accuracy on ``validation`` (if given), nothing
    saved and no log lines (``extra``: more ``SelectiveBackpropConfig`` fields). The time-to-accuracy
    runs train through it."""
    args = benchmark_config(
        strategy,
        keep,
        batch_size,
        device,
        output_dir,
        seed=seed,
        sbp_seed=seed,
        per_device_eval_batch_size=eval_batch_size,
        learning_rate=learning_rate,
        max_steps=steps,
        warmup_steps=warmup_steps,
        **extra,
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def accuracy(prediction) -> dict[str, float]:
    """``compute_metrics`` for single-label classification: the share of argmax predictions that are right."""
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}
