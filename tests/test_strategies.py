"""The strategy API: a strategy defined here, outside the package, trains through SelectiveBackpropTrainer and
scripts/run_glue.py, resumes exactly with its own state, observes the gradient pass, and appears in the model card;
the registry's errors; the built-in strategies' declarations."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from glue_fixtures import load_run_glue, save_tiny_model, single_sentence_rows, tiny_training_flags, write_rows
from tiny_models import collated, tiny_bert, tiny_dataset
from transformers import HfArgumentParser, TrainerCallback

from hf_sbp import (
    SelectionBatch,
    SelectionStrategy,
    SelectiveBackpropConfig,
    SelectiveBackpropTrainer,
    register_strategy,
    registered_strategies,
)
from hf_sbp.checkpoint_state import SBP_STATE_NAME
from hf_sbp.strategies import strategy_class


@register_strategy("test-rotating-loss")
class RotatingLowestLoss(SelectionStrategy):
    """Rows in order of loss, rotated by the number of batches seen so far: the choice depends on the strategy's
    own state, so only a resume that restores it reproduces an uninterrupted run. Weights 1, 2, 1, 2, ..."""

    needs_scoring = True
    description = "a test strategy whose choice depends on its own state"
    settings = ("sbp_head_module",)

    def __init__(self, args) -> None:
        super().__init__(args)
        self.batches = 0
        self.observed: list[tuple[torch.Tensor, SelectionBatch]] = []

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches += 1
        order = torch.argsort(batch.losses.cpu(), stable=True).roll(self.batches)
        return order[:k], 1.0 + (torch.arange(k) % 2).float()

    def observe(self, indices: torch.Tensor, subset: SelectionBatch) -> None:
        self.observed.append((indices, subset))

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])


@register_strategy("test-first-rows")
class FirstRows(SelectionStrategy):
    """No scoring pass: the first ``k`` rows."""

    def select(self, batch: SelectionBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert batch.logits is None and batch.features is None
        return torch.arange(k), torch.ones(k)


def make_args(tmp_path, **overrides) -> SelectiveBackpropConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        sbp_strategy="test-rotating-loss",
    )  # fmt: skip
    values.update(overrides)
    return SelectiveBackpropConfig(**values)


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_registered_names_are_valid_strategies():
    assert {"gradmatch", "loss", "random", "none", "test-rotating-loss"} <= set(registered_strategies())
    parser = HfArgumentParser(SelectiveBackpropConfig)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "/tmp/unused", "--sbp_strategy", "test-rotating-loss", "--report_to", "none"]
    )
    assert args.strategy_class() is RotatingLowestLoss


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"sbp_strategy='nope' is not a registered strategy; choose one of"):
        strategy_class("nope")
    with pytest.raises(ValueError, match=r"strategy name 'Bad Name' is invalid"):
        register_strategy("Bad Name")
    with pytest.raises(ValueError, match=r"a strategy named 'gradmatch' is already registered"):

        @register_strategy("gradmatch")
        class Impostor(SelectionStrategy):
            pass

    with pytest.raises(TypeError, match="not a SelectionStrategy subclass"):
        register_strategy("test-not-a-class")(object)
    with pytest.raises(ValueError, match=r"sbp_strategy_modules names 'no_such_module_xyz'"):
        SelectiveBackpropConfig(output_dir="/tmp/unused", report_to="none", sbp_strategy_modules=["no_such_module_xyz"])


def test_built_in_strategies_declare_what_they_need():
    assert strategy_class("gradmatch").needs_scoring and strategy_class("loss").needs_scoring
    assert not strategy_class("random").needs_scoring and not strategy_class("none").selective
    assert all(strategy_class(name).description for name in ("gradmatch", "loss", "random", "none"))
    assert "sbp_omp_ridge" in strategy_class("gradmatch").settings


def test_user_strategy_trains_the_weighted_subset_it_chose(tmp_path):
    data = tiny_dataset(n=8)
    batch = collated(data, range(8))
    model = tiny_bert()
    trainer = SelectiveBackpropTrainer(model=model, args=make_args(tmp_path, sbp_keep=0.5), train_dataset=data)
    trainer.current_gradient_accumulation_steps = 1
    # The reference: the rows of lowest loss (scoring pass in eval mode, no dropout here), rotated by 1.
    losses = F.cross_entropy(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach(),
        batch["labels"],
        reduction="none",
    )
    chosen = torch.argsort(losses, stable=True).roll(1)[:4]
    weights = torch.tensor([1.0, 2.0, 1.0, 2.0])
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"][chosen], attention_mask=batch["attention_mask"][chosen]).logits
    ((weights * F.cross_entropy(logits, batch["labels"][chosen], reduction="none")).sum() / 4).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    trainer.training_step(model, batch)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    record = trainer.last_selection
    assert record.scored and record.subset_size == 4 and record.batch_size == 8 and record.selective

    # observe() saw the gradient forward of the chosen rows: the head's input reproduces the logits through the
    # head, and the losses are those rows' cross-entropies.
    (indices, subset) = trainer.strategy.observed[-1]
    assert torch.equal(indices, chosen)
    assert subset.n == 4 and torch.equal(subset.labels, batch["labels"][chosen])
    torch.testing.assert_close(model.classifier(subset.features), subset.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        subset.losses, F.cross_entropy(logits.detach(), batch["labels"][chosen], reduction="none")
    )
    assert subset.gram.shape == (4, 4)


def test_a_strategy_without_scoring_gets_no_scoring_pass(tmp_path):
    model = tiny_bert()
    trainer = SelectiveBackpropTrainer(
        model=model, args=make_args(tmp_path, sbp_strategy="test-first-rows"), train_dataset=tiny_dataset()
    )
    calls = []
    model.bert.register_forward_hook(lambda module, args, output: calls.append(torch.is_grad_enabled()))
    trainer.train()
    assert calls == [True] * 4  # one gradient forward per step, no no-grad scoring forward
    assert not trainer.runs_scoring_pass and trainer.last_selection.subset_size == 4


def test_a_broken_selection_is_a_clear_error(tmp_path):
    @register_strategy("test-duplicates")
    class Duplicates(SelectionStrategy):
        def select(self, batch, k):
            return torch.zeros(k, dtype=torch.long), torch.ones(k)

    trainer = SelectiveBackpropTrainer(
        model=tiny_bert(), args=make_args(tmp_path, sbp_strategy="test-duplicates"), train_dataset=tiny_dataset()
    )
    with pytest.raises(
        ValueError, match=r"strategy 'test-duplicates' returned 4 indices .* distinct index in \[0, 8\)"
    ):
        trainer.train()


class StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _trainer(tmp_path, name: str, **overrides) -> SelectiveBackpropTrainer:
    args = make_args(tmp_path / name, max_steps=6, save_strategy="steps", save_steps=3, **overrides)
    return SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())


def test_user_strategy_resumes_exactly_with_its_state(tmp_path):
    reference = _trainer(tmp_path, "reference")
    reference.train()
    interrupted = _trainer(tmp_path, "interrupted")
    interrupted.add_callback(StopAfter(3))
    interrupted.train()
    checkpoint = tmp_path / "interrupted" / "out" / "checkpoint-3"
    saved = torch.load(checkpoint / SBP_STATE_NAME.format(0), weights_only=True)
    assert saved["strategy"] == "test-rotating-loss" and saved["strategy_state"] == {"batches": 3}

    resumed = _trainer(tmp_path, "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.strategy.batches == reference.strategy.batches == 6
    for name, value in params(reference.model).items():
        assert torch.equal(value, params(resumed.model)[name]), name

    # Negative control: the same resume without the strategy's state rotates differently and diverges.
    os.remove(checkpoint / SBP_STATE_NAME.format(0))
    stateless = _trainer(tmp_path, "stateless")
    stateless.train(resume_from_checkpoint=str(checkpoint))
    assert stateless.strategy.batches == 3
    assert any(not torch.equal(v, params(stateless.model)[k]) for k, v in params(reference.model).items())


def test_user_strategy_is_named_in_the_model_card(tmp_path):
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=make_args(tmp_path), train_dataset=tiny_dataset())
    trainer.train()
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| strategy (`sbp_strategy`) | test-rotating-loss | all |" in card
    head_row = next(line for line in card.splitlines() if "(`sbp_head_module`)" in line)
    assert "test-rotating-loss" in head_row and "classifier" in head_row  # from the strategy's declared settings


def test_train_returns_the_run_statistics_and_starts_them_afresh(tmp_path):
    trainer = SelectiveBackpropTrainer(
        model=tiny_bert(), args=make_args(tmp_path, sbp_strategy="random"), train_dataset=tiny_dataset()
    )
    first = trainer.train()
    assert first.metrics["train_sbp/selective_steps"] == 4 and first.metrics["train_sbp/backprop_fraction"] == 0.5
    assert trainer.sbp_backprop_examples == 16
    second = trainer.train()
    assert second.metrics["train_sbp/selective_steps"] == 4  # not 8: a new run
    assert trainer.sbp_backprop_examples == 16


def test_select_batch_with_none_records_no_selection(tmp_path):
    data = tiny_dataset(n=8)
    trainer = SelectiveBackpropTrainer(
        model=tiny_bert(), args=make_args(tmp_path, sbp_strategy="none"), train_dataset=data
    )
    indices, weights = trainer.select_batch(trainer.model, collated(data, range(8)))
    assert torch.equal(indices, torch.arange(8)) and torch.equal(weights, torch.ones(8))
    assert not trainer.last_selection.selective and trainer.last_selection.subset_size == 8


USER_MODULE = """
import torch
from hf_sbp import SelectionStrategy, register_strategy


@register_strategy("test-highest-loss-module")
class HighestLoss(SelectionStrategy):
    needs_scoring = True

    def select(self, batch, k):
        return torch.argsort(batch.losses.cpu(), descending=True)[:k], torch.ones(k)
"""


def test_run_glue_trains_a_strategy_from_a_module_on_the_path(tmp_path, monkeypatch):
    (tmp_path / "my_strategies_mod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    model_dir = save_tiny_model(str(tmp_path / "model"))
    train = write_rows(str(tmp_path / "train.csv"), single_sentence_rows(32, seed=0))
    val = write_rows(str(tmp_path / "val.csv"), single_sentence_rows(16, seed=1))
    flags = ["--model_name_or_path", model_dir, "--train_file", train, "--validation_file", val, "--do_train"]
    flags += ["--max_steps", "2", "--sbp_strategy_modules", "my_strategies_mod"]
    flags += ["--sbp_strategy", "test-highest-loss-module", *tiny_training_flags(str(tmp_path / "out"))]
    load_run_glue().main(flags)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| strategy (`sbp_strategy`) | test-highest-loss-module | all |" in card


def test_the_documented_example_strategy_trains(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    usage = open(os.path.join(root, "docs", "usage.md")).read()
    section = usage.split("## Your own strategy", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(code, "docs/usage.md", "exec"), namespace)
    trainer = SelectiveBackpropTrainer(
        model=tiny_bert(), args=make_args(tmp_path, sbp_strategy="largest-residual"), train_dataset=tiny_dataset()
    )
    trainer.train()
    assert trainer.last_selection.scored and trainer.last_selection.subset_size == 4


@pytest.mark.parametrize(("normalization", "dtype"), [("none", "float32"), ("sum_constrained", "float64")])
def test_a_gradmatch_strategy_readies_omp_for_its_gram_dtype_when_built(tmp_path, normalization, dtype):
    # OMP's loop is compiled (first use on a machine) or loaded from Numba's cache on first call; building the
    # strategy must do that for the Gram matrix it will pass, so that the first training step does not pay for it.
    # A fresh interpreter, since this one has run OMP already.
    code = textwrap.dedent(f"""
        from hf_sbp import SelectiveBackpropConfig
        from hf_sbp.core.omp_loop import omp_loop
        from hf_sbp.strategies import strategy_class
        sbp = SelectiveBackpropConfig(output_dir={str(tmp_path)!r}, sbp_strategy="gradmatch",
                                      sbp_weight_normalization={normalization!r}, report_to="none")
        assert not omp_loop.signatures
        strategy_class("gradmatch")(sbp)
        print(sorted(str(signature[0].dtype) for signature in omp_loop.signatures))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    assert out.stdout.split("\n")[-2] == str([dtype])
