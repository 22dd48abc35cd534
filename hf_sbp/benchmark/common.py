"""What every part of the benchmark shares: its arguments, the strategies it compares, the machine description,
the JSON files, the data, the model and the trainers it times."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

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

from ..config import SelectiveBackpropConfig, import_strategy_modules
from ..glue.run_glue import DataTrainingArguments, label_info, load_raw_datasets, text_columns
from ..strategies import registered_strategies, strategy_class
from ..trainer import SelectiveBackpropTrainer

DEFAULT_OUTPUT_DIR = "docs/benchmarks"
"""Where the committed results live; the report rewrites the README's results block only from there."""
PARTS = ("overhead", "throughput", "grad-match", "training", "time-to-accuracy", "padding")
"""The measurements, in the order ``all`` runs them; each writes ``<part>.json`` (``-`` as ``_``)."""
COMMANDS = (*PARTS, "all", "report")
FULL_BATCH = "none"
"""The plain ``Trainer`` step: the baseline every selective strategy is compared with."""
BUDGET_STRATEGY = "random"
"""The uniformly random subset: a smaller batch at no selection cost, whose training time sets the equal
wall-clock budget of the training comparison."""
PRUNING_BASELINE = "random-prune"
"""The baseline of the dataset-level strategies: as many examples left out per epoch, uniformly at random."""
OVERHEAD_STRATEGY = "gradmatch"
PEFT_MODES = ("none", "lora")
"""``--peft`` values: full fine-tuning, or LoRA on the attention projections (throughput part only)."""
"""The strategy whose selection cost the overhead part measures (the most expensive built-in one)."""


def selective_strategies() -> tuple[str, ...]:
    """The registered strategies that select a subset (all but ``none``), in registration order."""
    return tuple(name for name in registered_strategies() if strategy_class(name).selective)


def parse_strategies(text: str, option: str = "--strategies") -> list[str]:
    """The comma-separated selective strategy names of ``text`` (every registered one if empty), checked against
    the registry: a ``ValueError`` names an unknown or non-selective name and the registered choices."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        return list(selective_strategies())
    for name in names:
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
    return names


def prunes_dataset(name: str) -> bool:
    """Whether ``name`` is a dataset-level strategy (``infobatch``, ``random-prune``); ``False`` for a name that is not
    registered (results of a strategy whose module is not imported)."""
    return name in registered_strategies() and strategy_class(name).prunes_dataset


def run_keep(name: str, keep: float) -> float:
    """The ``sbp_keep`` a run of ``name`` takes: ``keep`` for a strategy that selects within batches, 1.0 for the
    full batch and the dataset-level strategies (they train whole batches)."""
    return keep if strategy_class(name).selective and not prunes_dataset(name) else 1.0


def per_batch(names: Iterable[str]) -> list[str]:
    """The strategies of ``names`` that select within batches: the ones the per-step parts (throughput, grad-match,
    training, padding) measure; a dataset-level strategy's step is the full batch's."""
    return [name for name in names if not prunes_dataset(name)]


def strategy_order(names: Iterable[str]) -> list[str]:
    """``names`` without repeats, in registration order; names not registered (results of a strategy whose module
    is not imported) follow, alphabetically."""
    registered = {name: position for position, name in enumerate(registered_strategies())}
    return sorted(set(names), key=lambda name: (registered.get(name, len(registered)), name))


def strategy_grid(strategies: list[str], keeps: list[float]) -> list[tuple[str, float]]:
    """The full-batch baseline, then every (strategy, keep) pair of the per-batch strategies, keep by keep, then the
    dataset-level strategies at keep 1.0 (they train whole batches)."""
    batch = [(strategy, keep) for keep in keeps for strategy in per_batch(strategies)]
    return [(FULL_BATCH, 1.0)] + batch + [(strategy, 1.0) for strategy in strategies if prunes_dataset(strategy)]


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass
class BenchmarkArguments:
    """The benchmark's command line (see :mod:`hf_sbp.benchmark` for the commands)."""

    command: str = field(metadata={"help": f"One of {list(COMMANDS)}."})
    quick: bool = field(
        default=False,
        metadata={
            "help": "The short version: one dataset and seed, fewer steps, keeps, repeats and batch sizes; "
            "time-to-accuracy: one dataset, seed 0, noise 0, at the full version's sizes."
        },
    )
    output_dir: str = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "Where the JSON, plots and report go."})
    readme: str | None = field(
        default=None,
        metadata={
            "help": "The README whose marked time-to-accuracy results block the report rewrites (default: README.md "
            f"when --output_dir is {DEFAULT_OUTPUT_DIR}, else none; nothing happens to a README without the block)."
        },
    )
    model_name_or_path: str = field(default="all-MiniLM-L6-v2", metadata={"help": "Model (bundled name or path)."})
    datasets: str = field(
        default="tweets,bbc-news",
        metadata={
            "help": "Comma-separated dataset names (bundled or datasets-library) for the training and "
            "time-to-accuracy parts."
        },
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local CSV/JSON training file (replaces --datasets)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local CSV/JSON validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Local CSV/JSON test file (else validation)."})
    strategies: str = field(
        default="",
        metadata={
            "help": "Comma-separated selective strategies that the throughput, grad-match, training and "
            "time-to-accuracy parts compare (with the full-batch baseline 'none'); default: every registered "
            "selective strategy. The dataset-level ones (infobatch, random-prune) run in time-to-accuracy only."
        },
    )
    sbp_strategy_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Python modules (space- or comma-separated) to import first, so that the strategies they register "
            "with @hf_sbp.register_strategy can be named in --strategies."
        },
    )
    device: str = field(default="auto", metadata={"help": "'cpu', 'cuda' or 'auto'."})
    omp_impls: str = field(
        default="",
        metadata={
            "help": "Overhead part: comma-separated OMP loops to time, 'numba' and/or 'torch' (sbp_omp_impl), each in "
            "rows of its own (field omp_impl); default: numba on the CPU, numba,torch on CUDA."
        },
    )
    overhead_batch_sizes: str = field(
        default="",
        metadata={"help": "Overhead part: comma-separated batch sizes (default: 16 to 2048; quick: 16, 32, 64)."},
    )
    seq_len: int = field(
        default=64,
        metadata={
            "help": "Tokens per example: overhead and throughput pad every example to it; training and "
            "time-to-accuracy truncate to it (dynamic padding)."
        },
    )
    batch_size: int = field(default=32, metadata={"help": "Training batch size (throughput, grad-match, training)."})
    repeats: int = field(default=0, metadata={"help": "Timing repeats (0: 5 quick, 15 full)."})
    keeps: str = field(
        default="",
        metadata={"help": "Keep values for overhead, throughput and grad-match (default: 0.5 quick; 0.5,0.25)."},
    )
    training_keeps: str = field(
        default="0.5", metadata={"help": "Comma-separated keep values of the training and time-to-accuracy runs."}
    )
    noises: str = field(
        default="",
        metadata={
            "help": "Comma-separated label-noise rates of the training and time-to-accuracy runs (default: 0,0.2; "
            "time-to-accuracy --quick: 0)."
        },
    )
    seeds: str = field(default="", metadata={"help": "Comma-separated seeds (default: 0 quick; 0,1,2 full)."})
    train_steps: int = field(default=0, metadata={"help": "Steps per training run (0: 30 quick, 60 full)."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every this many steps (0: a fifth of the steps)."})
    eval_samples: int = field(default=0, metadata={"help": "Validation examples per evaluation (0: 300 / 400)."})
    test_samples: int = field(default=0, metadata={"help": "Test examples for the final accuracy (0: 500 / 1000)."})
    learning_rate: float = field(
        default=1e-4,
        metadata={
            "help": "Peak learning rate of the training runs, and of the time-to-accuracy runs on datasets that "
            "--tta_learning_rates does not name."
        },
    )
    peft: str = field(
        default="none",
        metadata={
            "help": "Throughput part: 'none' (full fine-tuning) or 'lora' (LoRA on the attention projections, query "
            "and value for BERT, with the classifier in modules_to_save; needs the peft package). The rows of the "
            "other mode already in throughput.json are kept."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of --peft lora (lora_alpha = 2 r)."})
    tta_train_examples: int = field(
        default=0,
        metadata={
            "help": "Time-to-accuracy: training examples per run, a fixed subset per seed (0: 2560, --quick 640; a "
            "smaller training split is used whole)."
        },
    )
    tta_epochs: int = field(
        default=3,
        metadata={
            "help": "Time-to-accuracy: epochs of the full-batch run, whose training time is every strategy's budget "
            "(more where --tta_min_steps needs them)."
        },
    )
    tta_min_steps: int = field(
        default=0,
        metadata={"help": "Time-to-accuracy: full-batch steps at least, by adding epochs (0: 240, --quick 60)."},
    )
    tta_learning_rates: str = field(
        default="bbc-news=5e-5",
        metadata={
            "help": "Time-to-accuracy: peak learning rates per dataset, 'name=rate' comma-separated (others: "
            "--learning_rate), chosen so that the full batch's accuracy still rises over most of its budget."
        },
    )
    tta_eval_samples: int = field(
        default=0,
        metadata={"help": "Time-to-accuracy: validation examples per evaluation (0: 1000, --quick 500)."},
    )
    tta_min_eval_samples: int = field(
        default=500,
        metadata={
            "help": "Time-to-accuracy: where the validation split is smaller than this, the test split and then "
            "training examples top the validation sample up to this many."
        },
    )
    tta_eval_points: int = field(
        default=0,
        metadata={
            "help": "Time-to-accuracy: evaluation marks per run at fractions i / points of the budget (0: 24, --quick "
            "12; a multiple of 4 puts marks at 25%%, 50%% and 75%%)."
        },
    )
    tta_seed_limits: str = field(
        default="stale-gradmatch=3,infobatch=3,random-prune=3",
        metadata={
            "help": "Time-to-accuracy: strategies that run on fewer seeds, 'name=count' comma-separated (the first "
            "count seeds of --seeds)."
        },
    )
    memory_strategy: str = field(
        default=OVERHEAD_STRATEGY, metadata={"help": "Internal: the strategy _peak_memory measures."}
    )

    def __post_init__(self) -> None:
        if self.command not in (*COMMANDS, "_peak_memory"):
            raise ValueError(f"command={self.command!r} is invalid; choose one of {list(COMMANDS)}.")
        self.strategy_modules = [name for item in self.sbp_strategy_modules or [] for name in _split_list(item)]
        import_strategy_modules(self.strategy_modules)
        self.strategy_names = parse_strategies(self.strategies)
        strategy_class(self.memory_strategy)  # a clear error for an unknown name
        quick = self.quick
        self.repeats = self.repeats or (5 if quick else 15)
        self.train_steps = self.train_steps or (30 if quick else 60)
        self.eval_every = self.eval_every or max(1, self.train_steps // 5)
        self.eval_samples = self.eval_samples or (300 if quick else 400)
        self.test_samples = self.test_samples or (500 if quick else 1000)
        self.keep_values = [float(k) for k in (self.keeps or ("0.5" if quick else "0.5,0.25")).split(",")]
        self.training_keep_values = [float(k) for k in self.training_keeps.split(",")]
        self.noise_values = [float(v) for v in (self.noises or "0.0,0.2").split(",")]
        self.tta_noise_values = [float(v) for v in (self.noises or ("0.0" if quick else "0.0,0.2")).split(",")]
        self.seed_values = [int(s) for s in (self.seeds or ("0" if quick else "0,1,2")).split(",")]
        for keep in self.keep_values + self.training_keep_values:
            if not 0 < keep <= 1:
                raise ValueError(f"keep={keep} in --keeps is invalid; each must be in (0, 1].")
        for noise in self.noise_values:
            if not 0 <= noise <= 1:
                raise ValueError(f"label noise {noise} in --noises is invalid; each must be in [0, 1].")
        self.tta_learning_rate_values = {}
        for item in _split_list(self.tta_learning_rates):
            name, _, rate = item.partition("=")
            try:
                self.tta_learning_rate_values[name.strip()] = float(rate)
            except ValueError:
                raise ValueError(
                    f"--tta_learning_rates item {item!r} is invalid; write 'dataset=rate', e.g. 'bbc-news=5e-5'."
                ) from None
        if self.peft not in PEFT_MODES:
            raise ValueError(f"peft={self.peft!r} is invalid; choose one of {list(PEFT_MODES)}.")
        if self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r} is invalid; it must be at least 1.")
        self._time_to_accuracy_defaults()
        if self.readme is None and os.path.normpath(self.output_dir) == DEFAULT_OUTPUT_DIR:
            self.readme = "README.md"
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is invalid; choose 'cpu', 'cuda' or 'auto'.")
        default_impls = "numba,torch" if self.device == "cuda" else "numba"
        self.omp_impl_values = _split_list(self.omp_impls or default_impls)
        for impl in self.omp_impl_values:
            if impl not in ("numba", "torch"):
                raise ValueError(f"OMP loop {impl!r} in --omp_impls is invalid; each must be 'numba' or 'torch'.")
        self.overhead_batch_size_values = [int(b) for b in _split_list(self.overhead_batch_sizes)]
        if any(b < 2 for b in self.overhead_batch_size_values):
            raise ValueError("each of --overhead_batch_sizes must be at least 2.")

    def _time_to_accuracy_defaults(self) -> None:
        quick = self.quick
        self.tta_train_examples = self.tta_train_examples or (640 if quick else 2560)
        self.tta_min_steps = self.tta_min_steps or (60 if quick else 240)
        self.tta_eval_samples = self.tta_eval_samples or (500 if quick else 1000)
        self.tta_eval_points = self.tta_eval_points or (12 if quick else 24)
        self.tta_seed_values = [int(s) for s in (self.seeds or ("0,1" if quick else "0,1,2,3,4")).split(",")]
        # --quick compares the paper's method with its baseline only, unless --strategies names others.
        self.tta_strategy_names = ["random", "gradmatch"] if quick and not self.strategies else self.strategy_names
        for name, value in (
            ("--tta_epochs", self.tta_epochs),
            ("--tta_train_examples", self.tta_train_examples),
            ("--tta_min_steps", self.tta_min_steps),
            ("--tta_eval_samples", self.tta_eval_samples),
            ("--tta_min_eval_samples", self.tta_min_eval_samples),
            ("--tta_eval_points", self.tta_eval_points),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} is invalid; it must be at least 1.")
        self.tta_seed_limit_values = {}
        for item in _split_list(self.tta_seed_limits):
            name, _, count = item.partition("=")
            if not count.strip().isdigit():
                raise ValueError(
                    f"--tta_seed_limits item {item!r} is invalid; write 'strategy=count', e.g. 'infobatch=3'."
                )
            self.tta_seed_limit_values[name.strip()] = int(count)

    def tta_seed_limit(self, strategy: str) -> int:
        """How many of the time-to-accuracy seeds ``strategy`` runs on (its ``--tta_seed_limits`` entry, else all)."""
        return self.tta_seed_limit_values.get(strategy, len(self.tta_seed_values))

    def tta_learning_rate(self, dataset: str) -> float:
        """The time-to-accuracy runs' peak learning rate on ``dataset``: its ``--tta_learning_rates`` entry, else
        ``--learning_rate``."""
        return self.tta_learning_rate_values.get(dataset, self.learning_rate)

    def dataset_specs(self) -> list[tuple[str, DataTrainingArguments]]:
        """The datasets of the training and time-to-accuracy parts, by name: the local files, else ``--datasets``
        (only the first in quick)."""
        if self.train_file is not None:
            name = os.path.splitext(os.path.basename(self.train_file))[0]
            spec = DataTrainingArguments(
                train_file=self.train_file, validation_file=self.validation_file, test_file=self.test_file
            )
            return [(name, spec)]
        names = _split_list(self.datasets)
        if self.quick:
            names = names[:1]
        return [(name, DataTrainingArguments(dataset_name=name)) for name in names]


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


def fixed_batches(
    dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int, seq_len: int, count: int, device: str
) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of real examples padded to exactly ``seq_len`` tokens, on ``device``."""
    collate = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=seq_len)
    rows = dataset.shuffle(seed=0).select(range(min(len(dataset), batch_size * count)))
    batches = []
    for start in range(0, batch_size * count, batch_size):
        chunk = [rows[i % len(rows)] for i in range(start, start + batch_size)]
        batches.append({k: v.to(device) for k, v in collate(chunk).items()})
    return batches


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
    args = SelectiveBackpropConfig(
        output_dir=output_dir,
        sbp_strategy=strategy,
        sbp_keep=keep,
        per_device_train_batch_size=batch_size,
        report_to="none",
        save_strategy="no",
        use_cpu=device == "cpu",
        disable_tqdm=True,
        **extra,
    )
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
    saved and no log lines (``extra``: more ``SelectiveBackpropConfig`` fields). The training and time-to-accuracy
    parts train through it."""
    args = SelectiveBackpropConfig(
        output_dir=output_dir,
        sbp_strategy=strategy,
        sbp_keep=keep,
        seed=seed,
        sbp_seed=seed,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size,
        learning_rate=learning_rate,
        max_steps=steps,
        warmup_steps=warmup_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        disable_tqdm=True,
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


def full_batch_step(
    model: PreTrainedModel, train: Any, collate: Any, optimizer: torch.optim.Optimizer, step: int, bench: Any
) -> None:
    """One plain full-batch training step of a probe run (the grad-match and scoring-length parts): the
    ``step``-th window of ``bench.batch_size`` rows of ``train``, collated, forward, backward, optimizer step."""
    model.train()
    start = (step * bench.batch_size) % max(1, len(train) - bench.batch_size)
    batch = collate([train[i] for i in range(start, start + bench.batch_size)])
    batch = {k: v.to(bench.device) for k, v in batch.items()}
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()
