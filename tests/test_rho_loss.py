"""``rho-loss`` and ``stale-rho-loss`` against independent references: brute-force ranking of losses from a plain
forward pass, scikit-learn's logistic regression for the linear-probe IL model, and the defining property of the
double-IL models (an example's IL does not depend on the example itself)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from tiny_models import collated, make_args, tiny_bert, tiny_dataset

from hf_sbp import SelectiveBackpropTrainer
from hf_sbp.checkpoint_state import SBP_STATE_NAME
from hf_sbp.core.rho_loss import check_splittable, fit_linear_probe, reducible_loss_top_k, split_halves

SINGLE = "single_label_classification"


def test_split_halves_is_a_stratified_partition():
    labels = torch.tensor([0] * 7 + [1] * 4 + [2] * 5)
    first, second = split_halves(labels, SINGLE, torch.Generator().manual_seed(0))
    assert sorted(first.tolist() + second.tolist()) == list(range(16))
    for c, count in ((0, 7), (1, 4), (2, 5)):
        in_first = int((labels[first] == c).sum())
        assert {in_first, count - in_first} == {count // 2, count - count // 2}
    regression_first, regression_second = split_halves(torch.randn(9), "regression", torch.Generator())
    assert (regression_first.numel(), regression_second.numel()) == (4, 5)


def test_too_small_to_split_is_refused():
    check_splittable(torch.tensor([0] * 4 + [1] * 4), SINGLE)
    with pytest.raises(ValueError, match=r"classes \[1\] .*too few examples \(\{1: 3\}\)"):
        check_splittable(torch.tensor([0] * 4 + [1] * 3), SINGLE)
    with pytest.raises(ValueError, match="3 examples"):
        check_splittable(torch.randn(3), "regression")


def test_a_training_set_too_small_to_split_is_refused_when_the_trainer_is_built(tmp_path):
    data = tiny_dataset(n=16, labels=[0] * 8 + [1] * 5 + [2] * 3)
    args = make_args(tmp_path, sbp_strategy="rho-loss")
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=data)


def test_top_k_reducible_loss_is_the_brute_force_ranking():
    gen = torch.Generator().manual_seed(0)
    losses, irreducible = torch.rand(10, generator=gen), torch.rand(10, generator=gen)
    reducible = (losses - irreducible).tolist()
    expected = sorted(sorted(range(10), key=lambda i: -reducible[i])[:4])
    assert reducible_loss_top_k(losses, irreducible, 4).tolist() == expected


def test_linear_probe_is_scikit_learns_logistic_regression():
    gen = torch.Generator().manual_seed(0)
    n, d, c, l2 = 120, 5, 3, 0.05
    features = torch.randn(n, d, generator=gen) * torch.tensor([1.0, 3.0, 0.2, 1.0, 5.0]) + 2.0
    labels = (features[:, 0] + 0.3 * features[:, 1] + torch.randn(n, generator=gen) > 2.5).long()
    labels = labels + (features[:, 4] > 4.0).long()
    probe = fit_linear_probe(features, labels, SINGLE, c, l2=l2)
    # sklearn minimises C sum_i CE_i + ||W||^2 / 2 (intercept unpenalised): C = 1 / (n l2) on standardised features.
    standardised = ((features - features.mean(0)) / features.std(0, unbiased=False)).numpy()
    reference = LogisticRegression(C=1.0 / (n * l2), tol=1e-10, max_iter=10000).fit(standardised, labels.numpy())
    expected = torch.tensor(reference.predict_proba(standardised), dtype=torch.float32)
    with torch.no_grad():
        probabilities = torch.softmax(probe(features), dim=-1)
    torch.testing.assert_close(probabilities, expected, atol=2e-3, rtol=0)


def il_trainer(tmp_path, data, **overrides):
    args = make_args(tmp_path, sbp_strategy="rho-loss", max_steps=1, **overrides)
    return SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=data)


def test_double_il_of_an_example_comes_from_the_model_trained_on_the_other_half(tmp_path):
    """Changing one example's tokens leaves the IL of every other example of its half unchanged (their IL model
    never saw it) and changes the other half's (their IL model trained on it)."""
    data = tiny_dataset(n=24)
    trainer = il_trainer(tmp_path / "a", data, sbp_il_epochs=2, learning_rate=1e-2)
    trainer.train()
    first, second = split_halves(torch.tensor(data["labels"]), SINGLE, torch.Generator().manual_seed(0))
    changed = int(first[0])
    rows = data.to_dict()
    rows["input_ids"][changed] = [7] * len(rows["input_ids"][changed])
    other = il_trainer(tmp_path / "b", type(data).from_dict(rows), sbp_il_epochs=2, learning_rate=1e-2)
    other.train()
    before, after = trainer.irreducible_losses, other.irreducible_losses
    same_half = first[1:]
    torch.testing.assert_close(after[same_half], before[same_half], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after[second], before[second], rtol=1e-4, atol=1e-5)
    assert trainer.sbp_il_seconds > 0
    assert trainer.state.log_history[-1]["train_sbp/il_seconds"] == pytest.approx(trainer.sbp_il_seconds)


@pytest.mark.parametrize("il_model", ["double", "linear_probe"])
def test_rho_loss_keeps_the_rows_of_largest_reducible_loss(tmp_path, il_model):
    data = tiny_dataset(n=24)
    trainer = il_trainer(tmp_path, data, sbp_il_model=il_model)
    trainer.train()
    model = trainer.model
    ids = torch.arange(8, 16)
    batch = {**collated(data, ids.tolist()), "sbp_example_id": ids}
    indices, weights = trainer.select_batch(model, batch)
    # Reference: the current losses from a plain eval-mode forward, ranked by hand.
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reducible = (F.cross_entropy(logits, batch["labels"], reduction="none") - trainer.irreducible_losses[ids]).tolist()
    assert indices.tolist() == sorted(sorted(range(8), key=lambda i: -reducible[i])[:4])
    assert torch.equal(weights, torch.ones(4))


def test_stale_rho_loss_ranks_the_cached_losses_without_scoring(tmp_path):
    data = tiny_dataset(n=24)
    args = make_args(tmp_path, sbp_strategy="stale-rho-loss", max_steps=6, sbp_il_model="linear_probe")
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=data)
    trainer.train()
    ids = torch.nonzero(trainer._cache.epochs >= 0.3).reshape(-1)[:8]  # rows seen within the staleness window
    batch = {**collated(data, ids.tolist()), "sbp_example_id": ids}
    indices, _ = trainer.select_batch(trainer.model, batch)
    assert not trainer.last_selection.scored
    reducible = (trainer._cache.losses[ids] - trainer.irreducible_losses[ids]).tolist()
    assert indices.tolist() == sorted(sorted(range(8), key=lambda i: -reducible[i])[:4])


def test_a_resume_without_irreducible_losses_is_refused(tmp_path):
    data = tiny_dataset(n=24)
    args = make_args(
        tmp_path, sbp_strategy="rho-loss", sbp_il_model="linear_probe", save_strategy="steps", save_steps=2
    )
    first = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=data)
    first.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    state_file = checkpoint / SBP_STATE_NAME.format(0)
    state = torch.load(state_file, weights_only=True)
    torch.testing.assert_close(state["irreducible_losses"]["values"], first.irreducible_losses)
    resumed = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(resumed.irreducible_losses, first.irreducible_losses)
    state["irreducible_losses"] = None
    torch.save(state, state_file)
    again = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=data)
    with pytest.raises(ValueError, match="holds no irreducible losses"):
        again.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"sbp_il_model": "bogus"}, "sbp_il_model='bogus' is invalid"),
        ({"sbp_il_epochs": 0}, "sbp_il_epochs"),
        ({"sbp_il_learning_rate": -1.0}, "sbp_il_learning_rate=-1.0 is invalid"),
        ({"sbp_importance_break_even": -0.5}, "sbp_importance_break_even=-0.5 is invalid"),
    ],
)
def test_bad_settings_are_refused(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, sbp_strategy="rho-loss", **setting)
