"""An interrupted and resumed run ends bit-for-bit where an uninterrupted run ends, for every strategy.

The reference is the uninterrupted run itself. The interruption is a callback that stops training
right after the checkpoint at step ``k`` is written (not ``max_steps``, which would change the
learning-rate schedule and the training fraction that ``sbp_start``/``sbp_end`` see); a fresh trainer,
built from scratch, then resumes from ``checkpoint-k``. Dropout is on (seeded), so the global random
state has to be restored as well as the selection's own generator and loss history.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_bert
from transformers import BertForSequenceClassification, TrainerCallback

from hf_sbp import SelectiveBackpropConfig, SelectiveBackpropTrainer
from hf_sbp.checkpoint_state import SBP_STATE_NAME

BATCH = 8
EXAMPLES = 48  # 6 batches per epoch


def tiny_model(dropout: float = 0.1) -> BertForSequenceClassification:
    return tiny_bert(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def tiny_dataset(n: int = EXAMPLES, seq_len: int = 8) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(1, 100, (n, seq_len), generator=generator).tolist(),
            "attention_mask": [[1] * seq_len] * n,
            "labels": torch.randint(0, 3, (n,), generator=generator).tolist(),
        }
    )


class StopAfter(TrainerCallback):
    """Simulates an interruption: training stops right after step ``step`` (and its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def make_trainer(output_dir: str, options: dict, save_steps: int | None = None, stop_at: int | None = None):
    args = SelectiveBackpropConfig(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH,
        num_train_epochs=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=3,
        **options,
    )
    callbacks = [StopAfter(stop_at)] if stop_at is not None else None
    return SelectiveBackpropTrainer(model=tiny_model(), args=args, train_dataset=tiny_dataset(), callbacks=callbacks)


def interrupted_then_resumed(tmp_path, options: dict, stop_at: int, delete_sbp_state: bool = False):
    first = make_trainer(str(tmp_path / "interrupted"), options, save_steps=stop_at, stop_at=stop_at)
    first.train()
    assert first.state.global_step == stop_at, "the interruption did not happen where intended"
    checkpoint = tmp_path / "interrupted" / f"checkpoint-{stop_at}"
    state_file = checkpoint / SBP_STATE_NAME.format(0)
    assert state_file.is_file()
    if delete_sbp_state:
        os.remove(state_file)
    resumed = make_trainer(str(tmp_path / "resumed"), options)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    return resumed


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[key], sb[key]) for key in sa)


CASES = {
    "gradmatch": ({"sbp_strategy": "gradmatch"}, 4),
    "loss-composer": ({"sbp_strategy": "loss", "sbp_loss_variant": "composer"}, 4),
    "loss-jiang": ({"sbp_strategy": "loss", "sbp_loss_variant": "jiang"}, 4),
    "loss-jiang-epoch-boundary": ({"sbp_strategy": "loss", "sbp_loss_variant": "jiang"}, 6),
    "random": ({"sbp_strategy": "random"}, 4),
    "random-window-interrupt": ({"sbp_strategy": "random", "sbp_start": 0.25, "sbp_end": 0.8, "sbp_interrupt": 3}, 5),
    "gradmatch-accumulation": ({"sbp_strategy": "gradmatch", "gradient_accumulation_steps": 2}, 2),
    "none": ({"sbp_strategy": "none"}, 4),
    # Stopped in the second epoch, where the selection reads the per-example cache of the first.
    "stale-gradmatch": ({"sbp_strategy": "stale-gradmatch", "sbp_max_staleness": 1.5}, 8),
    "stale-loss-accumulation": ({"sbp_strategy": "stale-loss", "gradient_accumulation_steps": 2}, 4),
    # Importance sampling: the switch's estimate (here it turns sampling on from the second step) must resume too.
    "importance": ({"sbp_strategy": "importance", "sbp_importance_break_even": 1.0}, 4),
    "importance-switch-off": ({"sbp_strategy": "importance"}, 4),
    "stale-importance": ({"sbp_strategy": "stale-importance", "sbp_max_staleness": 1.5}, 8),
    # RHO-LOSS: the irreducible losses come from the checkpoint (see test_rho_loss.py for the error without them).
    "rho-loss": ({"sbp_strategy": "rho-loss"}, 4),
    "stale-rho-loss-probe": ({"sbp_strategy": "stale-rho-loss", "sbp_il_model": "linear_probe"}, 8),
    # Dataset-level pruning: stopped inside the pruned second epoch (its plan must be the saved one, since the losses
    # changed after it was drawn), at the first epoch's end, with accumulation, and in a max_steps run of 3 epochs.
    "infobatch": ({"sbp_strategy": "infobatch"}, 8),
    "infobatch-epoch-boundary": ({"sbp_strategy": "infobatch"}, 6),
    "random-prune-accumulation": ({"sbp_strategy": "random-prune", "gradient_accumulation_steps": 4}, 3),
    "infobatch-max-steps": ({"sbp_strategy": "infobatch", "max_steps": 14}, 11),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_equals_uninterrupted_run(tmp_path, case):
    options, stop_at = CASES[case]
    reference = make_trainer(str(tmp_path / "reference"), options)
    reference.train()
    resumed = interrupted_then_resumed(tmp_path, options, stop_at)

    assert resumed.state.global_step == reference.state.global_step
    changed = not same_parameters(reference.model, tiny_model())
    assert changed, "training did not move the parameters, so the comparison would prove nothing"
    assert same_parameters(reference.model, resumed.model)
    assert resumed.sbp_backprop_examples == reference.sbp_backprop_examples
    assert torch.equal(resumed.selection_generator.get_state(), reference.selection_generator.get_state())
    assert resumed.strategy.state_dict() == reference.strategy.state_dict()
    if reference.irreducible_losses is not None:
        assert torch.equal(resumed.irreducible_losses, reference.irreducible_losses)
    if reference.pruning_history is not None:
        assert resumed.pruning_history.epochs == reference.pruning_history.epochs
        assert len(reference.pruning_history.epochs) >= 2 and reference.pruning_history.pruned > 0
    if options["sbp_strategy"] != "none":
        # The selection metrics of the steps after the interruption match the reference's.
        fractions = [
            log["sbp/backprop_fraction"] for log in reference.state.log_history if "sbp/backprop_fraction" in log
        ]
        resumed_fractions = [
            log["sbp/backprop_fraction"] for log in resumed.state.log_history if "sbp/backprop_fraction" in log
        ]
        assert resumed_fractions == fractions[-len(resumed_fractions) :]


@pytest.mark.parametrize("case", ["random", "loss-jiang", "stale-gradmatch", "infobatch"])
def test_without_selection_state_the_resumed_run_differs(tmp_path, case, caplog):
    """Negative control: the state in ``sbp_state_rank0.pt`` is what makes the resume exact. Without it
    the selection's generator restarts from its seed (and Jiang's loss history is empty), the resumed
    run diverges from the uninterrupted one, and the trainer says so."""
    options, stop_at = CASES[case]
    reference = make_trainer(str(tmp_path / "reference"), options)
    reference.train()
    with caplog.at_level(logging.WARNING, logger="hf_sbp"):
        resumed = interrupted_then_resumed(tmp_path, options, stop_at, delete_sbp_state=True)
    assert not same_parameters(reference.model, resumed.model)
    assert any("will not reproduce an uninterrupted one" in record.getMessage() for record in caplog.records)
