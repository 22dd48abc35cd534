"""Benchmarks of selective backprop: overhead, throughput, gradient match and the paper's training experiment.

    python scripts/benchmark.py all --quick          # everything, about 8 minutes on 2 CPU cores
    python scripts/benchmark.py all                  # the full run, about 70 minutes on 2 CPU cores
    python scripts/benchmark.py overhead|throughput|grad-match|training [--quick]
    python scripts/benchmark.py report               # tables and plots from the JSON already written

Data: the bundled datasets by name (``--datasets tweets,bbc-news``), any ``datasets`` name that
``run_glue.py`` takes, or local CSV/JSON files (``--train_file``, ``--validation_file``, ``--test_file``),
with the text/label column rules of ``run_glue.py``. Every JSON file is ``{"machine": {...}, "rows": [...]}``
and lands in ``--output_dir`` (``docs/benchmarks`` by default).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    PrinterCallback,
    TrainerCallback,
    set_seed,
)
from transformers.utils import logging as hf_logging

from hf_sbp import SelectiveBackpropConfig, SelectiveBackpropTrainer
from hf_sbp.data import resolve_model_name
from hf_sbp.glue import DataTrainingArguments, apply_label_noise, label_info, load_raw_datasets, text_columns
from hf_sbp.head import HeadCapture
from hf_sbp.selection import index_rows

PARTS = ("overhead", "throughput", "grad-match", "training")
SELECTIVE = ("random", "loss", "gradmatch")


@dataclass
class BenchmarkArguments:
    command: str = field(metadata={"help": f"One of {list(PARTS) + ['all', 'report']}."})
    quick: bool = field(default=False, metadata={"help": "The short version: 15 minutes or less on 2 CPU cores."})
    output_dir: str = field(default="docs/benchmarks", metadata={"help": "Where the JSON, plots and report go."})
    model_name_or_path: str = field(default="all-MiniLM-L6-v2", metadata={"help": "Model (bundled name or path)."})
    datasets: str = field(
        default="tweets,bbc-news",
        metadata={"help": "Comma-separated dataset names (bundled or datasets-library) for the training part."},
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local CSV/JSON training file (replaces --datasets)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local CSV/JSON validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Local CSV/JSON test file (else validation)."})
    device: str = field(default="auto", metadata={"help": "'cpu', 'cuda' or 'auto'."})
    seq_len: int = field(default=64, metadata={"help": "Tokens per example for overhead and throughput."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size (throughput, grad-match, training)."})
    repeats: int = field(default=0, metadata={"help": "Timing repeats (0: 5 quick, 15 full)."})
    keeps: str = field(
        default="",
        metadata={"help": "Keep values for overhead, throughput and grad-match (default: 0.5 quick; 0.5,0.25)."},
    )
    training_keeps: str = field(default="0.5", metadata={"help": "Comma-separated keep values of the training runs."})
    noises: str = field(default="0.0,0.2", metadata={"help": "Comma-separated label-noise rates for training."})
    seeds: str = field(default="", metadata={"help": "Comma-separated seeds (default: 0 quick; 0,1,2 full)."})
    train_steps: int = field(default=0, metadata={"help": "Steps per training run (0: 30 quick, 60 full)."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every this many steps (0: train_steps / 6)."})
    eval_samples: int = field(default=0, metadata={"help": "Validation examples per evaluation (0: 300 / 400)."})
    test_samples: int = field(default=0, metadata={"help": "Test examples for the final accuracy (0: 500 / 1000)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of the training runs."})
    memory_strategy: str = field(
        default="gradmatch", metadata={"help": "Internal: the strategy _peak_memory measures."}
    )

    def __post_init__(self) -> None:
        if self.command not in PARTS + ("all", "report", "_peak_memory"):
            raise ValueError(f"command={self.command!r} is invalid; choose one of {list(PARTS) + ['all', 'report']}.")
        quick = self.quick
        self.repeats = self.repeats or (5 if quick else 15)
        self.train_steps = self.train_steps or (30 if quick else 60)
        self.eval_every = self.eval_every or max(1, self.train_steps // 5)
        self.eval_samples = self.eval_samples or (300 if quick else 400)
        self.test_samples = self.test_samples or (500 if quick else 1000)
        self.keep_values = [float(k) for k in (self.keeps or ("0.5" if quick else "0.5,0.25")).split(",")]
        self.training_keep_values = [float(k) for k in self.training_keeps.split(",")]
        self.noise_values = [float(v) for v in self.noises.split(",")]
        self.seed_values = [int(s) for s in (self.seeds or ("0" if quick else "0,1,2")).split(",")]
        for keep in self.keep_values + self.training_keep_values:
            if not 0 < keep <= 1:
                raise ValueError(f"keep={keep} in --keeps is invalid; each must be in (0, 1].")
        for noise in self.noise_values:
            if not 0 <= noise <= 1:
                raise ValueError(f"label noise {noise} in --noises is invalid; each must be in [0, 1].")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is invalid; choose 'cpu', 'cuda' or 'auto'.")

    def dataset_specs(self) -> list[tuple[str, DataTrainingArguments]]:
        if self.train_file is not None:
            name = os.path.splitext(os.path.basename(self.train_file))[0]
            spec = DataTrainingArguments(
                train_file=self.train_file, validation_file=self.validation_file, test_file=self.test_file
            )
            return [(name, spec)]
        names = [n.strip() for n in self.datasets.split(",") if n.strip()]
        if self.quick:
            names = names[:1]
        return [(name, DataTrainingArguments(dataset_name=name)) for name in names]


# ---- shared helpers -------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
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


def write_json(path: str, machine: dict, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump({"machine": machine, "rows": rows}, handle, indent=1)
    os.replace(tmp, path)  # never leave a half-written file behind
    print(f"wrote {path}", flush=True)


def progress(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Data:
    """A dataset tokenised for a model, with its splits and label count."""

    def __init__(self, spec: DataTrainingArguments, tokenizer, max_length: int, limit: int | None = None) -> None:
        raw = load_raw_datasets(spec, do_predict=spec.test_file is not None)
        if limit is not None:
            raw = {split: part.select(range(min(limit, len(part)))) for split, part in raw.items()}
        info = label_info(raw["train"])
        if info.is_regression:
            raise ValueError("the benchmark measures accuracy; its datasets must be classification, not regression.")
        self.num_labels = info.num_labels
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


def load_model(path: str, num_labels: int, seed: int, device: str):
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model.to(device)


def fixed_batches(dataset, tokenizer, batch_size: int, seq_len: int, count: int, device: str) -> list[dict]:
    """`count` batches of real examples padded to exactly `seq_len` tokens."""
    collate = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=seq_len)
    rows = dataset.shuffle(seed=0).select(range(min(len(dataset), batch_size * count)))
    batches = []
    for start in range(0, batch_size * count, batch_size):
        chunk = [rows[i % len(rows)] for i in range(start, start + batch_size)]
        batches.append({k: v.to(device) for k, v in collate(chunk).items()})
    return batches


def make_trainer(model, strategy: str, keep: float, batch_size: int, device: str, output_dir: str, **extra):
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
    trainer = SelectiveBackpropTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


# ---- 1. overhead ----------------------------------------------------------------------------------


def hook_cost_s(model, trainer, batch: dict, repeats: int = 200) -> float:
    """What the capture hook adds to one forward: the head called with and without it."""
    head = dict(model.named_modules())[trainer._sbp_head_name]
    _, features, _ = trainer._scoring_pass(model, batch)
    capture = HeadCapture([(trainer._sbp_head_name, head)])
    with torch.no_grad():
        timings = {}
        for hooked in (False, True):
            start = time.perf_counter()
            for _ in range(repeats):
                if hooked:
                    with capture.capturing():
                        head(features)
                else:
                    head(features)
            timings[hooked] = (time.perf_counter() - start) / repeats
    return max(0.0, timings[True] - timings[False])


def run_overhead(bench: BenchmarkArguments, data: Data, tokenizer, model_path: str, started: float) -> list[dict]:
    model = load_model(model_path, data.num_labels, 0, bench.device).eval()
    batch_sizes = [16, 32, 64] if bench.quick else [16, 32, 64, 128, 256]
    rows = []
    for batch_size in batch_sizes:
        batches = fixed_batches(data.splits["train"], tokenizer, batch_size, bench.seq_len, 2, bench.device)
        for keep in bench.keep_values if bench.quick else sorted({0.25, 0.5, *bench.keep_values}):
            trainer = make_trainer(model, "gradmatch", keep, batch_size, bench.device, "/tmp/hf_sbp_bench")
            trainer.select_batch(model, batches[0])  # resolve the head, warm up
            hook_s = hook_cost_s(model, trainer, batches[0])
            forward, selection = [], []
            for repeat in range(bench.repeats):
                batch = batches[repeat % 2]
                forward_inputs = {k: v for k, v in batch.items() if k != "labels"}
                sync(bench.device)
                start = time.perf_counter()
                with torch.no_grad():
                    model(**forward_inputs)
                sync(bench.device)
                forward.append(time.perf_counter() - start)
                indices, _ = trainer.select_batch(model, batch)
                start = time.perf_counter()
                index_rows(batch, indices, batch_size)
                sync(bench.device)
                selection.append(trainer._sbp_last.selection_s + time.perf_counter() - start + hook_s)
            row = {
                "batch_size": batch_size,
                "seq_len": bench.seq_len,
                "keep": keep,
                "device": bench.device,
                "forward_s": statistics.median(forward),
                "selection_s": statistics.median(selection),
            }
            rows.append(row)
            progress(
                f"overhead b={batch_size} keep={keep}: forward {row['forward_s'] * 1e3:.1f} ms, selection "
                f"{row['selection_s'] * 1e3:.2f} ms ({100 * row['selection_s'] / row['forward_s']:.2f}%)",
                started,
            )
    return rows


# ---- 2. throughput --------------------------------------------------------------------------------


def _strategy_grid(keeps: list[float]) -> list[tuple[str, float]]:
    return [("none", 1.0)] + [(s, k) for k in keeps for s in SELECTIVE]


def peak_memory_mb(bench: BenchmarkArguments, strategy: str, keep: float) -> float:
    """Peak memory of a few training steps of one strategy, in a fresh process (RSS on CPU)."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "_peak_memory",
        "--model_name_or_path",
        bench.model_name_or_path,
        "--device",
        bench.device,
        "--seq_len",
        str(bench.seq_len),
        "--batch_size",
        str(bench.batch_size),
        "--keeps",
        str(keep),
        "--memory_strategy",
        strategy,
    ]
    if bench.train_file:
        command += ["--train_file", bench.train_file, "--validation_file", bench.validation_file or bench.train_file]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples this process's resident memory every millisecond in a thread; `peak` is the highest seen."""

    def __init__(self) -> None:
        import threading

        self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, resident_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def measure_peak_memory(bench: BenchmarkArguments) -> None:
    """Child process: one warm-up step (which creates the optimizer's state), then the peak memory of
    three more steps above the memory held before them, in MB: the activations and gradients that a
    step of this strategy needs."""
    strategy, keep = bench.memory_strategy, bench.keep_values[0]
    spec = (
        DataTrainingArguments(train_file=bench.train_file, validation_file=bench.validation_file)
        if bench.train_file
        else DataTrainingArguments(dataset_name="tweets")
    )
    model_path = resolve_model_name(bench.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = Data(spec, tokenizer, bench.seq_len, limit=4 * bench.batch_size)
    batches = fixed_batches(data.splits["train"], tokenizer, bench.batch_size, bench.seq_len, 2, bench.device)
    model = load_model(model_path, data.num_labels, 0, bench.device)
    trainer = make_trainer(model, strategy, keep, bench.batch_size, bench.device, "/tmp/hf_sbp_bench")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch) -> None:
        trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    if bench.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for i in range(3):
            step(batches[i % 2])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        base = resident_bytes()
        with RssSampler() as sampler:
            for i in range(3):
                step(batches[i % 2])
        peak = sampler.peak
    print((peak - base) / 2**20)


def run_throughput(bench: BenchmarkArguments, data: Data, tokenizer, model_path: str, started: float) -> list[dict]:
    model = load_model(model_path, data.num_labels, 0, bench.device)
    batches = fixed_batches(data.splits["train"], tokenizer, bench.batch_size, bench.seq_len, 4, bench.device)
    grid = _strategy_grid(bench.keep_values)
    trainers = {
        (strategy, keep): make_trainer(model, strategy, keep, bench.batch_size, bench.device, "/tmp/hf_sbp_bench")
        for strategy, keep in grid
    }
    # SGD with a zero learning rate keeps the model fixed, so every strategy times the same model;
    # the optimizer step's cost is the same for all and small next to forward and backward.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    times: dict[tuple[str, float], list[float]] = defaultdict(list)

    def timed_step(trainer, batch) -> float:
        sync(bench.device)
        start = time.perf_counter()
        trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(bench.device)
        return time.perf_counter() - start

    scoring = trainers[("none", 1.0)]
    for repeat in range(bench.repeats + 1):  # the first round warms up and is dropped
        batch = batches[repeat % len(batches)]
        for key in grid:
            elapsed = timed_step(trainers[key], batch)
            if repeat:
                times[key].append(elapsed)
        sync(bench.device)
        start = time.perf_counter()
        with torch.no_grad():
            model.eval()
            model(**{k: v for k, v in batch.items() if k != "labels"})
            model.train()
        sync(bench.device)
        if repeat:
            times[("scoring_forward", 1.0)].append(time.perf_counter() - start)
        if repeat % 5 == 0:
            progress(f"throughput round {repeat}/{bench.repeats}", started)
    del scoring
    full = statistics.median(times[("none", 1.0)])
    rows = []
    for (strategy, keep), values in times.items():
        row = {
            "strategy": strategy,
            "keep": keep,
            "device": bench.device,
            "step_s": statistics.median(values),
            "full_step_s": full,
            "peak_mem_mb": None,
        }
        if strategy != "scoring_forward":
            row["peak_mem_mb"] = peak_memory_mb(bench, strategy, keep)
        rows.append(row)
    scoring_s = statistics.median(times[("scoring_forward", 1.0)])
    for row in rows:
        row["ratio_to_full"] = row["step_s"] / full
        if row["strategy"] in ("loss", "gradmatch"):
            random_s = statistics.median(times[("random", row["keep"])])
            row["ideal_ratio"] = (1 + 3 * row["keep"]) / 3
            row["floor_s"] = scoring_s + random_s
            row["ratio_to_floor"] = row["step_s"] / row["floor_s"]
        progress(
            f"throughput {row['strategy']}@{row['keep']}: {row['step_s']:.3f} s ({row['ratio_to_full']:.3f} x full)",
            started,
        )
    return rows


# ---- 3. gradient match ----------------------------------------------------------------------------


def flat_grad(model, names: list[str] | None = None) -> torch.Tensor:
    grads = [
        p.grad.reshape(-1) for n, p in model.named_parameters() if p.grad is not None and (names is None or n in names)
    ]
    return torch.cat(grads).double()


def subset_gradient(model, batch: dict, indices: torch.Tensor, weights: torch.Tensor) -> None:
    """Gradient of sum_S w_i l_i / sum_S w_i (the normalised weighted subset loss), into .grad."""
    model.zero_grad(set_to_none=True)
    rows = index_rows(batch, indices, batch["labels"].shape[0])
    labels = rows.pop("labels")
    logits = model(**rows).logits
    w = weights.to(logits.device, torch.float32)
    ((w * F.cross_entropy(logits.float(), labels, reduction="none")).sum() / w.sum()).backward()


def run_grad_match(bench: BenchmarkArguments, data: Data, tokenizer, model_path: str, started: float) -> list[dict]:
    """Along a full-batch training run, the strategies' subset gradients against the batch mean gradient."""
    model = load_model(model_path, data.num_labels, 0, bench.device)
    train = data.splits["train"].shuffle(seed=0)
    steps = bench.train_steps
    checkpoints = sorted({0, steps // 3, 2 * steps // 3, steps})
    probe = fixed_batches(
        data.splits["validation"], tokenizer, bench.batch_size, bench.seq_len, 2 if bench.quick else 4, bench.device
    )
    collate = DataCollatorWithPadding(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=bench.learning_rate)
    head_params = None
    rows = []
    trainers = {
        (s, k): make_trainer(
            model, s, k, bench.batch_size, bench.device, "/tmp/hf_sbp_bench", sbp_diagnostic_scoring=True
        )
        for k in bench.keep_values
        for s in SELECTIVE
    }
    for step in range(steps + 1):
        if step in checkpoints:
            errors = defaultdict(list)
            for batch in probe:
                model.eval()  # compare gradients without dropout noise
                subset_gradient(
                    model, batch, torch.arange(batch["labels"].shape[0]), torch.ones(batch["labels"].shape[0])
                )
                if head_params is None:
                    some = trainers[next(iter(trainers))]
                    some.select_batch(model, batch)
                    head_params = [f"{some._sbp_head_name}.weight", f"{some._sbp_head_name}.bias"]
                full = {"full": flat_grad(model), "last": flat_grad(model, head_params)}
                for (strategy, keep), trainer in trainers.items():
                    indices, weights = trainer.select_batch(model, batch)
                    model.eval()
                    subset_gradient(model, batch, indices, weights)
                    sub = {"full": flat_grad(model), "last": flat_grad(model, head_params)}
                    for layer in ("full", "last"):
                        err = torch.linalg.norm(sub[layer] - full[layer]) / torch.linalg.norm(full[layer])
                        errors[(strategy, keep, layer)].append(float(err))
            for (strategy, keep, layer), values in errors.items():
                rows.append(
                    {
                        "strategy": strategy,
                        "keep": keep,
                        "layer": layer,
                        "step": step,
                        "rel_error": float(np.mean(values)),
                        "rel_error_std": float(np.std(values)),
                        "batches": len(values),
                    }
                )
            summary = ", ".join(
                f"{s}@{k}: {np.mean(errors[(s, k, 'full')]):.3f}" for k in bench.keep_values for s in SELECTIVE
            )
            progress(f"grad-match step {step}/{steps} (full-model rel. error) {summary}", started)
        if step == steps:
            break
        model.train()
        start = (step * bench.batch_size) % max(1, len(train) - bench.batch_size)
        batch = collate([train[i] for i in range(start, start + bench.batch_size)])
        batch = {k: v.to(bench.device) for k, v in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    return rows


# ---- 4. training ----------------------------------------------------------------------------------


class CurveCallback(TrainerCallback):
    """Evaluates every `every` steps and records (training seconds, accuracy), excluding eval time."""

    def __init__(self, trainer_ref: list, every: int) -> None:
        self.trainer_ref, self.every = trainer_ref, every
        self.curve: list[list[float]] = []
        self.train_s = 0.0
        self._resumed = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._resumed = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.train_s += time.perf_counter() - self._resumed
            metrics = self.trainer_ref[0].evaluate(metric_key_prefix="curve")
            self.curve.append([self.train_s, metrics["curve_accuracy"], self.trainer_ref[0].sbp_backprop_examples])
            self._resumed = time.perf_counter()


def accuracy(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def run_training(bench: BenchmarkArguments, tokenizer, model_path: str, started: float) -> list[dict]:
    rows = []
    runs = [
        (name, spec, strategy, keep, noise, seed)
        for name, spec in bench.dataset_specs()
        for noise in bench.noise_values
        for seed in bench.seed_values
        for strategy, keep in _strategy_grid(bench.training_keep_values)
    ]
    data_cache: dict[str, Data] = {}
    for number, (name, spec, strategy, keep, noise, seed) in enumerate(runs, 1):
        if name not in data_cache:
            data_cache[name] = Data(spec, tokenizer, bench.seq_len)
        data = data_cache[name]
        train = (
            data.splits["train"]
            .shuffle(seed=seed)
            .select(range(min(len(data.splits["train"]), bench.train_steps * bench.batch_size)))
        )
        train, flipped = apply_label_noise(train, noise, data.num_labels, seed, label_column="labels")
        validation = data.splits["validation"].select(range(min(len(data.splits["validation"]), bench.eval_samples)))
        test = data.splits[data.test_split].select(range(min(len(data.splits[data.test_split]), bench.test_samples)))
        model = load_model(model_path, data.num_labels, seed, bench.device)
        args = SelectiveBackpropConfig(
            output_dir="/tmp/hf_sbp_bench",
            sbp_strategy=strategy,
            sbp_keep=keep,
            seed=seed,
            sbp_seed=seed,
            per_device_train_batch_size=bench.batch_size,
            per_device_eval_batch_size=128,
            learning_rate=bench.learning_rate,
            max_steps=bench.train_steps,
            warmup_steps=bench.train_steps // 10,
            logging_steps=bench.eval_every,
            save_strategy="no",
            report_to="none",
            use_cpu=bench.device == "cpu",
            disable_tqdm=True,
        )
        ref: list = []
        curve = CurveCallback(ref, bench.eval_every)
        trainer = SelectiveBackpropTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=validation,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy,
            callbacks=[curve],
        )
        trainer.remove_callback(PrinterCallback)
        ref.append(trainer)
        trainer.train()
        test_accuracy = trainer.evaluate(test, metric_key_prefix="test")["test_accuracy"]
        rows.append(
            {
                "dataset": name,
                "strategy": strategy,
                "keep": keep,
                "label_noise": noise,
                "seed": seed,
                "test_accuracy": test_accuracy,
                "train_time_s": curve.train_s,
                "backprop_examples": trainer.sbp_backprop_examples,
                "curve": [[t, a] for t, a, _ in curve.curve],
                "curve_backprop_examples": [e for _, _, e in curve.curve],
                "flipped_labels": flipped,
                "steps": bench.train_steps,
                "batch_size": bench.batch_size,
            }
        )
        progress(
            f"training {number}/{len(runs)} {name} noise={noise} seed={seed} {strategy}@{keep}: "
            f"test acc {test_accuracy:.4f}, {curve.train_s:.1f} s",
            started,
        )
    return rows


# ---- report ---------------------------------------------------------------------------------------


def load_rows(output_dir: str, name: str) -> tuple[dict, list[dict]]:
    path = os.path.join(output_dir, f"{name}.json")
    if not os.path.isfile(path):
        return {}, []
    with open(path) as handle:
        payload = json.load(handle)
    return payload["machine"], payload["rows"]


def accuracy_at(curve: list[list[float]], budget_s: float) -> float:
    """Validation accuracy of the last evaluation within `budget_s` seconds of training (nan if none)."""
    within = [acc for t, acc in curve if t <= budget_s + 1e-9]
    return within[-1] if within else math.nan


def equal_budget_table(rows: list[dict]) -> list[dict]:
    """Per dataset, noise and keep: accuracy at the wall-clock budget of the fastest run (random), per strategy."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["label_noise"])].append(row)
    table = []
    for (dataset, noise), group in sorted(groups.items()):
        keeps = sorted({r["keep"] for r in group if r["strategy"] != "none"})
        for keep in keeps:
            members = [r for r in group if r["keep"] == keep or r["strategy"] == "none"]
            budgets = [r["train_time_s"] for r in members if r["strategy"] == "random"]
            if not budgets:
                continue
            budget = float(np.median(budgets))
            for strategy in ("none", "random", "loss", "gradmatch"):
                values = [accuracy_at(r["curve"], budget) for r in members if r["strategy"] == strategy]
                values = [v for v in values if not math.isnan(v)]
                table.append(
                    {
                        "dataset": dataset,
                        "label_noise": noise,
                        "keep": keep,
                        "budget_s": budget,
                        "strategy": strategy,
                        "mean": float(np.mean(values)) if values else math.nan,
                        "std": float(np.std(values)) if values else math.nan,
                        "runs": len(values),
                    }
                )
    return table


def plot_training(rows: list[dict], output_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"none": "black", "random": "tab:blue", "loss": "tab:orange", "gradmatch": "tab:green"}
    styles = {0.5: "-", 0.25: "--", 1.0: "-"}
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
                label = strategy if strategy == "none" else f"{strategy} keep {keep}"
                ax.plot(xs, ys.mean(0), styles.get(keep, ":"), color=colors[strategy], label=label, marker="o", ms=3)
                ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=colors[strategy], alpha=0.1)
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


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(output_dir: str) -> str:
    """docs/benchmarks/README.md: the hand-written summary (summary.md) followed by tables from the JSON."""
    sections = []
    summary_path = os.path.join(output_dir, "summary.md")
    if os.path.isfile(summary_path):
        with open(summary_path) as handle:
            sections.append(handle.read().strip())
    else:
        sections.append("# Benchmarks")
    machines = {}

    machine, rows = load_rows(output_dir, "overhead")
    if rows:
        machines["overhead"] = machine
        sections.append(
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
            )
        )
    machine, rows = load_rows(output_dir, "throughput")
    if rows:
        machines["throughput"] = machine
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
        sections.append(
            "## Step time and memory (`throughput.json`)\n\nMedian step times, all strategies interleaved in "
            "one process; `floor` = scoring forward + random-subset step at the same keep (the best this design "
            "can do); peak memory is the highest memory during three training steps above what the process held "
            "before them (model, optimizer state, data), in a fresh process per strategy (sampled RSS on CPU, "
            "allocator peak on GPU).\n\n"
            + markdown_table(
                ["strategy", "keep", "device", "step s", "vs full", "ideal vs full", "vs floor", "peak MB"], table
            )
        )
    machine, rows = load_rows(output_dir, "grad_match")
    if rows:
        machines["grad_match"] = machine
        steps = sorted({r["step"] for r in rows})
        table = []
        for layer in ("last", "full"):
            for keep in sorted({r["keep"] for r in rows}, reverse=True):
                for strategy in SELECTIVE:
                    vals = {
                        r["step"]: r["rel_error"]
                        for r in rows
                        if r["layer"] == layer and r["keep"] == keep and r["strategy"] == strategy
                    }
                    table.append([layer, keep, strategy] + [f"{vals[s]:.3f}" if s in vals else "-" for s in steps])
        sections.append(
            "## Gradient match (`grad_match.json`)\n\nRelative error of each strategy's weighted subset "
            "gradient against the full-batch mean gradient, from autograd, on held-out batches at several "
            "steps of a full-batch run (columns: step).\n\n"
            + markdown_table(["layer", "keep", "strategy"] + [str(s) for s in steps], table)
        )
    machine, rows = load_rows(output_dir, "training")
    if rows:
        machines["training"] = machine
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
        budget = equal_budget_table(rows)
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
            for b in budget
        ]
        plots = plot_training(rows, output_dir)
        sections.append(
            "## Training (`training.json`)\n\nTest accuracy after the same number of steps (mean ± std over "
            "seeds), training time excluding evaluation, and examples backpropagated.\n\n"
            + markdown_table(
                ["dataset", "noise", "strategy", "keep", "test acc", "train s", "backprop ex", "runs"], table
            )
            + "\n\n### Accuracy at an equal wall-clock budget\n\nValidation accuracy of each strategy at the "
            "training time the random subset needed for the full run (its median over seeds), mean ± std "
            "over seeds.\n\n"
            + markdown_table(["dataset", "noise", "keep", "budget s", "strategy", "val acc", "runs"], budget_rows)
            + "\n\n"
            + "\n".join(f"![{p}]({p})" for p in plots)
        )
    if machines:
        sections.append("## Machines\n\n" + "\n".join(f"- `{name}`: {json.dumps(m)}" for name, m in machines.items()))
    text = "\n\n".join(sections) + "\n"
    path = os.path.join(output_dir, "README.md")
    with open(path, "w") as handle:
        handle.write(text)
    print(f"wrote {path}", flush=True)
    return path


# ---- entry point ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # the command is positional: `benchmark.py overhead --quick`
        argv = ["--command", argv[0], *argv[1:]]
    (bench,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if bench.command == "_peak_memory":
        measure_peak_memory(bench)
        return
    if bench.command == "report":
        write_report(bench.output_dir)
        return
    started = time.perf_counter()
    model_path = resolve_model_name(bench.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    machine = machine_info(bench.device)
    parts = PARTS if bench.command == "all" else (bench.command,)
    specs = bench.dataset_specs()
    timing_data = Data(specs[0][1], tokenizer, bench.seq_len) if set(parts) - {"training"} else None
    for part in parts:
        progress(f"{part} ...", started)
        if part == "overhead":
            rows = run_overhead(bench, timing_data, tokenizer, model_path, started)
        elif part == "throughput":
            rows = run_throughput(bench, timing_data, tokenizer, model_path, started)
        elif part == "grad-match":
            rows = run_grad_match(bench, timing_data, tokenizer, model_path, started)
        else:
            rows = run_training(bench, tokenizer, model_path, started)
        write_json(os.path.join(bench.output_dir, f"{part.replace('-', '_')}.json"), machine, rows)
    write_report(bench.output_dir)
    progress("done", started)


if __name__ == "__main__":
    main()
