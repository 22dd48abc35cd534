"""The selection state each process saves beside a checkpoint, so that a resumed run reproduces an uninterrupted one.

The file ``sbp_state_rank{i}.pt`` of process ``i`` holds the strategy's name and every ``sbp_*`` setting (a resumed
run must share them), the selection generator's state, the strategy's own
:meth:`~hf_sbp.SelectionStrategy.state_dict`, the head's name, the examples backpropagated so far and the whole-run
selection metrics (and, where the strategy has them, the example cache, the pruning history and the irreducible
losses). It is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

SBP_STATE_NAME = "sbp_state_rank{}.pt"
TRAINING_ARGS_NAME = "training_args.bin"  # as transformers.trainer names it


def save_selection_state(folder: str, process_index: int, state: dict[str, Any]) -> None:
    """Write ``state`` as ``folder/sbp_state_rank{process_index}.pt`` (creating the folder)."""
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, SBP_STATE_NAME.format(process_index)))


def load_selection_state(folder: str, process_index: int, warn_if_missing: bool = True) -> dict[str, Any] | None:
    """The state :func:`save_selection_state` wrote in ``folder``; ``None`` (with a warning) if there is none."""
    path = os.path.join(folder, SBP_STATE_NAME.format(process_index))
    if not os.path.isfile(path):
        if warn_if_missing:
            logger.warning(
                f"{path} is missing: the selection's random state and the strategy's state start afresh, so the "
                "resumed run will not reproduce an uninterrupted one exactly."
            )
        return None
    return torch.load(path, weights_only=True)


def selection_settings(sbp_args: Any) -> dict[str, Any]:
    """The ``sbp_*`` settings of a run that a resumed run must share (all but ``sbp_strategy_modules``)."""
    from .config import SelectiveBackpropArguments

    names = [f.name for f in dataclasses.fields(SelectiveBackpropArguments) if f.name != "sbp_strategy_modules"]
    settings = {name: getattr(sbp_args, name) for name in names}
    settings["sbp_keep"] = sbp_args.sbp_effective_keep  # unset means the strategy's default: compare what applies
    return settings


def check_same_settings(state: dict[str, Any], current: dict[str, Any], checkpoint: str) -> None:
    """Raise if the checkpoint's selection settings differ from this run's: resuming would mix two runs (and the
    model card would report one run's settings with the other's statistics)."""
    saved = dict(state.get("settings") or {"sbp_strategy": state.get("strategy")})
    differ = [f"{name}={saved[name]!r} there, {value!r} now" for name, value in current.items() if name in saved
              and saved[name] != value]  # fmt: skip
    if differ:
        raise ValueError(
            f"the checkpoint {checkpoint} was written with other selection settings ({'; '.join(differ)}), so "
            "resuming it would mix two runs. Resume with the checkpoint's settings, or start afresh in another "
            "output_dir (run_glue.py: --overwrite_output_dir ignores the checkpoints there)."
        )


def trainer_state(trainer: Any) -> dict[str, Any]:
    """The selection state of a ``SelectiveBackpropTrainer``'s process, as :func:`save_selection_state` writes it:
    the settings, the generator's state, the strategy's state, the head's name, the examples backpropagated, the
    whole-run metrics, the example cache, the pruning history and the irreducible losses."""
    strategy, cache = trainer.strategy, trainer._cache
    return dict(
        strategy=trainer.sbp_args.sbp_strategy,
        settings=selection_settings(trainer.sbp_args),
        generator=trainer.selection_generator.get_state(),
        strategy_state=strategy.state_dict(),
        head_name=trainer.head_name,
        backprop_examples=trainer.sbp_backprop_examples,
        metrics=trainer._metrics.state_dict(),
        example_cache=cache.state_dict() if cache is not None else None,
        pruning=trainer.pruning_history.state_dict() if trainer.pruning_history is not None else None,
        irreducible_losses=trainer._il.state_dict(),
    )


def restore_trainer_state(trainer: Any, checkpoint: str) -> None:
    """Restore what :func:`trainer_state` saved in ``checkpoint`` for this process, after checking that the run's
    settings are the checkpoint's; a missing file is a warning (for a selective strategy) and restores nothing."""
    strategy, cache = trainer.strategy, trainer._cache
    state = load_selection_state(checkpoint, trainer.args.process_index, strategy.selective)
    if state is None:
        return
    check_same_settings(state, selection_settings(trainer.sbp_args), checkpoint)
    trainer.selection_generator.set_state(state["generator"])
    strategy.load_state_dict(state["strategy_state"])
    trainer.sbp_backprop_examples = int(state["backprop_examples"])
    trainer._metrics.load_state_dict(state["metrics"])
    trainer._head_name = trainer._head_name or state["head_name"]
    if cache is not None and state.get("example_cache") is not None:
        cache.load_state_dict(state["example_cache"])
    if trainer.pruning_history is not None and state.get("pruning") is not None:
        trainer.pruning_history.load_state_dict(state["pruning"])
    trainer._il.load_state_dict(state.get("irreducible_losses"))


def portable_arguments(args: Any) -> Any:
    """A shallow copy of ``args`` whose class is the nearest ``transformers`` class it derives from (its ``sbp_*``
    and other extra values kept as attributes), so that a pickled ``training_args.bin`` loads where ``hf_sbp`` is not
    installed. Resuming never reads that file, so nothing else depends on its class."""
    portable = copy.copy(args)
    portable.__class__ = next(cls for cls in type(args).__mro__ if cls.__module__.startswith("transformers."))
    return portable


class PortableArgumentsMixin:
    """Writes ``training_args.bin`` with :func:`portable_arguments` wherever ``Trainer._save`` writes it."""

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        folder = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            torch.save(portable_arguments(self.args), os.path.join(folder, TRAINING_ARGS_NAME))
