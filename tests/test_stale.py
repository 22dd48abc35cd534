"""Example identity, the per-example statistics cache, and the stale-* strategies.

References: the rows' own contents (each row's tokens encode its index), a forward pass and autograd on the model
(with the learning rate at 0 every forward sees the same model, so the cache must hold exactly what a direct
forward computes), and ``gradmatch``'s own choice on freshly scored batches.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny_models import tiny_bert
from transformers import BertTokenizerFast, DataCollatorWithPadding, TrainerCallback, default_data_collator

from hf_sbp import SelectionBatch, SelectionStrategy, SelectiveBackpropConfig, SelectiveBackpropTrainer
from hf_sbp.core.selection import last_layer_gram
from hf_sbp.example_cache import EXAMPLE_ID_KEY, ExampleStatsCache, with_example_ids
from hf_sbp.strategies import register_strategy

N, BATCH, LABELS = 40, 8, 3


def indexed_rows(n: int = N, ragged: bool = True) -> list[dict]:
    """Row ``i`` starts with token ``i + 1`` and has label ``i % 3``: a batch's contents give its rows' indices."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        length = int(torch.randint(2, 9, (1,), generator=generator)) if ragged else 8
        tokens = [i + 1] + torch.randint(50, 100, (length - 1,), generator=generator).tolist()
        rows.append({"input_ids": tokens, "attention_mask": [1] * length, "labels": i % LABELS})
    return rows


@register_strategy("test-record-ids")
class RecordIds(SelectionStrategy):
    """A random half, recording what the trainer says each row is."""

    uses_example_cache = True
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def select(self, batch: SelectionBatch, k: int):
        return torch.randperm(batch.n, generator=batch.generator)[:k].sort().values, torch.ones(k)

    def observe(self, indices: torch.Tensor, subset: SelectionBatch) -> None:
        RecordIds.seen.append((subset.example_ids, subset.labels.cpu(), subset.features.detach()))


def train(strategy, dataset, tmp_path, collator=None, epochs=1, lr=1e-3, model=None, callbacks=None, **options):
    args = SelectiveBackpropConfig(
        output_dir=str(tmp_path / strategy),
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        learning_rate=lr,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=5,
        sbp_strategy=strategy,
        **options,
    )
    trainer = SelectiveBackpropTrainer(
        model=model or tiny_bert(LABELS), args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks
    )
    trainer.train()
    return trainer


class MapStyle(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {key: torch.tensor(value) for key, value in self.rows[i].items()}


def pad_collator(features):
    """A custom collator that pads and passes every other key through."""
    length = max(len(f["input_ids"]) for f in features)
    out = {
        "input_ids": torch.tensor([list(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features]),
        "attention_mask": torch.tensor(
            [[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features]
        ),  # fmt: skip
    }
    for key in features[0]:
        if key not in out:
            out[key] = torch.tensor([int(f[key]) for f in features])
    return out


def hf_tokenizer(tmp_path) -> BertTokenizerFast:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]))
    return BertTokenizerFast(vocab_file=str(vocab))


@pytest.mark.parametrize("setup", ["with_padding", "default", "custom", "map_style", "accumulation"])
def test_every_row_carries_its_dataset_index(tmp_path, setup):
    rows = indexed_rows(ragged=setup != "default")
    dataset, collator, options = Dataset.from_list(rows), None, {}
    if setup == "with_padding":
        collator = DataCollatorWithPadding(hf_tokenizer(tmp_path))
    elif setup == "default":
        collator = default_data_collator
    elif setup == "custom":
        collator = pad_collator
    elif setup == "map_style":
        dataset, collator = MapStyle(rows), pad_collator
    elif setup == "accumulation":
        options = {"gradient_accumulation_steps": 2}
        collator = pad_collator
    RecordIds.seen = []
    # The model would reject an unknown keyword: training at all shows the ids were stripped before the forward.
    train("test-record-ids", dataset, tmp_path, collator, epochs=2, **options)
    assert len(RecordIds.seen) == 2 * N // BATCH
    epoch_ids = [torch.cat([ids for ids, _, _ in RecordIds.seen[e * 5 : (e + 1) * 5]]) for e in range(2)]
    for ids, labels, _ in RecordIds.seen:
        assert torch.equal(labels, ids % LABELS)
    for ids in epoch_ids:  # a random half of each batch: distinct rows, drawn from the whole set
        assert ids.unique().numel() == ids.numel() == N // 2


def test_ids_match_the_rows_the_model_saw(tmp_path):
    """With the learning rate at 0 the head input is a function of the row alone, so equal ids mean equal rows."""
    RecordIds.seen = []
    train("test-record-ids", Dataset.from_list(indexed_rows()), tmp_path, pad_collator, epochs=3, lr=0.0)
    features = {}
    for ids, _, feats in RecordIds.seen:
        for i, f in zip(ids.tolist(), feats, strict=True):
            if i in features:
                torch.testing.assert_close(f, features[i], rtol=1e-4, atol=1e-5)
            features[i] = f
    assert len(features) > N // 2
    # ... and rows with different ids have different features (the first token differs).
    values = torch.stack(list(features.values()))
    assert torch.cdist(values, values).fill_diagonal_(1.0).min() > 1e-4


def test_iterable_training_set_is_refused_when_built(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ({k: torch.tensor(v) for k, v in row.items()} for row in indexed_rows(ragged=False))

    args = SelectiveBackpropConfig(output_dir=str(tmp_path), sbp_strategy="stale-loss", max_steps=2, use_cpu=True)
    with pytest.raises(ValueError, match="Stream, which has no example indices.*map-style"):
        SelectiveBackpropTrainer(model=tiny_bert(LABELS), args=args, train_dataset=Stream())
    assert not any(tmp_path.iterdir())


def test_a_column_named_like_the_ids_is_refused(tmp_path):
    dataset = Dataset.from_list([{**row, EXAMPLE_ID_KEY: 0} for row in indexed_rows(ragged=False)])
    args = SelectiveBackpropConfig(output_dir=str(tmp_path), sbp_strategy="stale-gradmatch", use_cpu=True)
    with pytest.raises(ValueError, match=f"column named '{EXAMPLE_ID_KEY}'"):
        SelectiveBackpropTrainer(model=tiny_bert(LABELS), args=args, train_dataset=dataset)


def direct_statistics(model, rows: list[dict]):
    """Each row's loss, head residual and head input, from a forward pass per row and autograd on the logits."""
    model.eval()
    head_inputs = []
    handle = model.classifier.register_forward_hook(lambda m, args, out: head_inputs.append(args[0].detach()))
    losses, residuals = [], []
    for row in rows:
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits.detach().requires_grad_(True)
        loss = F.cross_entropy(logits, torch.tensor([row["labels"]]))
        (residual,) = torch.autograd.grad(loss, logits)
        losses.append(loss.detach())
        residuals.append(residual[0])
    handle.remove()
    return torch.stack(losses).reshape(-1), torch.stack(residuals), torch.cat(head_inputs)


@pytest.mark.parametrize("strategy", ["stale-loss", "stale-gradmatch"])
def test_cache_holds_what_a_forward_pass_computes(tmp_path, strategy):
    rows = indexed_rows()
    model = tiny_bert(LABELS)
    trainer = train(strategy, Dataset.from_list(rows), tmp_path, pad_collator, epochs=1, lr=0.0, model=model)
    cache = trainer._cache
    assert cache.bytes_per_example == 4 + 4 * LABELS + 2 * 32 + 4
    losses, residuals, features = direct_statistics(model, rows)
    stats = cache.lookup(torch.arange(N), epoch=1.0)
    assert torch.isfinite(stats.age).all(), "every row of the epoch was written"
    torch.testing.assert_close(stats.losses, losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.residuals, residuals, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.features, features, rtol=2e-3, atol=2e-3)  # stored in float16


def test_stale_gradmatch_skips_scoring_and_chooses_as_gradmatch(tmp_path):
    """lr 0: the cached statistics are exactly fresh ones, so stale-gradmatch must choose what gradmatch chooses on
    each batch, while the second epoch runs no scoring pass at all."""
    rows = Dataset.from_list(indexed_rows())
    choices = {}
    for strategy in ("gradmatch", "stale-gradmatch"):
        trainer = train(strategy, rows, tmp_path, pad_collator, epochs=2, lr=0.0)
        choices[strategy] = [log for log in trainer.state.log_history if "sbp/backprop_fraction" in log]
        if strategy == "stale-gradmatch":
            skipped = [log["sbp/scoring_skipped"] for log in choices[strategy]]
            assert skipped == [0.0] * 5 + [1.0] * 5
            assert trainer.state.log_history[-1]["train_sbp/scoring_skipped"] == 0.5
    # Same subsets, so the same losses logged (the model does not move, the loss is the subset's).
    losses = {s: [log["loss"] for log in logs] for s, logs in choices.items()}
    assert losses["stale-gradmatch"] == pytest.approx(losses["gradmatch"], rel=1e-3)


def test_stale_rows_alone_are_scored(tmp_path):
    """A scoring pass covers exactly the rows whose statistics are too old; the forward hooks count its rows."""
    seen_rows = []

    class CountForwards(TrainerCallback):  # from the start of training (the construction-time probe excluded)
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.bert.register_forward_hook(lambda m, args, out: seen_rows.append((m.training, out[0].shape[0])))

    rows = Dataset.from_list(indexed_rows())
    options = dict(epochs=4, callbacks=[CountForwards()], sbp_max_staleness=1.0)
    trainer = train("stale-loss", rows, tmp_path, pad_collator, **options)
    scoring = [rows for training, rows in seen_rows if not training]
    logs = [log for log in trainer.state.log_history if "sbp/scored_fraction" in log]
    assert [round(log["sbp/scored_fraction"] * BATCH) for log in logs if log["sbp/scoring_skipped"] == 0] == scoring
    assert sum(scoring) < 4 * N and scoring[:5] == [BATCH] * 5  # the first epoch scores everything


def test_cache_unit_behaviour():
    cache = ExampleStatsCache(10, projection_dim=0)
    assert cache.lookup(torch.tensor([1, 2]), 0.0).age.tolist() == [math.inf, math.inf]
    cache.write(torch.tensor([3, 1]), 0.5, torch.tensor([0.1, 0.2]), torch.ones(2, 2), torch.arange(6.0).reshape(2, 3))
    stats = cache.lookup(torch.tensor([1, 3, 4]), 2.0)
    assert stats.age.tolist() == [1.5, 1.5, math.inf]
    assert stats.losses[:2].tolist() == pytest.approx([0.2, 0.1])
    assert stats.features[0].tolist() == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        cache.write(torch.tensor([10]), 0.0, torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 3))
    assert cache._pending == [], "a single process keeps no pending writes"
    restored = ExampleStatsCache(10)
    restored.load_state_dict(cache.state_dict())
    assert torch.equal(restored.features, cache.features) and torch.equal(
        restored.epochs.nan_to_num(-1), cache.epochs.nan_to_num(-1)
    )
    with pytest.raises(ValueError, match="holds 10 examples"):
        ExampleStatsCache(11).load_state_dict(cache.state_dict())


def test_exchange_gives_every_process_every_write():
    """Two caches as two processes: after the exchange both hold both processes' writes."""
    caches = [ExampleStatsCache(6, exchanged=True), ExampleStatsCache(6, exchanged=True)]
    caches[0].write(torch.tensor([0, 1]), 1.0, torch.tensor([1.0, 2.0]), torch.zeros(2, 2), torch.ones(2, 3))
    caches[1].write(torch.tensor([4]), 1.0, torch.tensor([5.0]), torch.ones(1, 2), torch.zeros(1, 3))
    pending = [torch.cat(c._pending) for c in caches]
    longest = max(p.shape[0] for p in pending)
    padded = [torch.cat([p, torch.full((longest - p.shape[0], p.shape[1]), -1.0, dtype=p.dtype)]) for p in pending]
    for cache in caches:
        cache.exchange(lambda rows: torch.cat(padded), 2, 3)
    for cache in caches:
        assert cache.lookup(torch.tensor([0, 1, 4]), 1.0).losses.tolist() == [1.0, 2.0, 5.0]
        assert math.isinf(cache.lookup(torch.tensor([2]), 1.0).age[0])


def test_projection_keeps_the_gram_matrix_approximately():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 384, generator=generator) / 384**0.5 + 0.3 * torch.randn(1, 384, generator=generator)
    residuals = torch.randn(64, 2, generator=generator)
    cache = ExampleStatsCache(64, projection_dim=256, seed=1)
    cache.write(torch.arange(64), 0.0, torch.zeros(64), residuals, features)
    stats = cache.lookup(torch.arange(64), 0.0)
    exact = last_layer_gram(residuals, features)
    approx = last_layer_gram(stats.residuals, stats.features)
    assert torch.linalg.norm(approx - exact) / torch.linalg.norm(exact) < 0.15
    # The matrix is fixed by the seed: a resumed run projects as the interrupted one did.
    again = ExampleStatsCache(64, projection_dim=256, seed=1)
    again.write(torch.arange(1), 0.0, torch.zeros(1), residuals[:1], features[:1])
    assert torch.equal(again.projection, cache.projection)


def test_with_example_ids_keeps_a_datasets_dataset():
    dataset = Dataset.from_list(indexed_rows(5, ragged=False))
    indexed = with_example_ids(dataset)
    assert isinstance(indexed, Dataset) and indexed[3][EXAMPLE_ID_KEY] == 3
    assert with_example_ids(MapStyle(indexed_rows(5)))[4][EXAMPLE_ID_KEY] == 4


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("sbp_max_staleness", 0, r"sbp_max_staleness=0 is invalid; it must be a finite number > 0"),
        ("sbp_max_staleness", float("inf"), r"sbp_max_staleness=inf is invalid"),
        ("sbp_cache_projection_dim", -1, r"sbp_cache_projection_dim=-1 is invalid; it must be an integer >= 0"),
        ("sbp_scoring_max_length", 0, r"sbp_scoring_max_length=0 is invalid; it must be an integer >= 1"),
    ],
)
def test_bad_cache_and_scoring_settings_are_refused_before_training(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        SelectiveBackpropConfig(output_dir=str(tmp_path / "out"), sbp_strategy="stale-gradmatch", **{option: value})
    assert not (tmp_path / "out").exists()
