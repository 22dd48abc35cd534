"""Shared helpers of the run_glue, model card and push_to_hub tests: a tiny BERT and tokenizer saved to a folder,
small CSV data sets with a learnable signal, and running scripts/run_glue.py in this process."""

from __future__ import annotations

import csv
import importlib.util
import os
import random

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_GLUE = os.path.join(REPO, "scripts", "run_glue.py")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "film", "was", "is", "a", "plot", "very"]
POSITIVE, NEGATIVE = WORDS[:3], WORDS[3:6]
FILLER = WORDS[6:]


def save_tiny_model(folder: str, seed: int = 0) -> str:
    """A tiny BERT encoder (no classification head, like the bundled checkpoint) and a WordPiece tokenizer over a
    small vocabulary, saved with ``save_pretrained`` into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(
        vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True, model_max_length=64
    )
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


def _sentence(rng: random.Random, label_words: list[str]) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))] + [rng.choice(label_words)]
    rng.shuffle(words)
    return " ".join(words)


def write_rows(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def single_sentence_rows(n: int, seed: int, labels=("negative", "positive")) -> list[dict]:
    """``text``, ``label`` rows: a positive or negative word among filler words decides a string label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randrange(2)
        rows.append({"text": _sentence(rng, POSITIVE if y else NEGATIVE), "label": labels[y]})
    return rows


def pair_rows(n: int, seed: int, num_classes: int = 3) -> list[dict]:
    """``sentence1``, ``sentence2``, ``label`` rows with ``label`` an integer class id in [0, num_classes)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randrange(num_classes)
        first = _sentence(rng, POSITIVE if y else NEGATIVE)
        second = _sentence(rng, POSITIVE if y == 2 else NEGATIVE)
        rows.append({"sentence1": first, "sentence2": second, "label": y})
    return rows


def regression_rows(n: int, seed: int) -> list[dict]:
    """``sentence1``, ``sentence2``, float ``label`` rows (STS-B style scores in [0, 5])."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        score = round(rng.uniform(0, 5), 2)
        words = POSITIVE if score > 2.5 else NEGATIVE
        rows.append({"sentence1": _sentence(rng, words), "sentence2": _sentence(rng, words), "label": score})
    return rows


def load_run_glue():
    """scripts/run_glue.py as a module (its ``main(argv)`` returns the saved metrics)."""
    spec = importlib.util.spec_from_file_location("run_glue_script", RUN_GLUE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_training_flags(output_dir: str) -> list[str]:
    """Flags for a few quick CPU steps."""
    return [
        "--output_dir", output_dir,
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "32",
        "--learning_rate", "5e-3",
        "--max_seq_length", "16",
        "--logging_steps", "2",
        "--save_strategy", "no",
        "--report_to", "none",
        "--seed", "7",
        "--use_cpu",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
