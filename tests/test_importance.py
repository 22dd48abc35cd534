"""``importance`` and ``stale-importance`` against independent references: autograd (per-example gradients of the
head and of the whole model), the closed form of the variance reduction, and the forward passes each step ran."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import collated, make_args, tiny_bert, tiny_dataset

from hf_sbp import SelectiveBackpropTrainer
from hf_sbp.core.importance import (
    SmoothedVarianceReduction,
    gradient_norms,
    importance_break_even,
    importance_sample,
    variance_reduction,
)
from hf_sbp.core.selection import head_residuals
from hf_sbp.strategies import SelectionBatch


@pytest.mark.parametrize("bias", [True, False])
def test_gradient_norms_are_the_autograd_norms_of_the_heads_gradient(bias):
    gen = torch.Generator().manual_seed(0)
    n, d, c = 6, 5, 3
    head = torch.nn.Linear(d, c, bias=bias)
    features, labels = torch.randn(n, d, generator=gen), torch.randint(0, c, (n,), generator=gen)
    expected = []
    for i in range(n):
        head.zero_grad()
        F.cross_entropy(head(features[i : i + 1]), labels[i : i + 1]).backward()
        grads = [head.weight.grad.flatten()] + ([head.bias.grad] if bias else [])
        expected.append(torch.cat(grads).norm())
    residuals = head_residuals(head(features).detach(), labels, "single_label_classification")
    torch.testing.assert_close(gradient_norms(residuals, features, bias), torch.stack(expected), rtol=1e-5, atol=1e-7)


def test_variance_reduction_and_its_smoothing():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0])
    p = scores / scores.sum()
    # Closed form: ||p - u||^2 = ||p||^2 - 1/n, so tau = sqrt(n) ||p||.
    assert variance_reduction(scores) == pytest.approx(math.sqrt(4) * float(p.norm()))
    assert variance_reduction(torch.ones(5)) == pytest.approx(1.0)
    assert importance_break_even(32, 16) == pytest.approx((32 + 48) / 48)
    smoothed = SmoothedVarianceReduction()
    assert smoothed.value is None and not smoothed.exceeds(1.0) and smoothed.exceeds(0.0)
    first = variance_reduction(scores)
    smoothed.observe(scores)
    smoothed.end_step()
    assert smoothed.value == pytest.approx(first)
    # A step's observations are averaged (over processes too: here a stand-in sum that doubles a second one's).
    smoothed.observe(torch.ones(4))
    smoothed.observe(torch.ones(1))  # one row says nothing
    smoothed.end_step(lambda totals: totals + torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert smoothed.value == pytest.approx(0.9 * first + 0.1 * (1.0 + 3.0) / 2)
    smoothed.end_step()  # a step with nothing observed leaves it
    assert smoothed.value == pytest.approx(0.9 * first + 0.1 * 2.0)


def test_duplicate_draws_count_as_often_as_drawn():
    # Brute-force reference: the draws themselves, re-made from the same generator state.
    scores = torch.tensor([5.0, 1.0, 0.5, 0.1])
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    indices, weights = importance_sample(scores, 8, gen)
    gen.set_state(state)
    p = (scores / scores.sum()).double()
    draws = torch.multinomial(p, 8, replacement=True, generator=gen)
    assert torch.unique(draws).numel() < draws.numel(), "no duplicate drawn: the test would prove nothing"
    values = torch.randn(4, 3, dtype=torch.float64)
    per_draw = (values[draws] / (4 * p[draws])[:, None]).mean(0)  # (1/k) sum_draws g_i / (n p_i)
    trained = (weights.double()[:, None] * values[indices]).sum(0) / indices.numel()  # (1/m) sum_S w_i g_i
    torch.testing.assert_close(trained, per_draw, rtol=1e-6, atol=1e-9)


def per_example_gradients(model, batch) -> torch.Tensor:
    """``(n, P)`` every parameter's gradient of each example's loss, one backward pass per example (autograd)."""
    model.train()
    rows = []
    for i in range(batch["labels"].shape[0]):
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1])
        F.cross_entropy(logits.logits, batch["labels"][i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    model.zero_grad()
    return torch.stack(rows)


def test_weighted_draws_are_an_unbiased_estimate_of_the_full_batch_gradient(tmp_path):
    """Over many draws, the trained estimate (1/m) sum_S w_i g_i of the whole model's gradient converges to the
    batch's mean gradient from autograd; the same subsets with weight 1 (a biased estimate) do not."""
    data = tiny_dataset(n=8)
    batch = collated(data, range(8))
    model = tiny_bert()
    with torch.no_grad():  # a head that favours class 1: rows of the others have much larger gradients
        model.classifier.bias.copy_(torch.tensor([0.0, 3.0, 0.0]))
    args = make_args(tmp_path, sbp_strategy="importance", sbp_importance_break_even=0.0, sbp_keep=0.5)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data)
    scores = trainer.score_batch(model, {k: v for k, v in batch.items()})
    generator = torch.Generator().manual_seed(0)
    selection = SelectionBatch(8, batch["labels"], "single_label_classification", generator, 0, 0.0, *scores)
    grads = per_example_gradients(model, batch)
    target = grads.mean(0)
    draws = 4000
    # Each draw's estimate is a combination of the rows' gradients: accumulate the coefficients, then one product.
    weighted = torch.zeros(8, dtype=torch.float64)
    unweighted = torch.zeros(8, dtype=torch.float64)
    for _ in range(draws):
        indices, weights = trainer.strategy.select(selection, 4)
        weighted[indices] += weights.double() / indices.numel()
        unweighted[indices] += 1.0 / indices.numel()
    error = float(((weighted / draws) @ grads - target).norm() / target.norm())
    biased = float(((unweighted / draws) @ grads - target).norm() / target.norm())
    assert error < 0.03, error
    assert biased > 10 * error, (biased, error)


def test_training_step_backpropagates_the_importance_weighted_loss(tmp_path):
    data = tiny_dataset(n=8)
    batch = collated(data, range(8))
    model = tiny_bert()
    args = make_args(tmp_path, sbp_strategy="importance", sbp_importance_break_even=0.0, sbp_keep=0.5)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data)
    trainer.current_gradient_accumulation_steps = 1
    state = trainer.selection_generator.get_state()
    indices, weights = trainer.select_batch(model, batch)
    assert trainer.last_selection.scored and weights.std() > 0
    # Reference: autograd of (1/m) sum_S w_i CE_i on the chosen rows.
    grads = per_example_gradients(model, batch)
    expected = (weights.double()[:, None] * grads[indices]).sum(0) / indices.numel()
    trainer.selection_generator.set_state(state)
    trainer.training_step(model, batch, num_items_in_batch=None)
    trained = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    torch.testing.assert_close(trained, expected, rtol=1e-4, atol=1e-7)


def encoder_calls(model) -> list[bool]:
    """Whether autograd was on in each forward pass of the encoder (False: a scoring pass)."""
    calls: list[bool] = []
    model.bert.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("break_even, scored_steps", [(1e9, 0), (0.0, 4)])
def test_the_switch_pays_the_scoring_pass_only_above_the_break_even(tmp_path, break_even, scored_steps):
    data = tiny_dataset(n=32)
    model = tiny_bert()
    calls = encoder_calls(model)
    args = make_args(tmp_path, sbp_strategy="importance", sbp_importance_break_even=break_even, max_steps=4)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data)
    del calls[:]  # the trainer's construction-time check of the first batch
    trainer.train()
    assert calls.count(False) == scored_steps and calls.count(True) == 4
    logs = [log for log in trainer.state.log_history if "sbp/importance_sampling" in log and "loss" in log]
    assert [log["sbp/importance_sampling"] for log in logs] == [float(scored_steps > 0)] * 4
    # Off, tau comes from the trained rows' own scores, so it is known from the second step on.
    assert all(math.isfinite(log["sbp/variance_reduction"]) for log in logs[1:])


def test_the_switch_follows_the_smoothed_variance_reduction(tmp_path):
    """With the default break-even, each step samples exactly when the estimate before it exceeds (n + 3k)/(3k)."""
    data = tiny_dataset(n=64)
    model = tiny_bert()
    args = make_args(tmp_path, sbp_strategy="importance", max_steps=8, learning_rate=5e-2)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data)
    strategy = trainer.strategy
    decisions = []
    original = strategy.rows_to_score

    def rows_to_score(batch):
        before = strategy.tau.value
        rows = original(batch)
        decisions.append((before, rows.numel()))
        return rows

    strategy.rows_to_score = rows_to_score
    trainer.train()
    threshold = (8 + 3 * 4) / (3 * 4)
    assert len(decisions) == 8
    for before, scored in decisions:
        assert scored == (8 if before is not None and before > threshold else 0)


def test_stale_importance_samples_from_cached_gradient_norms(tmp_path):
    """In the second epoch every row has cached statistics: no scoring pass, and the draw is the one the cached
    gradient norms give (the same generator state, the reference draw made from the cache directly)."""
    data = tiny_dataset(n=16)
    model = tiny_bert()
    calls = encoder_calls(model)
    args = make_args(tmp_path, sbp_strategy="stale-importance", max_steps=4)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data)
    del calls[:]
    trainer.train()
    assert calls.count(False) == 2  # the first epoch's two steps score, the second's do not
    cache = trainer._cache
    ids = torch.nonzero(cache.epochs >= 0.5).reshape(-1)[:8]  # rows younger than the staleness window at epoch 2
    assert ids.numel() == 8
    stats = cache.lookup(ids, 2.0)
    scores = gradient_norms(stats.residuals, stats.features, stats.head_bias)
    expected = torch.norm(stats.residuals, dim=1) * torch.sqrt(stats.features.pow(2).sum(1) + 1)
    torch.testing.assert_close(scores, expected)
    batch = collated(data, ids.tolist())
    batch["sbp_example_id"] = ids
    state = trainer.selection_generator.get_state()
    indices, weights = trainer.select_batch(model, batch)
    assert not trainer.last_selection.scored
    trainer.selection_generator.set_state(state)
    expected_indices, expected_weights = importance_sample(scores, 4, trainer.selection_generator)
    assert torch.equal(indices, expected_indices) and torch.equal(weights, expected_weights)
