"""Bad configurations, models and data: each raises before training with a message that names the bad value
and what would be valid, or, for numerical trouble during training, falls back without losing the step.

Also the precision contract: under bf16 autocast the selection's Gram matrix and weights stay in
float32/float64 and finite.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_bert, tiny_bert_config
from torch import nn
from transformers import BertModel, TrainerCallback

import hf_sbp.strategies.base as strategy_base
import hf_sbp.strategies.gradmatch as gradmatch_module
from hf_sbp import SelectiveBackpropConfig, SelectiveBackpropTrainer
from hf_sbp.glue.bundled import add_symmetric_label_noise
from hf_sbp.head import HeadNotFoundError

BATCH = 8


def tiny_dataset(n: int = 32, seq_len: int = 8, labels: list[int] | None = None, seed: int = 1) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    columns = {
        "input_ids": torch.randint(1, 100, (n, seq_len), generator=generator).tolist(),
        "attention_mask": [[1] * seq_len] * n,
        "labels": torch.randint(0, 3, (n,), generator=generator).tolist() if labels is None else labels,
    }
    return Dataset.from_dict(columns)


def config(tmp_path, **options) -> SelectiveBackpropConfig:
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    values.update(options)
    return SelectiveBackpropConfig(**values)


def batch_of(dataset: Dataset) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(dataset[key]) for key in dataset.column_names}


# ---- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.0001, 2.0, float("nan"), float("inf")])
def test_keep_out_of_range_raises_naming_value_and_range(tmp_path, keep):
    with pytest.raises(ValueError) as error:
        config(tmp_path, sbp_keep=keep)
    message = str(error.value)
    assert f"sbp_keep={keep!r}" in message and "(0, 1]" in message


def test_keep_edited_after_construction_is_caught_by_the_trainer(tmp_path):
    args = config(tmp_path)
    args.sbp_keep = 1.5
    with pytest.raises(ValueError, match=r"sbp_keep=1\.5.*\(0, 1\]"):
        SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())


def test_unknown_strategy_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError) as error:
        config(tmp_path, sbp_strategy="grad_match")
    message = str(error.value)
    assert "'grad_match'" in message
    for strategy in ("gradmatch", "loss", "random", "none"):
        assert f"'{strategy}'" in message


@pytest.mark.parametrize("strategy", ["gradmatch", "loss", "random"])
def test_batch_too_small_for_one_example_raises(tmp_path, strategy):
    # round(0.05 * 8) = 0: nothing would be backpropagated.
    with pytest.raises(ValueError) as error:
        config(tmp_path, sbp_strategy=strategy, sbp_keep=0.05)
    message = str(error.value)
    assert "sbp_keep=0.05" in message and "per_device_train_batch_size=8" in message
    assert "sbp_keep >= 0.0625" in message  # round(0.0625 * 8) = round(0.5) = 1
    config(tmp_path, sbp_strategy=strategy, sbp_keep=0.0625)  # the suggested value is accepted


def test_empty_train_dataset_raises_when_training_starts(tmp_path):
    # As Trainer: a trainer built for evaluation needs no training set; train() refuses an empty one up front.
    empty = tiny_dataset().select([])
    for strategy in ("gradmatch", "none"):
        trainer = SelectiveBackpropTrainer(
            model=tiny_bert(), args=config(tmp_path, sbp_strategy=strategy), train_dataset=empty
        )
        assert "eval_loss" in trainer.evaluate(tiny_dataset(8))
        with pytest.raises(ValueError, match="train_dataset is empty"):
            trainer.train()


# ---- models whose head cannot be found ---------------------------------------------------------


class NoHeadModel(nn.Module):
    """Logits are pairs of a 6-output layer summed: no nn.Linear has out_features == num_labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = tiny_bert_config()
        self.bert = BertModel(self.config, add_pooling_layer=False)
        self.proj = nn.Linear(32, 6)

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        logits = self.proj(hidden).view(-1, 3, 2).sum(-1)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


class TwoHeadModel(nn.Module):
    """Two nn.Linear(…, num_labels) run and the logits are their sum: no single one reproduces them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = tiny_bert_config()
        self.bert = BertModel(self.config, add_pooling_layer=False)
        self.head_a = nn.Linear(32, 3)
        self.head_b = nn.Linear(32, 3)

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        logits = self.head_a(hidden) + self.head_b(hidden)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("strategy", ["gradmatch", "loss"])
def test_model_without_head_raises_naming_the_override(tmp_path, strategy):
    with pytest.raises(HeadNotFoundError) as error:
        SelectiveBackpropTrainer(
            model=NoHeadModel(), args=config(tmp_path, sbp_strategy=strategy), train_dataset=tiny_dataset()
        )
    message = str(error.value)
    assert "sbp_head_module" in message and "num_labels=3" in message


def test_ambiguous_heads_raise_at_construction(tmp_path):
    with pytest.raises(HeadNotFoundError) as error:
        SelectiveBackpropTrainer(model=TwoHeadModel(), args=config(tmp_path), train_dataset=tiny_dataset())
    message = str(error.value)
    assert "sbp_head_module" in message and "head_a" in message and "head_b" in message


def test_override_naming_a_head_that_is_not_the_logits_still_raises(tmp_path):
    # Naming one of the two summed heads would make the Gram matrix describe the wrong gradients.
    with pytest.raises(HeadNotFoundError, match="does not produce the model's logits"):
        SelectiveBackpropTrainer(
            model=TwoHeadModel(), args=config(tmp_path, sbp_head_module="head_a"), train_dataset=tiny_dataset()
        )


def test_override_naming_a_missing_module_lists_the_linear_modules(tmp_path):
    with pytest.raises(HeadNotFoundError) as error:
        SelectiveBackpropTrainer(
            model=tiny_bert(), args=config(tmp_path, sbp_head_module="score"), train_dataset=tiny_dataset()
        )
    message = str(error.value)
    assert "sbp_head_module='score'" in message and "'classifier'" in message


def test_random_strategy_needs_no_head(tmp_path):
    # `random` never looks at the head, so a model without one trains.
    trainer = SelectiveBackpropTrainer(
        model=NoHeadModel(), args=config(tmp_path, sbp_strategy="random", max_steps=2), train_dataset=tiny_dataset()
    )
    trainer.train()
    assert trainer.state.global_step == 2


# ---- bad labels ----------------------------------------------------------------------------------


def test_dataset_without_labels_raises_at_construction(tmp_path):
    unlabelled = tiny_dataset().remove_columns("labels")
    with pytest.raises(ValueError, match="no 'labels'.*input_ids"):
        SelectiveBackpropTrainer(model=tiny_bert(), args=config(tmp_path), train_dataset=unlabelled)


def test_batch_without_labels_raises_in_select_batch(tmp_path):
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=config(tmp_path), train_dataset=tiny_dataset())
    inputs = batch_of(tiny_dataset(BATCH))
    del inputs["labels"]
    with pytest.raises(ValueError, match="no 'labels'"):
        trainer.select_batch(trainer.model, inputs)


@pytest.mark.parametrize("row", [0, 29])
def test_ignore_index_labels_raise_at_construction(tmp_path, row):
    labels = [i % 3 for i in range(32)]
    labels[row] = -100
    labels[-1] = -100
    with pytest.raises(ValueError) as error:
        SelectiveBackpropTrainer(model=tiny_bert(), args=config(tmp_path), train_dataset=tiny_dataset(labels=labels))
    message = str(error.value)
    assert "-100" in message and "2 of the 32" in message and f"row {row}" in message


def test_ignore_index_in_a_batch_raises_in_select_batch(tmp_path):
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=config(tmp_path), train_dataset=tiny_dataset())
    inputs = batch_of(tiny_dataset(BATCH))
    inputs["labels"][3] = -100
    with pytest.raises(ValueError, match="ignore index -100"):
        trainer.select_batch(trainer.model, inputs)


# ---- numerical trouble during training -----------------------------------------------------------


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.step = -1

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def run_with_broken_scoring(tmp_path, strategy, corrupt, bad_steps=(1, 2), steps=4):
    """Train while ``corrupt`` tampers with the classifier in the scoring pass (eval mode) of ``bad_steps``.

    Returns the trainer, the rows each gradient pass saw (from a hook on the encoder) and the weights each
    training step's selection returned.
    """
    model = tiny_bert()
    clock = StepClock()
    rows: dict[int, int] = {}

    def count_rows(module, args):
        if torch.is_grad_enabled():
            rows[clock.step] = args[0].shape[0]

    model.bert.register_forward_pre_hook(count_rows)
    corrupt(model, lambda: not model.training and clock.step in bad_steps)
    trainer = SelectiveBackpropTrainer(
        model=model,
        args=config(tmp_path, sbp_strategy=strategy, max_steps=steps),
        train_dataset=tiny_dataset(),
        callbacks=[clock],
    )
    weights = []
    select = trainer._selector.select  # what every training step selects with

    def recording_select(*args, **kwargs):
        indices, w, record = select(*args, **kwargs)
        weights.append(w)
        return indices, w, record

    trainer._selector.select = recording_select
    trainer.train()
    assert len(weights) == steps
    return trainer, rows, weights


def nan_logits(model, active):
    model.classifier.register_forward_hook(lambda m, a, out: torch.full_like(out, math.nan) if active() else None)


def huge_features(model, active):
    # Finite features and logits, but h . h overflows float32 in the Gram matrix.
    model.classifier.register_forward_pre_hook(lambda m, a: (a[0] * 1e20,) if active() else None)


@pytest.mark.parametrize("strategy", ["gradmatch", "loss"])
@pytest.mark.parametrize("corrupt", [nan_logits, huge_features], ids=["nan-logits", "gram-overflow"])
def test_non_finite_scoring_falls_back_to_the_full_batch(tmp_path, caplog, strategy, corrupt):
    with caplog.at_level(logging.WARNING, logger="hf_sbp.trainer"):
        trainer, rows, weights = run_with_broken_scoring(tmp_path, strategy, corrupt)
    assert trainer.state.global_step == 4
    assert rows == {0: 4, 1: BATCH, 2: BATCH, 3: 4}  # the broken steps trained on everything
    warnings = [r for r in caplog.records if "sbp/fallback_steps" in r.getMessage()]
    assert len(warnings) == 1  # warned once, not per step
    fallbacks = [log["sbp/fallback_steps"] for log in trainer.state.log_history if "sbp/fallback_steps" in log]
    assert fallbacks == [0.0, 1.0, 1.0, 0.0]
    assert all(bool(torch.isfinite(w).all()) and bool((w >= 0).all()) for w in weights)
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_identical_examples_singular_gram(tmp_path):
    # Every example the same: the Gram matrix has rank 1. One example already matches the mean exactly.
    same = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 16, "attention_mask": [[1] * 4] * 16, "labels": [1] * 16})
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=config(tmp_path, max_steps=2), train_dataset=same)
    indices, weights = trainer.select_batch(trainer.model, batch_of(same.select(range(BATCH))))
    assert 1 <= indices.numel() <= BATCH // 2
    assert indices.unique().numel() == indices.numel()
    assert bool(torch.isfinite(weights).all()) and bool((weights > 0).all())
    assert trainer.last_selection.grad_match_error < 1e-3
    trainer.train()
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_duplicated_rows_are_not_chosen_twice(tmp_path):
    base = tiny_dataset(4, seed=5)
    doubled = Dataset.from_dict({key: list(base[key]) * 2 for key in base.column_names})  # rows i and i + 4 equal
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=config(tmp_path, sbp_keep=0.75), train_dataset=doubled)
    indices, weights = trainer.select_batch(trainer.model, batch_of(doubled))
    assert indices.unique().numel() == indices.numel()
    assert len({int(i) % 4 for i in indices}) == indices.numel()  # a duplicate adds nothing once its twin is in
    assert bool(torch.isfinite(weights).all()) and bool((weights > 0).all())


def test_zero_gram_falls_back_to_a_uniform_subset(tmp_path):
    # Every example is predicted with certainty, so every residual (and the Gram matrix) is exactly zero.
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 1000.0, 0.0]))
    data = tiny_dataset(labels=[1] * 32)
    trainer = SelectiveBackpropTrainer(model=model, args=config(tmp_path, max_steps=2), train_dataset=data)
    indices, weights = trainer.select_batch(trainer.model, batch_of(data.select(range(BATCH))))
    assert indices.numel() == BATCH // 2 and indices.unique().numel() == BATCH // 2
    assert torch.equal(weights, torch.ones(BATCH // 2))
    trainer.train()
    assert trainer.state.global_step == 2


# ---- precision -------------------------------------------------------------------------------------


def test_bf16_autocast_keeps_selection_in_float32_and_float64(tmp_path, monkeypatch):
    seen = {"logits": [], "gram": [], "omp": [], "weights": []}
    model = tiny_bert()
    model.classifier.register_forward_hook(
        lambda m, a, out: seen["logits"].append(out.dtype) if not torch.is_grad_enabled() else None
    )
    gram_fn, omp_fn = strategy_base.last_layer_gram, gradmatch_module.omp_gram

    def recording_gram(*args, **kwargs):
        gram = gram_fn(*args, **kwargs)
        seen["gram"].append(gram)
        return gram

    def recording_omp(*args, **kwargs):
        result = omp_fn(*args, **kwargs)
        seen["omp"].append(result.weights)
        return result

    monkeypatch.setattr(strategy_base, "last_layer_gram", recording_gram)
    monkeypatch.setattr(gradmatch_module, "omp_gram", recording_omp)
    trainer = SelectiveBackpropTrainer(
        model=model, args=config(tmp_path, bf16=True, max_steps=3), train_dataset=tiny_dataset()
    )
    select = trainer._selector.select  # what every training step selects with
    trainer._selector.select = lambda *args: seen["weights"].append(select(*args)) or seen["weights"][-1]
    trainer.train()

    assert torch.bfloat16 in seen["logits"], "the scoring pass did not run under bf16 autocast"
    assert len(seen["gram"]) == 3 and len(seen["omp"]) == 3
    for gram in seen["gram"]:
        assert gram.dtype == torch.float32 and bool(torch.isfinite(gram).all())
        assert float(torch.linalg.eigvalsh(gram.double()).min()) > -1e-4 * float(gram.diagonal().max())
    for weights in seen["omp"]:
        assert weights.dtype == torch.float64 and bool(torch.isfinite(weights).all()) and bool((weights >= 0).all())
    assert len(seen["weights"]) == 3
    for indices, weights, _ in seen["weights"]:
        assert weights.dtype == torch.float32 and bool(torch.isfinite(weights).all())
        assert 1 <= indices.numel() <= BATCH // 2
    fallbacks = sum(log.get("sbp/fallback_steps", 0.0) for log in trainer.state.log_history)
    assert fallbacks == 0


# ---- label noise -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), float("inf"), True, "0.2", None])
def test_label_noise_rate_out_of_range_raises(rate):
    with pytest.raises(ValueError) as error:
        add_symmetric_label_noise([0, 1, 2], rate, num_classes=3, seed=0)
    assert f"rate={rate!r}" in str(error.value) and "[0, 1]" in str(error.value)


def test_label_noise_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        add_symmetric_label_noise([0, 0, 0], 0.5, num_classes=1, seed=0)


def test_label_noise_extremes_against_definition():
    labels = np.arange(300) % 3
    unchanged, flipped = add_symmetric_label_noise(labels, 0.0, num_classes=3, seed=0)
    assert flipped == 0 and np.array_equal(unchanged, labels)
    noisy, flipped = add_symmetric_label_noise(labels, 1.0, num_classes=3, seed=0)
    assert flipped == 300 and bool((noisy != labels).all()) and set(noisy.tolist()) <= {0, 1, 2}


def test_non_finite_selection_weights_never_reach_the_loss(tmp_path, monkeypatch, caplog):
    # A guard behind the others: should the selection ever produce a non-finite weight, the step falls back.
    monkeypatch.setattr(gradmatch_module, "normalize_weights", lambda weights, mode: torch.full_like(weights, math.nan))
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=config(tmp_path), train_dataset=tiny_dataset())
    with caplog.at_level(logging.WARNING, logger="hf_sbp.trainer"):
        indices, weights = trainer.select_batch(trainer.model, batch_of(tiny_dataset(BATCH)))
    assert torch.equal(indices, torch.arange(BATCH)) and torch.equal(weights, torch.ones(BATCH))
    assert trainer.last_selection.fallback
    assert any("sbp/fallback_steps" in r.getMessage() for r in caplog.records)


def test_single_process_multi_gpu_is_refused_at_construction(tmp_path):
    # What Trainer does when one process sees several GPUs (torch.nn.DataParallel); simulated, as there is
    # no GPU here: the head capture would see one replica's slice of the batch, so it is refused up front.
    args = config(tmp_path)
    args._n_gpu = 2
    with pytest.raises(ValueError, match="n_gpu=2.*torchrun"):
        SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())


# ---- bad labels and data through the API: refused when the trainer is built, naming the value -------


@pytest.mark.parametrize("bad, row", [(3, 5), (-1, 0), (7, 31)])
def test_label_ids_outside_the_classes_raise_at_construction(tmp_path, bad, row):
    labels = [0, 1, 2] * 10 + [0, 1]
    labels[row] = bad
    with pytest.raises(ValueError, match=rf"training example {row} has labels = {bad}, outside \[0, 3\)"):
        SelectiveBackpropTrainer(model=tiny_bert(), args=config(tmp_path), train_dataset=tiny_dataset(labels=labels))


def test_label_ids_outside_the_classes_in_a_batch_name_the_value(tmp_path):
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=config(tmp_path), train_dataset=tiny_dataset())
    batch = batch_of(tiny_dataset(BATCH, labels=[0, 1, 2, 5, 0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"label id 5, outside \[0, 3\) for num_labels=3"):
        trainer.select_batch(trainer.model, batch)


def test_float_labels_with_two_classes_raise_at_construction(tmp_path):
    data = tiny_dataset().remove_columns("labels").add_column("labels", [0.0, 1.0] * 16)
    with pytest.raises(
        ValueError, match=r"float labels of shape \(2,\) with num_labels=2 make the problem multi-label"
    ):
        SelectiveBackpropTrainer(model=tiny_bert(num_labels=2), args=config(tmp_path), train_dataset=data)


def test_seed_too_large_for_a_generator_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"sbp_seed=18446744073709551616 is invalid; it must be an integer in \[0, 2\*\*63\)"
    ):
        config(tmp_path, sbp_seed=2**64)


def test_a_head_override_with_the_wrong_output_size_says_so(tmp_path):
    with pytest.raises(
        HeadNotFoundError, match=r"'bert.pooler.dense' is an nn.Linear with out_features=32, .*num_labels=3"
    ):
        SelectiveBackpropTrainer(
            model=tiny_bert(), args=config(tmp_path, sbp_head_module="bert.pooler.dense"), train_dataset=tiny_dataset()
        )


def test_a_token_classification_model_gets_an_error_about_per_token_labels(tmp_path):
    from transformers import BertForTokenClassification

    model = BertForTokenClassification(tiny_bert_config())
    data = tiny_dataset().remove_columns("labels")
    data = data.add_column("labels", [[0, 1, 2, 0, 1, 2, 0, -100]] * 32)
    with pytest.raises(ValueError, match=r"shape \(2, 8\).*Per-token labels") as error:
        SelectiveBackpropTrainer(model=model, args=config(tmp_path), train_dataset=data)
    assert "filter unlabelled rows" not in str(error.value)
