"""The contracts around a strategy and the trainer's arguments: what ``SelectionStrategy.select`` may return (every
breach is an error naming the strategy and the value, at the first step, before any backward), ``compute_loss_func``
under every strategy, counters after ``auto_find_batch_size``'s retry, and the build-time checks made again when
``train()`` starts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_args, tiny_bert, tiny_dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sbp import SelectionStrategy, SelectiveBackpropTrainer, register_strategy
from hf_sbp.head import HeadNotFoundError


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
        model=model, args=make_args(tmp_path, sbp_strategy=name), train_dataset=tiny_dataset()
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
    losses = F.cross_entropy(logits, batch["labels"][:2], reduction="none")
    ((torch.tensor([1.0, 3.0]) * losses).sum() / 2).backward()
    expected = {key: p.grad.clone() for key, p in model.named_parameters()}
    model.zero_grad()
    trainer.training_step(model, batch)
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[key], rtol=1e-5, atol=1e-7, msg=key)


# ---- compute_loss_func -----------------------------------------------------------------------------------------

BUILT_IN = ["gradmatch", "loss", "random", "none", "stale-gradmatch", "stale-loss", "infobatch", "random-prune"]


def focal_loss(outputs, labels, num_items_in_batch=None):
    """Focal loss (gamma 2), the batch mean: what a user passes as ``compute_loss_func``."""
    log_p = F.log_softmax(outputs.logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** 2) * log_p).mean()


def summed_cross_entropy(outputs, labels, num_items_in_batch=None):
    """Cross-entropy summed and divided by Trainer's count of labels (the token-level normalisation)."""
    return F.cross_entropy(outputs.logits.float(), labels, reduction="sum") / num_items_in_batch


def one_step_sgd(tmp_path, strategy, loss_func, **overrides):
    """One SGD step (lr 0.5, no clipping) with ``compute_loss_func``; returns the model before and after, the batch,
    the rows and weights the step selected (whole batch and weights 1 for ``none``) and what the strategy saw."""
    args = make_args(tmp_path, sbp_strategy=strategy, max_steps=1, optim="sgd", learning_rate=0.5, weight_decay=0.0,
                     max_grad_norm=0.0, **overrides)  # fmt: skip
    model = tiny_bert()
    trainer = SelectiveBackpropTrainer(
        model=model, args=args, train_dataset=tiny_dataset(), compute_loss_func=loss_func
    )
    before = tiny_bert()  # the same seed: the same initial parameters
    seen = {}
    step = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        seen["inputs"] = {
            key: value.clone() for key, value in inputs.items() if key in ("input_ids", "attention_mask", "labels")
        }
        return step(model, inputs, num_items_in_batch)

    trainer.training_step = recording_step
    select = trainer.strategy.select

    def recording_select(batch, k):
        seen["batch"], seen["choice"] = batch, select(batch, k)
        return seen["choice"]

    trainer.strategy.select = recording_select
    trainer.train()
    n = seen["inputs"]["labels"].shape[0]
    indices, weights = seen.get("choice", (torch.arange(n), torch.ones(n)))
    chosen = torch.as_tensor(indices).long(), torch.as_tensor(weights).float()
    return before, model, seen["inputs"], *chosen, seen.get("batch")


@pytest.mark.parametrize("strategy", BUILT_IN)
def test_compute_loss_func_is_the_loss_of_every_strategy(tmp_path, strategy):
    # The reference, by hand: (1/m) sum_S w_i f_i on the chosen rows, f_i the focal loss of row i alone; its
    # autograd gradient is the SGD step. For unweighted subsets that is the focal loss of the subset.
    before, after, batch, indices, weights, seen = one_step_sgd(tmp_path, strategy, focal_loss)
    rows = {key: value[indices] for key, value in batch.items()}
    logits = before(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    ((weights * row_focal_losses(logits, rows["labels"])).sum() / indices.numel()).backward()
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters(), strict=True):
        torch.testing.assert_close(p1.detach(), p0.detach() - 0.5 * p0.grad, rtol=1e-4, atol=1e-6, msg=name)
    if seen is not None and seen.logits is not None:
        # What the scoring pass gave the strategy: focal losses, and their gradients in the logits as residuals.
        z = seen.logits.detach().float().requires_grad_(True)
        expected = row_focal_losses(z, seen.scored_labels)
        (residuals,) = torch.autograd.grad(expected.sum(), z)
        torch.testing.assert_close(seen.losses, expected.detach())
        torch.testing.assert_close(seen.residuals, residuals)


def row_focal_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The focal loss of each row alone, as a batch of one."""
    return torch.stack(
        [focal_loss(SimpleNamespace(logits=z[None]), y[None]) for z, y in zip(logits, labels, strict=True)]
    )


@pytest.mark.parametrize("strategy", ["gradmatch", "loss"])
def test_a_compute_loss_func_normalised_by_num_items_is_honoured(tmp_path, strategy):
    before, after, batch, indices, weights, _ = one_step_sgd(tmp_path, strategy, summed_cross_entropy)
    logits = before(input_ids=batch["input_ids"][indices], attention_mask=batch["attention_mask"][indices]).logits
    losses = F.cross_entropy(logits, batch["labels"][indices], reduction="none")
    ((weights * losses).sum() / indices.numel()).backward()
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters(), strict=True):
        torch.testing.assert_close(p1.detach(), p0.detach() - 0.5 * p0.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("sbp", [{"sbp_strategy": "none"}, {"sbp_strategy": "random", "sbp_keep": 1.0}])
def test_compute_loss_func_trains_as_the_plain_trainer(tmp_path, sbp):
    plain_args = make_args(tmp_path / "plain", max_steps=3).to_dict()
    plain_args = TrainingArguments(**{k: v for k, v in plain_args.items() if not k.startswith("sbp_")})
    plain = Trainer(model=tiny_bert(), args=plain_args, train_dataset=tiny_dataset(), compute_loss_func=focal_loss)
    plain.train()
    ours = SelectiveBackpropTrainer(model=tiny_bert(), args=make_args(tmp_path / "ours", max_steps=3, **sbp),
                                    train_dataset=tiny_dataset(), compute_loss_func=focal_loss)  # fmt: skip
    ours.train()
    for (name, a), b in zip(plain.model.named_parameters(), ours.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def class_weighted_cross_entropy(outputs, labels, num_items_in_batch=None):
    # PyTorch's weighted mean divides by the weights' sum: not a mean of one term per example.
    return F.cross_entropy(outputs.logits, labels, weight=torch.tensor([1.0, 5.0, 0.2]))


def reads_hidden_states(outputs, labels, num_items_in_batch=None):
    return F.cross_entropy(outputs.logits, labels) + 0.0 * outputs.hidden_states[-1].sum()


@pytest.mark.parametrize("strategy", ["gradmatch", "loss", "stale-loss", "infobatch"])
@pytest.mark.parametrize(
    "loss_func, message",
    [
        (class_weighted_cross_entropy, r"compute_loss_func's loss \([\d.]+\) is not the mean of its per-example"),
        (reads_hidden_states, r"calls compute_loss_func on one row at a time.*that call failed"),
    ],
    ids=["not-a-mean", "reads-other-outputs"],
)
def test_a_compute_loss_func_selection_cannot_serve_is_refused_when_built(tmp_path, strategy, loss_func, message):
    # Checked on the first two examples when the trainer is built (of two classes here, so that a class-weighted mean
    # differs from the plain one), and again at the first step.
    data = tiny_dataset(labels=[0, 1, 2] * 16)
    options = dict(train_dataset=data, compute_loss_func=loss_func)
    with pytest.raises(ValueError, match=message):
        SelectiveBackpropTrainer(
            model=tiny_bert(output_hidden_states=True), args=make_args(tmp_path, sbp_strategy=strategy), **options
        )
    # A strategy that trains with the loss as it is takes it, as Trainer does.
    args = make_args(tmp_path, sbp_strategy="random")
    SelectiveBackpropTrainer(model=tiny_bert(output_hidden_states=True), args=args, **options).train()


# ---- auto_find_batch_size ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["none", "random", "loss", "stale-loss"])
def test_counters_after_an_out_of_memory_retry_count_only_the_steps_that_happened(tmp_path, strategy):
    # The second gradient forward runs out of memory (the error accelerate's find_executable_batch_size retries on):
    # Trainer runs its loop again with a smaller batch. The reference: the rows of the gradient forwards after that.
    model = tiny_bert()
    forwards: list[int] = []

    def out_of_memory_once(module, args):
        if torch.is_grad_enabled():
            forwards.append(args[0].shape[0])
            if len(forwards) == 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    model.bert.register_forward_pre_hook(out_of_memory_once)
    args = make_args(tmp_path, sbp_strategy=strategy, max_steps=2, auto_find_batch_size=True)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=tiny_dataset())
    output = trainer.train()
    assert trainer._train_batch_size < 8 and len(forwards) == 4  # retried with a smaller batch: two more steps
    assert trainer.sbp_backprop_examples == sum(forwards[2:])
    if strategy != "none":
        assert output.metrics["train_sbp/selective_steps"] == 2
        assert output.metrics["train_sbp/backprop_fraction"] == pytest.approx(
            sum(forwards[2:]) / (2 * trainer._train_batch_size)
        )


# ---- the checks made when the trainer is built are made again when train() starts ------------------------------


class ZeroLoss(SelectiveBackpropTrainer):
    """A compute_loss override that does not call super().compute_loss (so cannot apply selection weights)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss * 0.0, outputs) if return_outputs else outputs.loss * 0.0


class Began(TrainerCallback):
    def __init__(self) -> None:
        self.began = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = True


def regression_dataset():
    data = tiny_dataset()
    return data.remove_columns("labels").add_column("labels", [float(i % 5) for i in range(len(data))])


CHANGED_ARGUMENTS = {
    # A weighted strategy under an override that may drop its weights.
    "override-then-weighted": (
        ZeroLoss, dict(num_labels=3), "random", {"sbp_strategy": "gradmatch"}, ValueError,
        r"ZeroLoss overrides compute_loss, and sbp_strategy='gradmatch' weights",
    ),
    # A head override that names no head (an nn.Linear with another output size).
    "head-of-the-wrong-size": (
        SelectiveBackpropTrainer, dict(num_labels=3), "gradmatch", {"sbp_head_module": "bert.pooler.dense"},
        HeadNotFoundError, r"sbp_head_module='bert\.pooler\.dense' is an nn\.Linear with out_features=32",
    ),
    # Label smoothing on a regression model.
    "smoothing-on-regression": (
        SelectiveBackpropTrainer, dict(num_labels=1, problem_type="regression"), "loss",
        {"label_smoothing_factor": 0.1}, ValueError,
        r"label_smoothing_factor=0\.1 applies to single-label classification only.*'regression'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CHANGED_ARGUMENTS))
def test_arguments_changed_after_building_are_checked_before_training_starts(tmp_path, case):
    cls, model_options, strategy, changes, error, message = CHANGED_ARGUMENTS[case]
    model = tiny_bert(**model_options)
    data = regression_dataset() if model_options["num_labels"] == 1 else tiny_dataset()
    began = Began()
    trainer = cls(model=model, args=make_args(tmp_path, sbp_strategy=strategy), train_dataset=data, callbacks=[began])
    for name, value in changes.items():
        setattr(trainer.args, name, value)
    before = params(model)
    with pytest.raises(error, match=message) as raised:
        trainer.train()
    assert "Checked when train() started" in str(raised.value)
    assert not began.began and trainer.state.global_step == 0  # refused before the training loop began
    assert_unchanged(model, before)


def test_a_compute_loss_func_given_after_building_is_probed_when_training_starts(tmp_path):
    # What the first examples' forward pass checks changed (another loss): it runs again, before the loop begins.
    began = Began()
    data = tiny_dataset(labels=[0, 1, 2] * 16)
    args = make_args(tmp_path, sbp_strategy="loss")
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=data, callbacks=[began])
    trainer.compute_loss_func = class_weighted_cross_entropy
    with pytest.raises(ValueError, match=r"compute_loss_func's loss .*Checked when train\(\) started"):
        trainer.train()
    assert not began.began and trainer.state.global_step == 0


def test_a_loss_check_that_fails_on_non_finite_values_says_so(tmp_path):
    # NaN parameters: the loss check cannot compare anything, and must not blame the problem type.
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"is not finite: the forward pass on these examples produced NaN") as raised:
        SelectiveBackpropTrainer(
            model=model, args=make_args(tmp_path, sbp_strategy="loss"), train_dataset=tiny_dataset()
        )
    assert "problem_type" not in str(raised.value)
