"""The contracts around a strategy and the trainer's arguments: what ``SelectionStrategy.select`` may return (every
breach is an error naming the strategy and the value, at the first step, before any backward), ``compute_loss_func``
under every strategy, counters after ``auto_find_batch_size``'s retry, and the build-time checks made again when
``train()`` starts."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_args, tiny_bert, tiny_dataset

from hf_sbp import SelectionStrategy, SelectiveBackpropTrainer, register_strategy


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def returning(name: str, indices, weights) -> str:
    """Register a strategy with the default flags (no scoring pass, not ``weighted``) whose ``select`` always returns
    these indices and weights."""

    @register_strategy(name)
    class Fixed(SelectionStrategy):
        def select(self, batch, k):
            return torch.as_tensor(indices), torch.as_tensor(weights)

    return name


# ---- the SelectionStrategy.select contract ---------------------------------------------------------------------


BREACHES = {
    "negative-weight": (
        ([0, 1], [1.0, -0.5]),
        r"strategy 'test-negative-weight' returned a negative weight \(-0\.5 for row 1",
    ),
    "zero-weights": (([0, 1], [0.0, 0.0]), r"strategy 'test-zero-weights' returned weights that are all 0"),
    "inf-weight": (([0, 1], [1.0, float("inf")]), r"strategy 'test-inf-weight' returned non-finite weights"),
    "nan-weight": (([0, 1], [float("nan"), 1.0]), r"strategy 'test-nan-weight' returned non-finite weights"),
    "float-indices": (
        ([0.9, 2.7], [1.0, 1.0]),
        r"strategy 'test-float-indices' returned indices of dtype torch\.float32 \(\[0\.9",
    ),
    "mask-indices": (([True, False], [1.0]), r"strategy 'test-mask-indices' returned indices of dtype torch\.bool"),
}


@pytest.mark.parametrize("case", list(BREACHES))
def test_a_breach_of_the_select_contract_is_an_error_before_any_backward(tmp_path, case):
    (indices, weights), message = BREACHES[case]
    name = returning(f"test-{case}", indices, weights)
    model = tiny_bert()
    trainer = SelectiveBackpropTrainer(
        model=model, args=make_args(tmp_path, sbp_strategy=name, weight_decay=0.0), train_dataset=tiny_dataset()
    )
    before = params(model)
    gradients = []
    model.bert.register_forward_hook(lambda module, args, output: gradients.append(torch.is_grad_enabled()))
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert not any(gradients) and trainer.state.global_step == 0  # no gradient forward ran, nothing was trained
    assert_unchanged(model, before)


def test_weights_that_are_all_nan_give_up_on_the_batch_which_trains_whole(tmp_path):
    # The documented signal (gradmatch's, when OMP's estimate breaks down): the full batch, counted as a fallback.
    name = returning("test-all-nan", [0, 1], [float("nan"), float("nan")])
    trainer = SelectiveBackpropTrainer(
        model=tiny_bert(), args=make_args(tmp_path, sbp_strategy=name, max_steps=1), train_dataset=tiny_dataset()
    )
    trainer.train()
    assert trainer.last_selection.fallback and trainer.sbp_backprop_examples == 8


def test_weights_of_a_strategy_with_the_default_flags_are_applied(tmp_path):
    # No scoring pass and weighted = False, yet weights other than 1: the subset loss is (1/m) sum_S w_i l_i, by hand.
    name = returning("test-undeclared-weights", [0, 1], [1.0, 3.0])
    data = tiny_dataset(n=8)
    model = tiny_bert()
    trainer = SelectiveBackpropTrainer(model=model, args=make_args(tmp_path, sbp_strategy=name), train_dataset=data)
    trainer.current_gradient_accumulation_steps = 1
    batch = {key: torch.tensor(data[key]) for key in data.column_names}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2]).logits
    losses = torch.nn.functional.cross_entropy(logits, batch["labels"][:2], reduction="none")
    ((torch.tensor([1.0, 3.0]) * losses).sum() / 2).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    trainer.training_step(model, batch)
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[key], rtol=1e-5, atol=1e-7, msg=key)
