"""SelectiveBackpropTrainer against the plain Trainer, autograd, and the cost model."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import collated, make_args, tiny_bert, tiny_dataset
from transformers import Trainer, TrainingArguments

from hf_sbp import SelectiveBackpropConfig, SelectiveBackpropTrainer


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def record_encoder_calls(module: torch.nn.Module) -> list[tuple[int, bool]]:
    """Records (batch rows, grad enabled) of every forward call of `module`."""
    calls = []

    def hook(mod, args, kwargs, output):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        calls.append((input_ids.shape[0], torch.is_grad_enabled()))

    module.register_forward_hook(hook, with_kwargs=True)
    return calls


def recorded_calls(tmp_path, **overrides) -> list[tuple[int, bool]]:
    model = tiny_bert()
    trainer = SelectiveBackpropTrainer(model=model, args=make_args(tmp_path, **overrides), train_dataset=tiny_dataset())
    calls = record_encoder_calls(model.bert)  # after construction, which checks the first examples
    trainer.train()
    return calls


def test_plain_training_arguments_mean_the_selective_backprop_defaults(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, report_to="none", use_cpu=True)
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    assert trainer.args is args  # kept, as Trainer keeps it
    assert trainer.sbp_args.sbp_strategy == "gradmatch" and trainer.sbp_args.sbp_effective_keep == 0.5
    assert trainer.args.learning_rate == 3e-4
    assert {"hf_sbp", "selective-backprop"} <= set(trainer.model.model_tags)


@pytest.mark.parametrize(
    "strategy, extra, expected",
    [
        ("gradmatch", {}, [(8, False), (4, True)]),
        ("loss", {}, [(8, False), (4, True)]),
        ("loss", {"sbp_loss_variant": "jiang"}, None),
        ("random", {}, [(4, True)]),
        ("random", {"sbp_diagnostic_scoring": True}, [(8, False), (4, True)]),
        ("none", {}, [(8, True)]),
    ],
)
def test_forward_passes_per_step(tmp_path, strategy, extra, expected):
    calls = recorded_calls(tmp_path, sbp_strategy=strategy, max_steps=3, **extra)
    if expected is not None:
        assert calls == expected * 3
        return
    # Jiang's coin flips: a no-grad pass over the batch, then a gradient pass over 1..n rows.
    assert [c[1] for c in calls] == [False, True] * 3
    assert all(c == (8, False) for c in calls[::2])
    assert all(1 <= rows <= 8 for rows, _ in calls[1::2])


def test_schedule_window_and_interrupt(tmp_path):
    # Selection active for training fractions in [0.5, 1): the first 2 of 4 steps use the full batch.
    calls = recorded_calls(tmp_path, sbp_strategy="loss", max_steps=4, sbp_start=0.5)
    assert calls == [(8, True), (8, True), (8, False), (4, True), (8, False), (4, True)]
    # Every 2nd step (global steps 1 and 3, 0-based) is interrupted.
    calls = recorded_calls(tmp_path, sbp_strategy="loss", max_steps=4, sbp_interrupt=2)
    assert calls == [(8, False), (4, True), (8, True), (8, False), (4, True), (8, True)]


def test_none_is_bit_for_bit_the_plain_trainer(tmp_path):
    data = tiny_dataset()
    common = dict(per_device_train_batch_size=8, max_steps=4, gradient_accumulation_steps=2, learning_rate=1e-3,
                  save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    plain = tiny_bert()
    Trainer(model=plain, args=TrainingArguments(output_dir=str(tmp_path / "a"), **common), train_dataset=data).train()
    ours = tiny_bert()
    args = SelectiveBackpropConfig(output_dir=str(tmp_path / "b"), sbp_strategy="none", **common)
    SelectiveBackpropTrainer(model=ours, args=args, train_dataset=data).train()
    expected, got = params(plain), params(ours)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize(
    "strategy, keep, extra",
    [
        ("gradmatch", 0.5, {}),
        # Nearly every row kept, in OMP's order of selection, with unequal (ridge) weights: the weights must
        # stay with their rows.
        ("gradmatch", 0.875, {"sbp_omp_ridge": 0.1, "sbp_omp_tol": 0.0}),
        # Keep 1.0 is the full batch, weight 1 each.
        ("gradmatch", 1.0, {}),
        ("gradmatch", 0.5, {"sbp_weight_normalization": "sum_constrained"}),
        ("gradmatch", 0.5, {"sbp_weight_normalization": "subset_size"}),
        ("loss", 0.5, {}),
        ("random", 0.5, {}),
    ],
)
def test_training_step_backpropagates_the_weighted_subset_loss(tmp_path, strategy, keep, extra):
    data = tiny_dataset(n=8)
    batch = collated(data, range(8))
    model = tiny_bert()
    args = make_args(tmp_path, sbp_strategy=strategy, sbp_keep=keep, **extra)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data)
    trainer.current_gradient_accumulation_steps = 1
    state = trainer.selection_generator.get_state()
    indices, weights = trainer.select_batch(model, batch)
    k = round(8 * keep)
    assert indices.dtype == torch.long and indices.unique().numel() == indices.numel() <= k
    assert weights.shape == indices.shape and (weights >= 0).all()
    if strategy == "gradmatch":
        # The default mode ('none') keeps OMP's magnitude; the others make the weights sum to the subset size.
        if keep == 1.0 or extra.get("sbp_weight_normalization", "none") != "none":
            assert weights.sum().item() == pytest.approx(indices.numel())
        if keep == 0.875:
            assert indices.numel() == 7 and not torch.equal(indices, indices.sort().values)
            assert weights.std() > 1e-3
        if keep == 1.0:
            assert torch.equal(indices, torch.arange(8)) and torch.equal(weights, torch.ones(8))
    else:
        assert torch.equal(weights, torch.ones(k))
    # Reference: autograd of (1/m) sum_S w_i CE_i on the chosen rows, written out by hand.
    model.train()
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"][indices], attention_mask=batch["attention_mask"][indices]).logits
    loss = (weights * F.cross_entropy(logits, batch["labels"][indices], reduction="none")).sum() / indices.numel()
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    trainer.selection_generator.set_state(state)  # the same random draws as the select_batch call above
    trainer.training_step(model, batch, num_items_in_batch=None)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)


def _train_sgd(tmp_path, name, data, batch_size, accumulation, trainer_cls=SelectiveBackpropTrainer, model=None,
               **overrides):  # fmt: skip
    model = model or tiny_bert()
    args = make_args(tmp_path / name, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                     max_steps=1, optim="sgd", learning_rate=0.5, **overrides)  # fmt: skip
    if trainer_cls is Trainer:
        args = TrainingArguments(**{k: v for k, v in args.to_dict().items() if not k.startswith("sbp_")})
    trainer_cls(model=model, args=args, train_dataset=data).train()
    return params(model)


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_gradient_accumulation_normalises_as_the_plain_trainer(tmp_path, accepts_loss_kwargs):
    # Every strategy normalises accumulated micro-batches as Trainer does for the model. BERT accepts **kwargs
    # but ignores num_items_in_batch, so Trainer then sums the micro-batches' means (4 of them here); with
    # accepts_loss_kwargs = False it divides by the accumulation steps, and the result is the big batch's.
    data = tiny_dataset(n=16)

    def model():
        bert = tiny_bert()
        bert.accepts_loss_kwargs = accepts_loss_kwargs
        return bert

    plain = _train_sgd(tmp_path, "plain", data, 4, 4, model=model(), trainer_cls=Trainer)
    none = _train_sgd(tmp_path, "none", data, 4, 4, model=model(), sbp_strategy="none")
    ours = _train_sgd(tmp_path, "ours", data, 4, 4, model=model(), sbp_strategy="random", sbp_keep=1.0)
    big = _train_sgd(tmp_path, "big", data, 16, 1, model=model(), trainer_cls=Trainer)
    for name in plain:
        assert torch.equal(none[name], plain[name]) and torch.equal(ours[name], plain[name]), name
        if not accepts_loss_kwargs:
            torch.testing.assert_close(plain[name], big[name], rtol=1e-4, atol=1e-6)
    assert accepts_loss_kwargs == (not torch.allclose(plain["classifier.weight"], big["classifier.weight"]))


def test_label_smoothing_matches_the_plain_trainer(tmp_path):
    data = tiny_dataset(n=8)
    plain = _train_sgd(tmp_path, "plain", data, 8, 1, trainer_cls=Trainer, label_smoothing_factor=0.1)
    ours = _train_sgd(tmp_path, "ours", data, 8, 1, sbp_strategy="random", sbp_keep=1.0, label_smoothing_factor=0.1)
    unsmoothed = _train_sgd(tmp_path, "raw", data, 8, 1, sbp_strategy="random", sbp_keep=1.0)
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(unsmoothed["classifier.weight"], plain["classifier.weight"])


def _train(tmp_path, **overrides) -> SelectiveBackpropTrainer:
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=make_args(tmp_path, **overrides),
                                       train_dataset=tiny_dataset())  # fmt: skip
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "strategy, extra, has_match_error",
    [("gradmatch", {}, True), ("loss", {}, True), ("random", {}, False),
     ("random", {"sbp_diagnostic_scoring": True}, True)],
)  # fmt: skip
def test_selection_metrics_are_logged(tmp_path, strategy, extra, has_match_error):
    trainer = _train(tmp_path, sbp_strategy=strategy, max_steps=4, logging_steps=2, **extra)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        if strategy == "gradmatch":  # OMP may stop early once the match is exact
            assert 0 < entry["sbp/backprop_fraction"] <= 0.5
        else:
            assert entry["sbp/backprop_fraction"] == 0.5
        assert 0 <= entry["sbp/selection_time_share"] < 1
        assert entry["sbp/selective_steps"] == 2
        assert entry["sbp/fallback_steps"] == 0
        if strategy == "random" and not extra:
            assert entry["sbp/scoring_time_share"] == 0
        else:
            assert 0 < entry["sbp/scoring_time_share"] < 1
        assert ("sbp/grad_match_error" in entry) == has_match_error
        if has_match_error:
            assert 0 <= entry["sbp/grad_match_error"] < 2
    if strategy == "gradmatch":
        assert 4 <= trainer.sbp_backprop_examples <= 16
    else:
        assert trainer.sbp_backprop_examples == 4 * 4


def test_gradmatch_matches_the_mean_gradient_better_than_random_subsets(tmp_path):
    gm = _train(tmp_path / "gm", sbp_strategy="gradmatch", max_steps=6, logging_steps=6)
    rnd = _train(tmp_path / "rnd", sbp_strategy="random", sbp_diagnostic_scoring=True, max_steps=6, logging_steps=6)
    gm_error = gm.state.log_history[0]["sbp/grad_match_error"]
    rnd_error = rnd.state.log_history[0]["sbp/grad_match_error"]
    assert gm_error < rnd_error


def test_floating_point_ops_count_the_scoring_pass_and_the_subset(tmp_path):
    full = _train(tmp_path / "none", sbp_strategy="none").state.total_flos
    assert full > 0
    assert _train(tmp_path / "loss", sbp_strategy="loss").state.total_flos == pytest.approx(full * (1 / 3 + 0.5))
    assert _train(tmp_path / "random", sbp_strategy="random").state.total_flos == pytest.approx(full * 0.5)


def test_bf16_autocast_on_cpu(tmp_path):
    trainer = _train(tmp_path, sbp_strategy="gradmatch", bf16=True, max_steps=3, logging_steps=3)
    entry = trainer.state.log_history[0]
    assert math.isfinite(entry["loss"]) and math.isfinite(entry["sbp/grad_match_error"])
    assert entry["sbp/fallback_steps"] == 0


def test_jiang_variant_keeps_a_loss_history(tmp_path):
    trainer = _train(tmp_path, sbp_strategy="loss", sbp_loss_variant="jiang", sbp_loss_history_size=20, max_steps=3)
    assert len(trainer.strategy.history) == 20  # 3 batches of 8 losses, capped at 20


def test_the_summary_log_has_run_averages_including_the_last_partial_interval(tmp_path):
    # 5 steps logged every 2: steps 1-4 reach the interval logs, step 5 only the run summary.
    trainer = _train(tmp_path, sbp_strategy="random", max_steps=5, logging_steps=2)
    intervals = [entry for entry in trainer.state.log_history if "sbp/selective_steps" in entry]
    assert sum(entry["sbp/selective_steps"] for entry in intervals) == 4
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary
    assert summary["train_sbp/selective_steps"] == 5
    assert summary["train_sbp/backprop_fraction"] == 0.5


@pytest.mark.parametrize("normalization", ["subset_size", "none"])
def test_logged_match_error_is_that_of_the_trained_gradient(tmp_path, normalization):
    # Reference: autograd's per-example last-layer gradients (weight and bias of the head, eval mode as the
    # scoring pass), the trained subset gradient (1/m) sum_S w_i g_i, and its relative error to the batch mean.
    data = tiny_dataset(n=16)
    batch = collated(data, range(16))
    model = tiny_bert()
    args = make_args(tmp_path, per_device_train_batch_size=16, sbp_weight_normalization=normalization)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data)
    indices, weights = trainer.select_batch(model, batch)
    model.eval()
    grads = []
    for i in range(16):
        model.zero_grad()
        logits = model(
            input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
        ).logits
        F.cross_entropy(logits, batch["labels"][i : i + 1]).backward()
        grads.append(torch.cat([model.classifier.weight.grad.flatten(), model.classifier.bias.grad]).double())
    G = torch.stack(grads)
    mean = G.mean(0)
    trained = (weights.double()[:, None] * G[indices]).sum(0) / indices.numel()
    expected = float((trained - mean).norm() / mean.norm())
    assert trainer.last_selection.grad_match_error == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_sbp_omp_batch_selects_with_generalized_omp(tmp_path):
    from hf_sbp.core.omp import omp_gram
    from hf_sbp.core.selection import head_residuals, last_layer_gram

    data = tiny_dataset(n=24)
    batch = collated(data, range(24))
    model = tiny_bert()
    args = make_args(tmp_path, per_device_train_batch_size=24, sbp_omp_batch=3, sbp_omp_tol=0.0)
    trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data)
    indices, weights = trainer.select_batch(model, batch)
    # The same subset as omp_gram with batch=3 on the scoring pass's Gram matrix, weights scaled by the subset size.
    scores = trainer.score_batch(model, batch)
    residuals = head_residuals(scores.logits, batch["labels"], "single_label_classification")
    gram = last_layer_gram(residuals, scores.features)
    expected = omp_gram(gram, 12, tol=None, batch=3)
    assert indices.tolist() == expected.indices.tolist()
    torch.testing.assert_close(weights.double(), expected.weights * expected.indices.numel(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"sbp_omp_batch=0 is invalid; it must be an integer >= 1"):
        make_args(tmp_path, sbp_omp_batch=0)
