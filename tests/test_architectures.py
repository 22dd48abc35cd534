"""The head is found, and its gradients' Gram matrix is right, on every supported architecture.

The reference is independent of the trainer's hook and pooling: per-example autograd gradients of
the expected head module, each example run alone and unpadded.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from tiny_models import tiny_dataset

from hf_sbp import SelectiveBackpropConfig, SelectiveBackpropTrainer
from hf_sbp.core.selection import head_residuals, last_layer_gram

COMMON = dict(vocab_size=100, num_labels=3, pad_token_id=0)
ENCODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

ARCHITECTURES = {
    "bert": (tf.BertForSequenceClassification, tf.BertConfig(**COMMON, **ENCODER), "classifier"),
    "roberta": (
        tf.RobertaForSequenceClassification,
        tf.RobertaConfig(**{**COMMON, "pad_token_id": 1}, **ENCODER, max_position_embeddings=40),
        "classifier.out_proj",
    ),
    "distilbert": (
        tf.DistilBertForSequenceClassification,
        tf.DistilBertConfig(
            **COMMON,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=37,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
        ),
        "classifier",
    ),
    "deberta-v2": (
        tf.DebertaV2ForSequenceClassification,
        tf.DebertaV2Config(**COMMON, **ENCODER, pooler_hidden_size=32, pooler_dropout=0.0),
        "classifier",
    ),
    "electra": (
        tf.ElectraForSequenceClassification,
        tf.ElectraConfig(**COMMON, **ENCODER, embedding_size=16),
        "classifier.out_proj",
    ),
    "modernbert": (
        tf.ModernBertForSequenceClassification,
        tf.ModernBertConfig(
            **COMMON,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            embedding_dropout=0.0,
            mlp_dropout=0.0,
            attention_dropout=0.0,
            classifier_dropout=0.0,
        ),
        "classifier",
    ),
    "gpt2": (
        tf.GPT2ForSequenceClassification,
        tf.GPT2Config(**COMMON, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "score",
    ),
    "llama": (
        tf.LlamaForSequenceClassification,
        tf.LlamaConfig(
            **COMMON,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        "score",
    ),
}


def batch_for(pad_token_id: int, n: int = 6, seq_len: int = 9) -> dict:
    """Right-padded rows of different lengths; real tokens avoid the pad id."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (n, seq_len), generator=gen)
    lengths = torch.tensor([9, 4, 7, 3, 9, 5])[:n]
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token_id))
    labels = torch.randint(0, 3, (n,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_gram(model, head: torch.nn.Linear, batch: dict) -> torch.Tensor:
    rows = []
    for i in range(batch["labels"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        model.zero_grad()
        row = slice(i, i + 1)
        out = model(input_ids=batch["input_ids"][row, :length], attention_mask=batch["attention_mask"][row, :length])
        F.cross_entropy(out.logits, batch["labels"][i : i + 1], reduction="sum").backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in head.parameters()]))
    per_example = torch.stack(rows).double()
    return per_example @ per_example.T


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_head_features_give_the_autograd_gram_and_training_runs(tmp_path, name):
    model_cls, config, head_name = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = model_cls(config)
    args = SelectiveBackpropConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    data = tiny_dataset(n=16, seq_len=9)
    if config.pad_token_id != 0:  # rows are padded with 0 in tiny_dataset; use the model's pad id
        pad = config.pad_token_id

        def repad(row):
            return {
                "input_ids": [t if m else pad for t, m in zip(row["input_ids"], row["attention_mask"], strict=True)]
            }

        data = data.map(repad)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data)

    batch = batch_for(config.pad_token_id)
    logits, features, has_bias = trainer.score_batch(model, batch)
    assert trainer.head_name == head_name
    head = dict(model.named_modules())[head_name]
    assert has_bias == (head.bias is not None)
    gram = last_layer_gram(head_residuals(logits, batch["labels"], "single_label_classification"), features, has_bias)
    model.eval()
    expected = reference_gram(model, head, batch)
    torch.testing.assert_close(gram.double(), expected, rtol=2e-3, atol=1e-5)

    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "sbp/grad_match_error" in entry]
    assert len(logged) == 2 and all(0 <= entry["sbp/grad_match_error"] < 2 for entry in logged)
