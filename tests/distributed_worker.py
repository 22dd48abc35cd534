"""One process of the distributed test: run under ``torchrun --nproc_per_node 2`` by ``test_distributed.py``.

For each strategy named on the command line it trains a tiny random BERT with
``SelectiveBackpropTrainer`` under DDP (gloo, CPU) and writes ``<out>/<strategy>_rank<r>.json`` with
what it observed independently of the trainer's own bookkeeping: a forward pre-hook on the
unwrapped encoder records, for every forward pass, the rows it saw and whether autograd was on (the
scoring pass runs without autograd over the local batch, the gradient pass with autograd over the
subset), plus a digest of the final parameters and the trainer's log history.

``stale-gradmatch`` trains two epochs (half the rows): the second must select from the statistics cached in the
first, those of the rows the other rank saw included (the caches are exchanged), with no scoring pass.

``importance`` switches its scoring pass on after the first step, from an estimate every rank must share (a
scoring forward on one rank only would desynchronise DDP's buffer broadcasts); ``stale-importance`` trains two epochs
like ``stale-gradmatch``.

``rho-loss`` and ``stale-rho-loss`` compute their irreducible losses on every rank alike (same seed, no
collectives); ``stale-rho-loss`` trains two epochs.

``infobatch`` trains three epochs (``num_train_epochs``) over ``2 x world x batch`` rows: the epochs after the first
are pruned from losses both ranks recorded, so the ranks must agree on each epoch's plan (recorded at every step).

``test-uneven-scoring`` (defined here) has rows to score on one rank only after its first step: the other rank
must still run a scoring forward (on one row), or DDP's buffer broadcasts would pair with the wrong collectives.

Rank 1 also gets NaN logits in the scoring pass of step ``NAN_STEP`` (gradmatch only), so that one
process falls back to its full batch while the other selects: the collectives must still line up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from tiny_models import tiny_bert
from transformers import BertForSequenceClassification, TrainerCallback

from hf_sbp import SelectionStrategy, SelectiveBackpropConfig, SelectiveBackpropTrainer, register_strategy

PER_DEVICE_BATCH = 8
UNEVEN_RANK = 1


@register_strategy("test-uneven-scoring")
class UnevenScoring(SelectionStrategy):
    """A strategy with cached statistics whose rows to score differ across ranks: after the first step, rank
    ``UNEVEN_RANK`` scores its whole batch and the other none (as stale-* strategies may, once rows age
    differently). It keeps each batch's first k rows, whatever the scores."""

    needs_scoring = True
    uses_example_cache = True

    def rows_to_score(self, batch):
        if batch.step == 0 or self.args.process_index == UNEVEN_RANK:
            return torch.arange(batch.n)
        return torch.zeros(0, dtype=torch.long)

    def select(self, batch, k):
        return torch.arange(k), torch.ones(k)


STEPS = 4
KEEP = 0.5
NAN_STEP = 1
NAN_RANK = 1


def tiny_model(seed: int = 0) -> BertForSequenceClassification:
    return tiny_bert(seed=seed)


def tiny_dataset(n: int, seq_len: int = 8, seed: int = 1) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    # Column 0 holds the example's id (+1, to stay clear of the pad id), so the test can tell which
    # rows a forward pass saw.
    ids = torch.randint(1, 100, (n, seq_len), generator=generator)
    ids[:, 0] = torch.arange(n) % 99 + 1
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": [[1] * seq_len] * n,
            "labels": torch.randint(0, 3, (n,), generator=generator).tolist(),
        }
    )


class StepMarker(TrainerCallback):
    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.step = -1

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.calls.append({"step_begin": state.global_step})


def digest(model: torch.nn.Module) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def run(strategy: str, out: str, world_size: int, rank: int) -> None:
    model = tiny_model()
    calls: list[dict] = []

    def record(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append({"rows": input_ids[:, 0].tolist(), "grad": torch.is_grad_enabled(), "training": module.training})

    handle = model.bert.register_forward_pre_hook(record, with_kwargs=True)
    marker = StepMarker(calls)
    if strategy == "gradmatch" and rank == NAN_RANK:

        def nan_logits(module, args, output):
            if not module.training and marker.step == NAN_STEP:
                return torch.full_like(output, float("nan"))
            return None

        model.classifier.register_forward_hook(nan_logits)
    # loss: Composer's rule, with a full-batch step every third step (the same step on every rank).
    extra = {"sbp_loss_variant": "composer", "sbp_interrupt": 3} if strategy == "loss" else {}
    extra["max_steps"] = STEPS
    if strategy == "importance":  # tau >= 1 always: off at the first step (no estimate yet), then on
        extra["sbp_importance_break_even"] = 1.0
    if strategy == "infobatch":
        extra = {"num_train_epochs": 3, "max_steps": -1}
    initial = digest(model)
    args = SelectiveBackpropConfig(
        output_dir=os.path.join(out, f"run_{strategy}"),
        sbp_strategy=strategy,
        sbp_keep=None if strategy == "infobatch" else KEEP,
        per_device_train_batch_size=PER_DEVICE_BATCH,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
        **extra,
    )
    # stale-gradmatch and stale-importance: two epochs of STEPS / 2 steps each.
    epochs = 2 if strategy in ("stale-gradmatch", "stale-importance", "stale-rho-loss", "infobatch") else 1
    examples = PER_DEVICE_BATCH * world_size * STEPS // epochs
    trainer = SelectiveBackpropTrainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(examples),
        callbacks=[marker],
    )
    wrapped_type = None

    original = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        nonlocal wrapped_type
        wrapped_type = type(model).__name__
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = training_step
    plans: list[dict] = []

    class PlanRecorder(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            history = trainer.pruning_history
            if history is not None and history.current is not None:
                plans.append({"step": state.global_step, "epoch": history.current.epoch,
                              "order": history.current.order.tolist()})  # fmt: skip

    trainer.add_callback(PlanRecorder())
    trainer.train()
    handle.remove()
    result = {
        "rank": rank,
        "world_size": world_size,
        "wrapped_model_type": wrapped_type,
        "calls": calls,
        "param_digest": digest(trainer.model),
        "initial_param_digest": initial,
        "log_history": trainer.state.log_history,
        "backprop_examples": trainer.sbp_backprop_examples,
        "global_step": trainer.state.global_step,
        "plans": plans,
    }
    if trainer.irreducible_losses is not None:
        result["irreducible_losses"] = trainer.irreducible_losses.tolist()
    cache = trainer._cache
    if cache is not None:
        result["cache_rows"] = int(torch.isfinite(cache.epochs).sum())
        result["cache_digest"] = hashlib.sha256(
            b"".join(t.contiguous().numpy().tobytes() for t in (cache.losses, cache.residuals, cache.features))
        ).hexdigest()
    with open(os.path.join(out, f"{strategy}_rank{rank}.json"), "w") as handle_out:
        json.dump(result, handle_out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategies", default="gradmatch,loss")
    options = parser.parse_args()
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    for strategy in options.strategies.split(","):
        run(strategy, options.out, world_size, rank)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is written and the process group destroyed; gloo's threads still occasionally abort the
    # interpreter's teardown ("terminate called without an active exception", SIGABRT), so skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
