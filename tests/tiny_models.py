"""Tiny randomly initialised models and datasets shared by the trainer tests."""

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_sbp import SelectiveBackpropConfig


def tiny_bert_config(num_labels: int = 3, **overrides) -> BertConfig:
    values = dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )  # fmt: skip
    values.update(overrides)
    return BertConfig(**values)


def tiny_bert(num_labels: int = 3, seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels, **overrides))


def tiny_dataset(n: int = 48, seq_len: int = 10, num_labels: int = 3, seed: int = 0, labels=None) -> Dataset:
    """Random token sequences of varied length (right-padded with 0) and random labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, seq_len), generator=gen)
    lengths = torch.randint(3, seq_len + 1, (n,), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    if labels is None:
        labels = torch.randint(0, num_labels, (n,), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels})


def collated(dataset: Dataset, rows) -> dict:
    """A batch of `rows` of `dataset` as the default collator would build it."""
    part = dataset.select(list(rows))
    return {key: torch.tensor(part[key]) for key in part.column_names}


def make_args(tmp_path, **overrides) -> SelectiveBackpropConfig:
    """Arguments of a short CPU run into ``tmp_path / "out"`` (3 steps of 8, logging every step, saving nothing)."""
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return SelectiveBackpropConfig(**values)
