"""Length-aware re-padding of the subset (``sbp_trim_padding``) and the shortened scoring pass
(``sbp_scoring_max_length``): :mod:`hf_sbp.core.padding`, against untrimmed forwards, autograd and the tokenizer."""

import random

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from glue_fixtures import FILLER, NEGATIVE, POSITIVE, save_tiny_model
from tiny_models import make_args, tiny_bert, tiny_dataset
from transformers import BertForSequenceClassification, DataCollatorWithPadding, PreTrainedTokenizerFast

from hf_sbp import SelectiveBackpropTrainer
from hf_sbp.core.padding import token_span, trim_padding, truncate_for_scoring

ATOL = 1e-5


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def right_padded_batch() -> dict:
    """Six right-padded rows of lengths 2..7 in 10 columns, token types and sequence labels."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 2, 5, 3, 6, 4])
    mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 100, (6, 10), generator=gen) * mask
    types = (torch.arange(10)[None, :] >= 2).long() * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": torch.tensor([0, 1, 2] * 2)}


def tiny_gpt2(seed: int = 0) -> tf.GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        vocab_size=100, num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return tf.GPT2ForSequenceClassification(config).eval()


def left_padded_batch(position_ids: bool) -> dict:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 5, 2, 4])
    mask = (torch.arange(8)[None, :] >= 8 - lengths[:, None]).long()
    batch = {"input_ids": torch.randint(2, 100, (4, 8), generator=gen) * mask, "attention_mask": mask}
    if position_ids:  # as generation builds them: numbered from each row's first real token
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return batch


# ---- trim_padding -----------------------------------------------------------------------------------


def test_right_padding_is_trimmed_and_every_rows_logits_are_kept():
    model, batch = tiny_bert(), right_padded_batch()
    subset = {k: v[[1, 3, 5]] for k, v in batch.items()}  # lengths 2, 3, 4
    trimmed = trim_padding(subset)
    assert trimmed["input_ids"].shape == (3, 4) and trimmed["token_type_ids"].shape == (3, 4)
    assert torch.equal(trimmed["labels"], subset["labels"])
    assert torch.allclose(logits(model, trimmed), logits(model, subset), atol=ATOL)
    assert token_span(subset["attention_mask"]) == (0, 4)


def test_trimmed_subset_trains_the_gradient_of_the_untrimmed_one():
    batch = right_padded_batch()
    subset = {k: v[[1, 3, 5, 2]] for k, v in batch.items()}
    weights = torch.tensor([1.5, 0.5, 1.0, 1.0])
    grads = []
    for rows in (subset, trim_padding(subset)):
        model = tiny_bert()
        out = model(**{k: v for k, v in rows.items() if k != "labels"}).logits
        loss = (weights * F.cross_entropy(out, rows["labels"], reduction="none")).sum() / weights.sum()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, grad in grads[0][1].items():
        assert torch.allclose(grad, grads[1][1][name], atol=1e-6), name


def test_left_padding_is_kept_unless_position_ids_are_given():
    model = tiny_gpt2()
    batch = left_padded_batch(position_ids=False)
    # Removing the leading padding renumbers every token (GPT-2 counts positions from the first column).
    naive = {k: v[:, 3:] for k, v in batch.items()}
    assert not torch.allclose(logits(model, naive), logits(model, batch), atol=1e-3)
    assert trim_padding(batch) is batch
    with_positions = left_padded_batch(position_ids=True)
    trimmed = trim_padding(with_positions)
    assert trimmed["input_ids"].shape == (4, 5) and trimmed["position_ids"].shape == (4, 5)
    assert torch.allclose(logits(model, trimmed), logits(model, with_positions), atol=ATOL)


def test_token_level_labels_are_trimmed_only_where_they_are_ignored():
    batch = right_padded_batch()
    subset = {k: v[[1, 3]] for k, v in batch.items()}  # lengths 2 and 3
    subset["labels"] = torch.where(subset["attention_mask"].bool(), 1, -100)
    assert trim_padding(subset)["labels"].shape == (2, 3)
    subset["labels"][0, 8] = 2  # a counted label in a padding column: the column is not padding
    assert trim_padding(subset) is subset
    subset["labels"] = torch.rand(2, 10)  # (n, C) targets with C == columns: ambiguous, left alone
    assert trim_padding(subset) is subset


def test_batches_that_are_not_trimmed_are_returned_as_they_are():
    batch = right_padded_batch()
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    assert trim_padding(no_mask) is no_mask
    full = {k: v[[0]] for k, v in batch.items()}
    full = {**full, "attention_mask": torch.ones_like(full["attention_mask"])}
    assert trim_padding(full) is full
    empty_row = {k: v.clone() for k, v in batch.items()}
    empty_row["attention_mask"][2] = 0  # a row of only padding: its output depends on the column count
    assert trim_padding(empty_row) is empty_row
    ragged = {**batch, "words": [["a"]] * 6}
    assert trim_padding(ragged) is ragged
    other_rows = {**batch, "extra": torch.zeros(2, 10)}
    assert trim_padding(other_rows) is other_rows
    with pytest.raises(ValueError, match="pad_to_multiple_of=0"):
        trim_padding(batch, pad_to_multiple_of=0)


def test_pad_token_id_keeps_masked_columns_that_hold_tokens():
    batch = {k: v[[1, 3]] for k, v in right_padded_batch().items()}  # lengths 2 and 3
    batch["input_ids"][0, 5] = 7  # masked, but not the pad token: a decoder classifier would pool it
    assert trim_padding(batch)["input_ids"].shape[1] == 3
    assert trim_padding(batch, pad_token_id=0)["input_ids"].shape[1] == 6


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    folder = save_tiny_model(str(tmp_path_factory.mktemp("tiny_bert")))
    return tf.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenized_model(tokenizer) -> BertForSequenceClassification:
    folder = tokenizer.name_or_path
    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 14))] + [rng.choice(POSITIVE + NEGATIVE)]
        out.append(" ".join(words))
    return out


@pytest.mark.parametrize("multiple", [None, 8])
def test_dynamic_padding_and_pad_to_multiple_of(tokenizer, tokenized_model, multiple):
    texts = sentences(16)
    features = [{**tokenizer(t), "labels": i % 2} for i, t in enumerate(texts)]
    batch = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)(features)
    lengths = batch["attention_mask"].sum(1)
    rows = lengths.argsort()[:8]  # the shortest half
    subset = {k: v[rows] for k, v in batch.items()}
    trimmed = trim_padding(subset, pad_to_multiple_of=multiple)
    longest = int(lengths[rows].max())
    expected = longest if multiple is None else -(-longest // multiple) * multiple
    assert trimmed["input_ids"].shape[1] == expected < batch["input_ids"].shape[1]
    assert torch.allclose(logits(tokenized_model, trimmed), logits(tokenized_model, subset), atol=ATOL)


# ---- the trainer ------------------------------------------------------------------------------------


def record_widths(module: torch.nn.Module) -> list[tuple[int, int, bool]]:
    """(rows, columns, grad enabled) of every forward call of ``module``."""
    calls = []

    def hook(mod, args, kwargs, output):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        calls.append((*input_ids.shape, torch.is_grad_enabled()))

    module.register_forward_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("strategy", ["random", "gradmatch"])
def test_trimming_in_the_trainer_trains_the_same_model(tmp_path, strategy):
    data = tiny_dataset(n=32, seq_len=12)
    results = {}
    for trim in (False, True):
        model = tiny_bert()
        args = make_args(tmp_path, sbp_strategy=strategy, sbp_trim_padding=trim, max_steps=4)
        trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data)
        calls = record_widths(model.bert)
        trainer.train()
        results[trim] = ({n: p.detach().clone() for n, p in model.named_parameters()}, calls)
    (untrimmed, calls_off), (trimmed, calls_on) = results[False], results[True]
    for name, value in untrimmed.items():
        assert torch.allclose(value, trimmed[name], atol=1e-5), name
    backward_off = [c for c in calls_off if c[2]]
    backward_on = [c for c in calls_on if c[2]]
    assert len(backward_off) == len(backward_on) == 4  # one gradient pass per step
    assert all(c[1] == 12 for c in backward_off)
    assert all(on[1] <= 12 for on in backward_on) and any(on[1] < 12 for on in backward_on)
    assert all(c[1] == 12 for c in calls_on if not c[2])  # the scoring pass sees the whole batch


def test_the_whole_batch_is_not_trimmed(tmp_path):
    model = tiny_bert()
    args = make_args(tmp_path, sbp_strategy="random", sbp_keep=1.0, max_steps=2)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=tiny_dataset(n=16, seq_len=12))
    calls = record_widths(model.bert)
    trainer.train()
    assert [c[1] for c in calls] == [12, 12]


def test_the_trainer_keeps_the_collators_multiple(tmp_path, tokenizer):
    model = BertForSequenceClassification.from_pretrained(tokenizer.name_or_path, num_labels=2)
    data = [{**tokenizer(t), "labels": i % 2} for i, t in enumerate(sentences(32, seed=3))]
    args = make_args(tmp_path, sbp_strategy="random", max_steps=4)
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    calls = record_widths(model.bert)
    trainer.train()
    assert calls and all(c[1] % 8 == 0 for c in calls)


# ---- truncate_for_scoring ---------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_equals_tokenizing_with_max_length(tokenizer, tokenized_model, side, monkeypatch):
    monkeypatch.setattr(tokenizer, "padding_side", side)
    texts, length = sentences(12, seed=1), 6
    collate = DataCollatorWithPadding(tokenizer)
    full = collate([tokenizer(t) for t in texts])
    short = collate([tokenizer(t, truncation=True, max_length=length) for t in texts])
    assert full["input_ids"].shape[1] > length
    cut = truncate_for_scoring(full, length)
    assert cut.keys() == short.keys()
    for key in short:
        assert torch.equal(cut[key], short[key]), key
    assert torch.allclose(logits(tokenized_model, cut), logits(tokenized_model, short), atol=ATOL)


def test_scoring_max_length_in_the_trainer_scores_the_truncated_rows(tmp_path, tokenizer, tokenized_model):
    texts = sentences(8, seed=2)
    labels = torch.tensor([i % 2 for i in range(8)])
    collate = DataCollatorWithPadding(tokenizer)
    full = {**collate([tokenizer(t) for t in texts]), "labels": labels}
    short = {**collate([tokenizer(t, truncation=True, max_length=5) for t in texts]), "labels": labels}
    scores = {}
    for name, limit, batch in (("truncated", 5, full), ("tokenized", None, short), ("whole", None, full)):
        args = make_args(tmp_path, sbp_scoring_max_length=limit)
        trainer = SelectiveBackpropTrainer(model=tokenized_model, args=args, train_dataset=None)
        scores[name] = trainer.score_batch(tokenized_model, batch)
    for field in ("logits", "features"):
        truncated, tokenized = getattr(scores["truncated"], field), getattr(scores["tokenized"], field)
        assert torch.allclose(truncated, tokenized, atol=ATOL)
        assert not torch.allclose(truncated, getattr(scores["whole"], field), atol=ATOL)


def test_a_decoder_pools_the_last_kept_token(tmp_path):
    model = tiny_gpt2()
    batch = {**right_padded_batch(), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    del batch["token_type_ids"]  # the rows end with different tokens: the first 4 are kept as they are
    args = make_args(tmp_path, sbp_scoring_max_length=4)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=None)
    scores = trainer.score_batch(model, batch)  # the head check: its pooled output must be the logits
    first = {k: v[:, :4] for k, v in batch.items() if k != "labels"}
    assert torch.allclose(scores.logits, logits(model, first), atol=ATOL)


def test_truncation_during_training_feeds_the_scoring_pass_the_first_tokens(tmp_path):
    model = tiny_bert()
    args = make_args(tmp_path, sbp_strategy="gradmatch", sbp_scoring_max_length=4, sbp_trim_padding=False, max_steps=2)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=tiny_dataset(n=16, seq_len=12))
    calls = record_widths(model.bert)
    trainer.train()
    assert [(c[0], c[1]) for c in calls if not c[2]] == [(8, 4), (8, 4)]
    assert [(c[0], c[1]) for c in calls if c[2]] == [(4, 12), (4, 12)]  # the gradient pass sees every token


def test_truncation_edge_cases():
    batch = right_padded_batch()
    assert truncate_for_scoring(batch, 10) is batch and truncate_for_scoring(batch, 50) is batch
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match=f"max_length={bad!r}"):
            truncate_for_scoring(batch, bad)
    no_mask = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    cut = truncate_for_scoring(no_mask, 3)
    assert torch.equal(cut["input_ids"], batch["input_ids"][:, :3]) and cut["labels"] is batch["labels"]
    one = {k: v[[0]] for k, v in batch.items()}  # a single row: its last token is kept at the end
    cut = truncate_for_scoring(one, 3)
    assert cut["input_ids"][0].tolist() == [*one["input_ids"][0, :2].tolist(), int(one["input_ids"][0, 6])]
    assert torch.equal(truncate_for_scoring(one, 3, keep_last_token=False)["input_ids"], one["input_ids"][:, :3])
    holes = {**batch, "attention_mask": batch["attention_mask"].clone()}
    holes["attention_mask"][0, 1] = 0
    with pytest.raises(ValueError, match="padding between tokens"):
        truncate_for_scoring(holes, 3)
    empty = {k: v.clone() for k, v in batch.items()}
    empty["attention_mask"][1] = 0  # a row of only padding stays one
    empty["input_ids"][1] = 0
    cut = truncate_for_scoring(empty, 3)
    assert cut["attention_mask"][1].tolist() == [0, 0, 0] and cut["input_ids"].shape == (6, 3)


def test_left_padded_truncation_keeps_positions_and_pools_the_last_kept_token():
    model = tiny_gpt2()
    batch = left_padded_batch(position_ids=True)  # lengths 3, 5, 2, 4
    cut = truncate_for_scoring(batch, 3, keep_last_token=False)
    assert cut["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]]
    assert cut["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 0, 1], [0, 1, 2]]
    for row, length in enumerate([3, 5, 2, 4]):  # each row alone, its first 3 tokens unpadded
        kept = min(3, length)
        alone = {k: v[row : row + 1, 8 - length : 8 - length + kept] for k, v in batch.items()}
        assert torch.allclose(logits(model, {k: v[row : row + 1] for k, v in cut.items()}), logits(model, alone))
