"""Dataset-level pruning: ``infobatch`` and ``random-prune``.

References: brute-force versions of the rules written here from their definitions (InfoBatch's coin flips with the
documented generator), Monte Carlo estimates of what the rules promise (InfoBatch's reweighting keeps every
example's expected weight at 1; ``random-prune`` drops uniformly), the rows the model actually saw (each row's first
token encodes its index), the learning rates the optimizer actually used, and ``Trainer``'s own step, epoch and
evaluation counts. With the learning rate at 0 and no dropout every forward sees the same model, so the losses the
trainer records are exactly those of a direct forward pass, and each epoch's plan can be recomputed from them.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from test_stale import pad_collator
from tiny_models import tiny_bert
from transformers import TrainerCallback

from hf_sbp import (
    DatasetPruningStrategy,
    SelectionStrategy,
    SelectiveBackpropConfig,
    SelectiveBackpropTrainer,
    register_strategy,
    registered_strategies,
)
from hf_sbp.core.pruning import (
    EpochPlan,
    PlannedEpochSampler,
    PruningHistory,
    epoch_generator,
    infobatch_keep,
    low_loss_examples,
    pruning_active,
    random_prune_keep,
)
from hf_sbp.selection_metrics import EPOCH_EXAMPLES, EPOCH_PRUNED, PRUNED_FRACTION

N, BATCH, LABELS = 40, 8, 3


# ---- the rules, against brute force and their promises ---------------------------------------------------


def brute_low_loss(losses: list[float], seen: list[bool]) -> list[bool]:
    values = [loss for loss, s in zip(losses, seen, strict=True) if s]
    if not values:
        return [False] * len(losses)
    mean = sum(values) / len(values)
    return [s and loss < mean for loss, s in zip(losses, seen, strict=True)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.booleans()), min_size=1, max_size=40))
def test_low_loss_examples_are_the_seen_ones_below_the_seen_mean(record):
    losses, seen = [loss for loss, _ in record], [s for _, s in record]
    got = low_loss_examples(torch.tensor(losses, dtype=torch.float64), torch.tensor(seen))
    assert got.tolist() == brute_low_loss(losses, seen)


def test_infobatch_flips_one_coin_per_low_loss_example_with_the_given_generator():
    losses = torch.rand(50, generator=torch.Generator().manual_seed(0))
    seen = torch.ones(50, dtype=torch.bool)
    seen[::7] = False
    keep, weights = infobatch_keep(losses, seen, 0.3, epoch_generator(4, 2))
    coins = torch.rand(50, generator=epoch_generator(4, 2), dtype=torch.float64)
    low = brute_low_loss(losses.tolist(), seen.tolist())
    for i in range(50):
        dropped = low[i] and coins[i] < 0.3
        assert keep[i] == (not dropped)
        assert weights[i] == pytest.approx(1 / 0.7 if low[i] and not dropped else 1.0)


def test_infobatch_keeps_every_examples_expected_weight_at_one():
    """Unbiasedness, InfoBatch's point: E[kept * weight] = 1 for every example, low-loss or not."""
    losses = torch.linspace(0, 1, 20)
    seen = torch.ones(20, dtype=torch.bool)
    draws = torch.stack(
        [torch.where(k, w, torch.zeros(())) for k, w in (infobatch_keep(losses, seen, 0.5, epoch_generator(0, e))
         for e in range(4000))]
    )  # fmt: skip
    assert torch.allclose(draws.mean(0), torch.ones(20), atol=0.06)
    low = torch.tensor(brute_low_loss(losses.tolist(), seen.tolist()))
    assert (draws[:, ~low] == 1).all()  # examples at or above the mean: always kept, weight 1
    assert draws[:, low].eq(0).float().mean() == pytest.approx(0.5, abs=0.02)  # low-loss: dropped half the time


def test_random_prune_drops_as_many_as_infobatch_would_uniformly_with_weight_one():
    losses = torch.linspace(0, 1, 30) ** 3  # skewed: most below the mean
    seen = torch.ones(30, dtype=torch.bool)
    for epoch in range(20):
        keep_ib, _ = infobatch_keep(losses, seen, 0.4, epoch_generator(1, epoch))
        keep_rp, weights = random_prune_keep(losses, seen, 0.4, epoch_generator(1, epoch))
        assert int((~keep_rp).sum()) == int((~keep_ib).sum())  # the same coins decide the count
        assert (weights == 1).all()
    dropped = torch.stack([~random_prune_keep(losses, seen, 0.4, epoch_generator(2, e))[0] for e in range(3000)])
    rate = dropped.float().mean(0)
    assert rate.std() < 0.03 and (rate[-5:].mean() - rate[:5].mean()).abs() < 0.05  # high-loss ones dropped alike


def test_nothing_is_pruned_before_any_loss_is_recorded_or_when_all_are_equal():
    none_seen = torch.zeros(10, dtype=torch.bool)
    assert infobatch_keep(torch.zeros(10), none_seen, 0.9, epoch_generator(0, 0))[0].all()
    assert random_prune_keep(torch.ones(10), torch.ones(10, dtype=torch.bool), 0.9, epoch_generator(0, 0))[0].all()


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, math.nan])
def test_ratio_outside_the_open_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="ratio"):
        infobatch_keep(torch.zeros(3), torch.ones(3, dtype=torch.bool), ratio)


def test_annealing_prunes_only_epochs_that_start_before_the_last_fraction():
    assert pruning_active(0.0, 0.125) and pruning_active(0.874, 0.125)
    assert not pruning_active(0.875, 0.125) and not pruning_active(0.99, 0.125)
    assert pruning_active(0.99, 0.0)


def test_epoch_generator_depends_on_seed_and_epoch_only():
    draw = lambda seed, epoch: torch.rand(4, generator=epoch_generator(seed, epoch)).tolist()  # noqa: E731
    assert draw(3, 1) == draw(3, 1)
    assert len({tuple(draw(3, e)) for e in range(5)} | {tuple(draw(4, 1))}) == 6
    epoch_generator(2**63 - 1, 10**6)  # the largest seed the arguments accept


def test_history_positions_and_the_stretched_step_against_enumeration():
    """Three epochs of 5, 3 and 4 steps (an unpruned epoch has 5): every step's epoch and offset, and the unpruned
    run's step at the same share of its epochs."""
    history = PruningHistory()
    start = 0
    for epoch, steps in enumerate([5, 3, 4]):
        plan = EpochPlan(epoch, torch.arange(steps), torch.ones(10), 10 - steps, True, start)
        history.start(plan)
        history.set_update_steps(steps)
        start += steps
    enumerated = [(e, i) for e, steps in enumerate([5, 3, 4]) for i in range(steps)] + [(3, 0)]
    assert [history.position(step) for step in range(13)] == enumerated
    assert history.unpruned_step(0, 5) == 0 and history.unpruned_step(5, 5) == 5
    assert history.unpruned_step(6, 5) == pytest.approx(5 + 5 / 3)
    assert history.unpruned_step(8, 5) == pytest.approx(10)  # the end of epoch 2 is 2 unpruned epochs
    assert history.unpruned_step(12, 5) == pytest.approx(15)
    restored = PruningHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.epochs == history.epochs and torch.equal(restored.current.order, history.current.order)


def test_sampler_yields_the_plan_and_takes_its_length():
    sampler = PlannedEpochSampler(6)
    assert list(sampler) == list(range(6)) and len(sampler) == 6
    sampler.set_order(torch.tensor([4, 0, 2]))
    assert list(sampler) == [4, 0, 2] and len(sampler) == 3
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        sampler.set_order(torch.tensor([6]))


# ---- the trainer --------------------------------------------------------------------------------------


def indexed_rows(n: int = N) -> list[dict]:
    """Row ``i`` starts with token ``i + 1``: a batch's first column gives its rows' dataset indices."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        tokens = [i + 1] + torch.randint(50, 100, (length - 1,), generator=generator).tolist()
        rows.append({"input_ids": tokens, "attention_mask": [1] * length, "labels": (i * 7) % LABELS})
    return rows


class Seen(TrainerCallback):
    """Per training forward: the rows' dataset indices and the epoch it ran in."""

    def __init__(self, model) -> None:
        self.rows: list[tuple[int, list[int]]] = []
        self.epoch = 0
        model.bert.register_forward_pre_hook(self._record, with_kwargs=True)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = round(state.epoch or 0)

    def _record(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            self.rows.append((self.epoch, (input_ids[:, 0] - 1).tolist()))

    def epochs(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for epoch, rows in self.rows:
            out.setdefault(epoch, []).extend(rows)
        return [out[e] for e in sorted(out)]


class WeightRecorder(SelectiveBackpropTrainer):
    """Records, at every compute_loss, the rows' indices and the selection weights applied to them."""

    supports_selection_weights = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.recorded = getattr(self, "recorded", [])
        weights = self.selection_weights
        ids = (inputs["input_ids"][:, 0] - 1).tolist()
        self.recorded.append((ids, None if weights is None else weights.tolist()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def build(
    strategy: str, tmp_path, model=None, rows=None, trainer_class=SelectiveBackpropTrainer, eval_dataset=None, **options
):
    values = dict(
        output_dir=str(tmp_path / strategy), per_device_train_batch_size=BATCH, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True, seed=5, sbp_strategy=strategy,
    )  # fmt: skip
    if "max_steps" not in options:
        values["num_train_epochs"] = 3
    values.update(options)
    model = model or tiny_bert(LABELS)
    return trainer_class(
        model=model,
        args=SelectiveBackpropConfig(**values),
        train_dataset=Dataset.from_list(rows or indexed_rows()),
        eval_dataset=eval_dataset,
        data_collator=pad_collator,
    )


def direct_losses(model, rows) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        losses = []
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            losses.append(F.cross_entropy(logits, torch.tensor([row["labels"]])).item())
    return torch.tensor(losses)


@pytest.mark.parametrize("strategy", ["infobatch", "random-prune"])
def test_each_epoch_visits_the_plan_its_rule_makes_from_the_recorded_losses(tmp_path, strategy):
    """At lr 0 the recorded losses are a direct forward's; epoch e's examples and order are the rule's with
    ``epoch_generator(seed, e)``, and infobatch's weights reach compute_loss."""
    model = tiny_bert(LABELS)
    rows = indexed_rows()
    losses = direct_losses(model, rows)
    # The batch forward's losses differ from these in the last bits: no loss may sit where that could move it
    # across the mean.
    assert (losses - losses.mean()).abs().min() > 1e-4
    trainer = build(strategy, tmp_path, model=model, rows=rows, trainer_class=WeightRecorder, learning_rate=0.0)
    seen = Seen(trainer.model)
    trainer.add_callback(seen)
    trainer.train()
    rule = infobatch_keep if strategy == "infobatch" else random_prune_keep
    everything = torch.ones(N, dtype=torch.bool)
    visited = seen.epochs()
    assert len(visited) == 3
    recorded = iter(trainer.recorded)
    for epoch, rows_seen in enumerate(visited):
        generator = epoch_generator(5, epoch)
        recorded_yet = everything if epoch > 0 else ~everything  # epoch 0: no loss recorded, nothing pruned
        keep, weights = rule(losses, recorded_yet, 0.5, generator)
        plan = EpochPlan.from_keep(epoch, keep, weights, generator, 0)
        assert rows_seen == plan.order.tolist()
        for start in range(0, len(rows_seen), BATCH):
            ids, applied = next(recorded)
            assert ids == rows_seen[start : start + BATCH]
            expected = weights[ids]
            if bool((expected == 1).all()):
                assert applied is None  # an unweighted step trains with the model's own loss
            else:
                assert applied == pytest.approx(expected.tolist())
    logged = [log for log in trainer.state.log_history if PRUNED_FRACTION in log]
    assert [log[EPOCH_EXAMPLES] for log in logged] == [len(rows) for rows in visited]
    assert [log[EPOCH_PRUNED] for log in logged] == [N - len(rows) for rows in visited]
    assert visited[1] != visited[0] and len(visited[1]) < N, "nothing was pruned, so the test proves little"


def test_an_epoch_based_run_makes_its_epochs_and_its_schedule_ends_with_them(tmp_path):
    """Steps = sum over epochs of ceil(visited / batch); Trainer's epoch counter, per-epoch evaluation and saving
    follow the pruned epochs; the linear schedule warms up as the unpruned one and reaches 0 at the last step."""
    trainer = build(
        "infobatch", tmp_path, num_train_epochs=4, warmup_steps=3, eval_strategy="epoch", save_strategy="epoch",
        lr_scheduler_type="linear", eval_dataset=Dataset.from_list(indexed_rows(16)),
    )  # fmt: skip
    learning_rates = []
    original = trainer.create_optimizer

    def create_optimizer(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, a, k: learning_rates.append(opt.param_groups[0]["lr"]))
        return optimizer

    trainer.create_optimizer = create_optimizer
    trainer.train()
    epochs = [log for log in trainer.state.log_history if EPOCH_EXAMPLES in log]
    per_epoch = [math.ceil(log[EPOCH_EXAMPLES] / BATCH) for log in epochs]
    assert len(epochs) == 4 and sum(per_epoch) == trainer.state.global_step == len(learning_rates)
    assert per_epoch[0] == N // BATCH and min(per_epoch[1:]) < N // BATCH
    assert trainer.state.epoch == pytest.approx(4.0)
    assert trainer.state.max_steps == trainer.state.global_step
    assert len([log for log in trainer.state.log_history if "eval_loss" in log]) == 4
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "infobatch").glob("checkpoint-*"))
    assert checkpoints[-1] == trainer.state.global_step and len(checkpoints) >= 1
    # Reference schedule: linear warm-up over 3 of the unpruned 20 steps, then decay to 0, evaluated at the step an
    # unpruned run would be at after the same share of each epoch.
    unpruned, total = N // BATCH, 4 * (N // BATCH)
    expected, start = [], 0
    for epoch, steps in enumerate(per_epoch):
        for i in range(steps):
            u = epoch * unpruned + i * unpruned / steps
            expected.append(1e-3 * (u / 3 if u < 3 else max(0.0, (total - u) / (total - 3))))
        start += steps
    assert learning_rates == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_a_fractional_number_of_epochs_stops_part_way_through_the_last(tmp_path):
    trainer = build("infobatch", tmp_path, num_train_epochs=2.5)
    trainer.train()
    epochs = [math.ceil(log[EPOCH_EXAMPLES] / BATCH) for log in trainer.state.log_history if EPOCH_EXAMPLES in log]
    assert len(epochs) == 3
    assert trainer.state.global_step == epochs[0] + epochs[1] + math.ceil(0.5 * epochs[2])
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_a_max_steps_run_makes_exactly_max_steps_and_stops_pruning_for_the_annealing(tmp_path):
    trainer = build("infobatch", tmp_path, max_steps=23, sbp_prune_anneal=0.3)
    trainer.train()
    assert trainer.state.global_step == 23
    starts = [(log["step"], log[PRUNED_FRACTION]) for log in trainer.state.log_history if PRUNED_FRACTION in log]
    assert len(starts) >= 4, "a max_steps run goes on through as many pruned epochs as it takes"
    for step, fraction in starts[1:]:
        assert (fraction > 0) == (step / 23 < 0.7), (step, fraction)


def test_accumulation_over_pruned_epochs_steps_the_optimizer_at_each_epoch_end(tmp_path):
    """Pruned epochs whose batches are not a multiple of the accumulation steps still end with an optimizer step:
    Trainer's epoch counter is whole at every epoch end and no gradient carries over."""
    trainer = build("infobatch", tmp_path, gradient_accumulation_steps=2, num_train_epochs=3)
    ends = []

    class EpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            ends.append((state.global_step, state.epoch))

    trainer.add_callback(EpochEnd())
    trainer.train()
    batches = [math.ceil(log[EPOCH_EXAMPLES] / BATCH) for log in trainer.state.log_history if EPOCH_EXAMPLES in log]
    assert any(b % 2 for b in batches), "every epoch had an even number of batches: nothing was tested"
    steps = [math.ceil(b / 2) for b in batches]
    assert [step for step, _ in ends] == [sum(steps[: i + 1]) for i in range(3)]
    assert [epoch for _, epoch in ends] == pytest.approx([1.0, 2.0, 3.0])


def test_the_run_summary_and_the_model_card_report_the_pruning(tmp_path):
    trainer = build("infobatch", tmp_path, sbp_prune_ratio=0.7)
    metrics = trainer.train().metrics
    logged = [log for log in trainer.state.log_history if EPOCH_EXAMPLES in log]
    visited, pruned = sum(log[EPOCH_EXAMPLES] for log in logged), sum(log[EPOCH_PRUNED] for log in logged)
    assert visited + pruned == 3 * N
    assert metrics["train_sbp/pruned_fraction"] == pytest.approx(pruned / (3 * N))
    trainer.create_model_card(model_name="pruned")
    card = (tmp_path / "infobatch" / "README.md").read_text()
    assert "`sbp_prune_ratio`) | 0.7 | infobatch, random-prune" in card
    assert f"{visited} of the {3 * N}" in card  # the saving, from the logged epochs
    assert "sbp_keep: 1.0" in card


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sbp_keep": 0.5}, "sbp_keep=0.5 with sbp_strategy='infobatch'.*does not also select within batches"),
        ({"sbp_interrupt": 2}, "sbp_interrupt=2 with sbp_strategy='infobatch'.*sbp_prune_anneal"),
        ({"sbp_start": 0.2}, "sbp_start=0.2 with sbp_strategy='infobatch'"),
        ({"sbp_prune_ratio": 1.0}, r"sbp_prune_ratio=1.0 is invalid; it must be a number in \(0, 1\)"),
        ({"sbp_prune_ratio": 0}, r"sbp_prune_ratio=0 is invalid"),
        ({"sbp_prune_anneal": 1.0}, r"sbp_prune_anneal=1.0 is invalid; it must be a number in \[0, 1\)"),
        ({"sbp_prune_anneal": -0.1}, r"sbp_prune_anneal=-0.1 is invalid"),
        ({"train_sampling_strategy": "group_by_length"}, "train_sampling_strategy='group_by_length'.*own sampler"),
    ],
)
def test_settings_a_dataset_level_strategy_cannot_serve_are_refused_before_training(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        build("infobatch", tmp_path, **options)
    folder = tmp_path / "infobatch"
    assert not folder.exists() or not any(folder.iterdir())  # Trainer makes the folder; nothing is written in it


def test_keep_one_is_accepted_and_the_per_batch_default_is_unchanged(tmp_path):
    assert build("infobatch", tmp_path, sbp_keep=1.0).sbp_args.sbp_effective_keep == 1.0
    assert build("gradmatch", tmp_path).sbp_args.sbp_effective_keep == 0.5


def test_a_step_counting_scheduler_is_refused_for_an_epoch_based_run(tmp_path):
    model = tiny_bert(LABELS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    args = SelectiveBackpropConfig(
        output_dir=str(tmp_path / "out"), sbp_strategy="infobatch", num_train_epochs=2, use_cpu=True, report_to=[]
    )
    with pytest.raises(ValueError, match="StepLR.*epochs of varying.*set max_steps"):
        SelectiveBackpropTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(indexed_rows()), optimizers=(optimizer, scheduler)
        )
    args.max_steps = 4  # with a fixed step count the schedule is the user's to size
    SelectiveBackpropTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(indexed_rows()), optimizers=(optimizer, scheduler)
    )


def test_a_transformers_without_the_loop_hooks_is_refused(tmp_path, monkeypatch):
    import hf_sbp.epoch_pruning as epoch_pruning

    monkeypatch.setattr(epoch_pruning, "TRAINER_HOOKS", (*epoch_pruning.TRAINER_HOOKS, "_no_such_hook"))
    with pytest.raises(ValueError, match=r"Trainer._no_such_hook \(transformers >= 5.3\)"):
        build("infobatch", tmp_path)


def test_the_loss_cache_of_a_dataset_level_strategy_holds_losses_alone(tmp_path):
    trainer = build("random-prune", tmp_path, num_train_epochs=1)
    trainer.train()
    state = trainer.pruning_history.state_dict()
    assert state["epochs"][0]["visited"] == N
    # 8 bytes per example: the loss and the epoch it was seen (no last-layer gradients)
    from hf_sbp.example_cache import ExampleStatsCache

    cache = ExampleStatsCache(N, gradients=False)
    cache.write(torch.arange(3), 0.5, torch.ones(3), torch.ones(3, LABELS), torch.ones(3, 32))
    assert cache.bytes_per_example == 8
    losses, seen = cache.loss_record()
    assert seen.sum() == 3 and losses[:3].tolist() == [1.0, 1.0, 1.0]


@register_strategy("test-first-half")
class FirstHalf(DatasetPruningStrategy):
    """A user's dataset-level rule: after the first epoch, only the first half of the dataset, at weight 2."""

    weighted = True

    def keep_examples(self, losses, seen, generator):
        keep = ~seen | (torch.arange(losses.numel()) < losses.numel() // 2)
        return keep, torch.full_like(losses, 2.0)


def test_a_user_dataset_pruning_strategy_implements_keep_examples_only(tmp_path):
    trainer = build("test-first-half", tmp_path, trainer_class=WeightRecorder)
    seen = Seen(trainer.model)
    trainer.add_callback(seen)
    trainer.train()
    visited = seen.epochs()
    assert len(visited) == 3 and sorted(visited[0]) == list(range(N))  # nothing recorded yet: every example
    for rows in visited[1:]:
        assert sorted(rows) == list(range(N // 2))
    assert all(weights == pytest.approx([2.0] * len(ids)) for ids, weights in trainer.recorded)
    assert trainer.strategy.default_keep == 1.0 and trainer.pruning_history is not None


@pytest.mark.parametrize(
    "base, attributes, message",
    [
        (SelectionStrategy, {"prunes_dataset": True}, "subclasses DatasetPruningStrategy"),
        (SelectionStrategy, {"keep_examples": lambda self, losses, seen, generator: None}, "keep_examples"),
        (DatasetPruningStrategy, {"prunes_dataset": False}, "prunes_dataset=False"),
        (DatasetPruningStrategy, {"needs_scoring": True}, "needs_scoring"),
        (DatasetPruningStrategy, {"select": lambda self, batch, k: None}, "select()"),
        (DatasetPruningStrategy, {"observe": lambda self, indices, subset: None}, "observe()"),
    ],
)
def test_a_strategy_of_one_kind_with_the_other_kinds_attributes_is_refused_at_registration(base, attributes, message):
    if base is SelectionStrategy:
        attributes = {"select": lambda self, batch, k: None, **attributes}
    cls = type("Mixed", (base,), attributes)
    with pytest.raises(TypeError, match=re.escape(message)):
        register_strategy("test-mixed-kind")(cls)
    assert "test-mixed-kind" not in registered_strategies()
