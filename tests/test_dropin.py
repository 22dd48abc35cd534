"""Drop-in parity with ``transformers.Trainer``: with ``none``, and with ``random`` at keep 1.0 (every row, weight
1: a full batch), SelectiveBackpropTrainer must train, evaluate, predict, log and save exactly as Trainer does,
across the features users combine with it. And the loss is never silently different: the model's own loss is
used or checked."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest
import torch
from tiny_models import tiny_bert, tiny_bert_config, tiny_dataset
from torch import nn
from transformers import (
    BertForSequenceClassification,
    EarlyStoppingCallback,
    GPT2Config,
    GPT2LMHeadModel,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_sbp import SelectiveBackpropArguments, SelectiveBackpropConfig, SelectiveBackpropTrainer
from hf_sbp.checkpoint_state import SBP_STATE_NAME

# The selection settings that must reproduce Trainer exactly.
PARITY = {"none": {"sbp_strategy": "none"}, "random-keep-1": {"sbp_strategy": "random", "sbp_keep": 1.0}}
ACCURACY_SEED = 0


def base_values(out: str, **overrides) -> dict:
    values = dict(
        output_dir=out, per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return values


def plain_args(out, cls=TrainingArguments, **overrides):
    return cls(**base_values(str(out), **overrides))


def sbp_args(out, sbp: dict, **overrides) -> SelectiveBackpropConfig:
    return SelectiveBackpropConfig(**base_values(str(out), **overrides), **sbp)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def train_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry or "train_loss" in entry]


def assert_same_logs(ours, plain, extra_keys: bool) -> None:
    """The same logged values of every Trainer key; the selection metrics are the only additions."""
    mine, theirs = ours.state.log_history, plain.state.log_history
    assert len(mine) == len(theirs)
    timing = ("runtime", "per_second", "total_flos")
    for a, b in zip(mine, theirs, strict=True):
        assert set(b) <= set(a)
        added = set(a) - set(b)
        assert all(key.startswith(("sbp/", "train_sbp/")) for key in added), added
        assert extra_keys or not added
        for key, value in b.items():
            if not key.endswith(timing):
                assert a[key] == value, (key, a[key], value)


def files(folder) -> set[str]:
    return {os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names}


def metric(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


@pytest.mark.parametrize("case", list(PARITY))
def test_training_with_accumulation_callbacks_and_metrics_equals_trainer(tmp_path, case):
    # Gradient accumulation over uneven micro-batches, evaluation with compute_metrics, early stopping on it with
    # the best model loaded at the end, and checkpoints.
    train, evaluation = tiny_dataset(n=44, seed=1), tiny_dataset(n=16, seed=2)
    options = dict(
        per_device_train_batch_size=6, gradient_accumulation_steps=3, max_steps=6, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, load_best_model_at_end=True, metric_for_best_model="accuracy",
    )  # fmt: skip

    def build(cls, args):
        return cls(
            model=tiny_bert(), args=args, train_dataset=train, eval_dataset=evaluation, compute_metrics=metric,
            callbacks=[EarlyStoppingCallback(early_stopping_patience=1)],
        )  # fmt: skip

    plain = build(Trainer, plain_args(tmp_path / "plain", **options))
    plain_output = plain.train()
    ours = build(SelectiveBackpropTrainer, sbp_args(tmp_path / "ours", PARITY[case], **options))
    our_output = ours.train()
    assert_same_parameters(state(ours.model), state(plain.model))
    assert our_output.global_step == plain_output.global_step and our_output.training_loss == plain_output.training_loss
    assert_same_logs(ours, plain, extra_keys=case != "none")
    added = files(tmp_path / "ours") - files(tmp_path / "plain")
    assert all(os.path.basename(name) == SBP_STATE_NAME.format(0) for name in added), added
    mine, theirs = ours.evaluate(), plain.evaluate()
    assert {k: v for k, v in mine.items() if "runtime" not in k and "per_second" not in k} == {
        k: v for k, v in theirs.items() if "runtime" not in k and "per_second" not in k
    }


@pytest.mark.parametrize("case", list(PARITY))
def test_model_init_and_args_changed_after_construction(tmp_path, case):
    results = []
    for cls, args in ((Trainer, plain_args(tmp_path / "plain")), (SelectiveBackpropTrainer, None)):
        args = args or sbp_args(tmp_path / "ours", PARITY[case])
        trainer = cls(model_init=lambda: tiny_bert(seed=3), args=args, train_dataset=tiny_dataset())
        assert trainer.args is args
        args.max_steps = 2  # honoured, as Trainer honours it: the arguments are not copied
        trainer.train()
        assert trainer.state.global_step == 2
        results.append(state(trainer.model))
    assert_same_parameters(*results)


@pytest.mark.parametrize("case", list(PARITY))
def test_evaluation_and_prediction_only(tmp_path, case):
    evaluation = tiny_dataset(n=20, seed=4)
    plain = Trainer(model=tiny_bert(), args=plain_args(tmp_path / "p"), compute_metrics=metric)
    ours = SelectiveBackpropTrainer(
        model=tiny_bert(), args=sbp_args(tmp_path / "o", PARITY[case]), compute_metrics=metric
    )
    strip = lambda m: {k: v for k, v in m.items() if not k.endswith(("runtime", "per_second", "_time"))}  # noqa: E731
    assert strip(ours.evaluate(evaluation)) == strip(plain.evaluate(evaluation))
    mine, theirs = ours.predict(evaluation), plain.predict(evaluation)
    assert (mine.predictions == theirs.predictions).all() and strip(mine.metrics) == strip(theirs.metrics)


@dataclasses.dataclass
class MyArguments(TrainingArguments):
    my_field: int = 7


@dataclasses.dataclass
class MySelectiveArguments(Seq2SeqTrainingArguments, SelectiveBackpropArguments):
    pass


@pytest.mark.parametrize("cls", [Seq2SeqTrainingArguments, MyArguments])
def test_training_arguments_subclasses_are_kept_and_train_like_trainer(tmp_path, cls):
    results = []
    for trainer_cls, out in ((Trainer, "plain"), (SelectiveBackpropTrainer, "ours")):
        args = plain_args(tmp_path / out, cls=cls)
        trainer = trainer_cls(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
        assert trainer.args is args
        if trainer_cls is SelectiveBackpropTrainer:
            # Without sbp_* fields the arguments mean the documented defaults: gradmatch at keep 0.5.
            assert trainer.sbp_args.sbp_strategy == "gradmatch" and trainer.sbp_args.sbp_effective_keep == 0.5
            trainer.sbp_args.sbp_strategy = "none"
        trainer.train()
        results.append(state(trainer.model))
    assert_same_parameters(*results)


def test_a_class_inheriting_both_opts_into_the_sbp_fields(tmp_path):
    args = MySelectiveArguments(**base_values(str(tmp_path)), sbp_strategy="random", sbp_keep=0.25)
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    assert trainer.args is args and trainer.sbp_args is args
    trainer.train()
    assert trainer.last_selection.subset_size == 2 and trainer.sbp_backprop_examples == 8


def test_sbp_values_changed_after_construction_are_validated_when_training_starts(tmp_path):
    args = sbp_args(tmp_path, {"sbp_strategy": "random"})
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    args.sbp_keep = 5.0
    with pytest.raises(ValueError, match=r"sbp_keep=5.0 is invalid; it must be a number in \(0, 1\]"):
        trainer.train()
    args.sbp_keep, args.sbp_strategy = 0.5, "none"  # a new strategy is honoured too
    trainer.train()
    assert trainer.strategy.name == "none" and trainer.sbp_backprop_examples == 32


def test_head_module_under_random_is_reported_unused(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_sbp"):
        SelectiveBackpropTrainer(
            model=tiny_bert(), args=sbp_args(tmp_path, {"sbp_strategy": "random", "sbp_head_module": "classifier"}),
            train_dataset=tiny_dataset(),
        )  # fmt: skip
    assert any("sbp_head_module='classifier' is not used" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", list(PARITY))
def test_resuming_a_checkpoint_written_by_the_plain_trainer(tmp_path, case):
    reference = Trainer(model=tiny_bert(), args=plain_args(tmp_path / "ref", max_steps=6), train_dataset=tiny_dataset())
    reference.train()
    first = Trainer(
        model=tiny_bert(), args=plain_args(tmp_path / "plain", max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=tiny_dataset(),
    )  # fmt: skip
    first.add_callback(StopAt(3))
    first.train()
    resumed = SelectiveBackpropTrainer(
        model=tiny_bert(), args=sbp_args(tmp_path / "ours", PARITY[case], max_steps=6), train_dataset=tiny_dataset()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-3"))
    assert_same_parameters(state(resumed.model), state(reference.model))


class StopAt:
    """A callback that stops training after ``step`` steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("case", list(PARITY))
def test_torch_compile_on_cpu(tmp_path, case):
    options = dict(torch_compile=True, torch_compile_backend="eager", max_steps=2)
    plain = Trainer(model=tiny_bert(), args=plain_args(tmp_path / "p", **options), train_dataset=tiny_dataset())
    plain.train()
    ours = SelectiveBackpropTrainer(
        model=tiny_bert(), args=sbp_args(tmp_path / "o", PARITY[case], **options), train_dataset=tiny_dataset()
    )
    ours.train()
    assert_same_parameters(state(ours.model), state(plain.model))


# ---- the loss is never silently different ---------------------------------------------------------


class OverriddenLoss(SelectiveBackpropTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss * 0.0, outputs) if return_outputs else outputs.loss * 0.0


@pytest.mark.parametrize("strategy", ["none", "random", "loss"])
def test_a_compute_loss_override_is_honoured(tmp_path, strategy):
    model = tiny_bert()
    before = state(model)
    trainer = OverriddenLoss(model=model, args=sbp_args(tmp_path, {"sbp_strategy": strategy}, weight_decay=0.0),
                             train_dataset=tiny_dataset())  # fmt: skip
    trainer.train()
    assert_same_parameters(state(model), before)  # a zero loss moves nothing, whatever the strategy


def test_a_weighted_strategy_refuses_an_override_that_may_drop_its_weights(tmp_path):
    with pytest.raises(
        ValueError, match=r"OverriddenLoss overrides compute_loss, and sbp_strategy='gradmatch' weights"
    ):
        OverriddenLoss(model=tiny_bert(), args=sbp_args(tmp_path, {}), train_dataset=tiny_dataset())

    class Declared(OverriddenLoss):
        supports_selection_weights = True

    Declared(model=tiny_bert(), args=sbp_args(tmp_path, {}), train_dataset=tiny_dataset())  # accepted

    class CallsSuper(SelectiveBackpropTrainer):
        supports_selection_weights = True
        seen = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.seen.append(self.selection_weights)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # 'subset_size' weights sum to the subset size, so the weights seen can be recognised as the selection's.
    args = sbp_args(tmp_path, {"sbp_weight_normalization": "subset_size"})
    trainer = CallsSuper(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    trainer.train()
    weights = [w for w in CallsSuper.seen if w is not None]
    assert weights and all(w.shape == (4,) and abs(float(w.sum()) - 4) < 1e-4 for w in weights)


class TwoOutputRegression(nn.Module):
    """Two regression outputs with float labels and its own MSE loss: the trainer's rule would say BCE."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = BertForSequenceClassification(tiny_bert_config(num_labels=2))
        self.config = self.bert.config

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.bert(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = None if labels is None else nn.functional.mse_loss(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def regression_data(n: int = 32):
    data = tiny_dataset(n=n)
    targets = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)) * 3
    return data.remove_columns("labels").add_column("labels", targets.tolist())


@pytest.mark.parametrize("strategy", ["gradmatch", "loss"])
def test_a_model_with_another_loss_is_refused_naming_both_values(tmp_path, strategy):
    torch.manual_seed(0)
    with pytest.raises(
        ValueError, match=r"the model's own loss \([\d.]+\) is not the mean .*'multi_label_classification'"
    ):
        SelectiveBackpropTrainer(
            model=TwoOutputRegression(), args=sbp_args(tmp_path, {"sbp_strategy": strategy, "sbp_keep": 1.0}),
            train_dataset=regression_data(),
        )  # fmt: skip


def test_random_trains_a_model_with_another_loss_with_its_own_loss(tmp_path):
    results = []
    for cls, args in ((Trainer, plain_args(tmp_path / "p")), (SelectiveBackpropTrainer, None)):
        torch.manual_seed(0)
        model = TwoOutputRegression()
        args = args or sbp_args(tmp_path / "o", PARITY["random-keep-1"])
        output = cls(model=model, args=args, train_dataset=regression_data()).train()
        results.append((state(model), output.training_loss))
    assert_same_parameters(results[0][0], results[1][0])
    assert results[0][1] == results[1][1] > 1.0  # MSE on targets of scale 3, not a BCE near 0.69


def causal_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def lm_data():
    data = tiny_dataset(n=32).remove_columns(["labels", "attention_mask"])
    return data.add_column("labels", data["input_ids"])


def test_a_causal_lm_trains_with_random_and_is_refused_by_scoring_strategies_when_built(tmp_path):
    results = []
    for cls, args in ((Trainer, plain_args(tmp_path / "p")), (SelectiveBackpropTrainer, None)):
        model = causal_lm()
        args = args or sbp_args(tmp_path / "o", PARITY["random-keep-1"])
        cls(model=model, args=args, train_dataset=lm_data()).train()
        results.append(state(model))
    assert_same_parameters(*results)
    half = SelectiveBackpropTrainer(
        model=causal_lm(), args=sbp_args(tmp_path / "h", {"sbp_strategy": "random"}), train_dataset=lm_data()
    )
    half.train()
    assert half.sbp_backprop_examples == 16
    with pytest.raises(ValueError, match=r"no nn.Linear with out_features equal to num_labels=2|logits of shape"):
        SelectiveBackpropTrainer(model=causal_lm(), args=sbp_args(tmp_path / "g", {}), train_dataset=lm_data())


# ---- peft LoRA -------------------------------------------------------------------------------------


def lora_bert():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    return peft.get_peft_model(tiny_bert(), config)


@pytest.mark.parametrize("case", list(PARITY))
def test_lora_parity(tmp_path, case):
    plain = Trainer(model=lora_bert(), args=plain_args(tmp_path / "p"), train_dataset=tiny_dataset())
    plain.train()
    ours = SelectiveBackpropTrainer(
        model=lora_bert(), args=sbp_args(tmp_path / "o", PARITY[case]), train_dataset=tiny_dataset()
    )
    ours.train()
    assert_same_parameters(state(ours.model), state(plain.model))


@pytest.mark.parametrize("strategy", ["gradmatch", "loss", "random"])
def test_lora_models_train_with_every_strategy_and_resume_exactly(tmp_path, strategy):
    def build(name, **overrides):
        args = sbp_args(tmp_path / name, {"sbp_strategy": strategy}, max_steps=4, **overrides)
        return SelectiveBackpropTrainer(model=lora_bert(), args=args, train_dataset=tiny_dataset())

    reference = build("reference")
    before = state(reference.model)
    reference.train()
    if strategy != "random":
        assert "modules_to_save" in reference.head_name  # the trained copy of the head, inside the peft wrapper
        assert reference.last_selection.scored and reference.last_selection.subset_size == 4
    after = state(reference.model)
    moved = [name for name in after if not torch.equal(after[name], before[name])]
    assert moved and all("lora_" in name or "modules_to_save" in name for name in moved)

    interrupted = build("interrupted", save_strategy="steps", save_steps=2)
    interrupted.add_callback(StopAt(2))
    interrupted.train()
    resumed = build("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "interrupted" / "checkpoint-2"))
    assert_same_parameters(state(resumed.model), after)


def test_training_args_bin_loads_where_hf_sbp_is_not_installed(tmp_path):
    import subprocess
    import sys

    args = sbp_args(tmp_path / "out", {"sbp_strategy": "random", "sbp_keep": 0.25})
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    trainer.train()
    trainer.save_model()
    assert trainer.args is args and isinstance(trainer.args, SelectiveBackpropConfig)  # the live object is untouched
    probe = (
        "import sys; sys.modules['hf_sbp'] = None\n"  # any import of hf_sbp now fails
        "import torch, transformers\n"
        f"args = torch.load({str(tmp_path / 'out' / 'training_args.bin')!r}, weights_only=False)\n"
        "assert type(args) is transformers.TrainingArguments, type(args)\n"
        "print(args.sbp_strategy, args.sbp_keep, args.learning_rate)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["random", "0.25", "0.001"]
