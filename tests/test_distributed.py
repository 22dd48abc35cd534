"""DDP with two CPU processes (gloo): each rank selects on its own local batch, and the ranks stay in step.

One ``torchrun --nproc_per_node 2`` launch runs ``distributed_worker.py`` for gradmatch and loss; each
rank writes what forward hooks saw (rows and autograd state of every forward pass), a digest of its
final parameters and its log history. The assertions are against those independent observations: the
scoring pass sees the local batch (``n`` = per-device batch, not the global one), the gradient pass a
subset of those rows (``k`` of them), the parameters are identical on both ranks after training (DDP
averaged every step's gradients, so no rank skipped or mismatched a collective, even when one rank fell
back to its full batch), and the logged selection metrics are the cross-rank reduction of what each
rank did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORLD = 2
BATCH = 8  # per device; distributed_worker.PER_DEVICE_BATCH
K = 4  # round(0.5 * 8)
STEPS = 4
NAN_STEP, NAN_RANK = 1, 1  # distributed_worker: rank 1's scoring logits are NaN at step 1 (gradmatch)
LOSS_FULL_STEPS = {2}  # loss runs with sbp_interrupt=3: (step + 1) % 3 == 0 trains on the full batch


def launch(launcher: list[str], out: Path, strategies: list[str]) -> dict[tuple[str, int], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), "CUDA_VISIBLE_DEVICES": ""}
    command = [*launcher, str(HERE / "distributed_worker.py"), "--out", str(out), "--strategies", ",".join(strategies)]
    done = subprocess.run(command, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{launcher[:3]} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    loaded = {}
    for strategy in strategies:
        for rank in range(WORLD):
            with open(out / f"{strategy}_rank{rank}.json") as handle:
                loaded[strategy, rank] = json.load(handle)
    return loaded


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One torchrun launch, both strategies."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    return launch(
        torchrun,
        tmp_path_factory.mktemp("torchrun"),
        [
            "gradmatch",
            "loss",
            "stale-gradmatch",
            "infobatch",
            "importance",
            "stale-importance",
            "rho-loss",
            "stale-rho-loss",
            "test-uneven-scoring",
        ],
    )


def passes_by_step(calls: list[dict]) -> dict[int, list[dict]]:
    """The forward passes of each training step (those before the first step, the trainer's
    construction-time check of the first examples, are left out)."""
    steps: dict[int, list[dict]] = {}
    current = None
    for call in calls:
        if "step_begin" in call:
            current = call["step_begin"]
            steps[current] = []
        elif current is not None:
            steps[current].append(call)
    return steps


def split_passes(passes: list[dict]) -> tuple[list[int] | None, list[int]]:
    """(rows of the no-grad scoring pass or None, rows of the gradient pass) of one step."""
    scoring = [p for p in passes if not p["grad"]]
    gradient = [p for p in passes if p["grad"]]
    assert len(gradient) == 1 and gradient[0]["training"]
    assert len(scoring) <= 1
    if scoring:
        assert not scoring[0]["training"], "the scoring pass must run in eval mode"
        assert passes.index(scoring[0]) < passes.index(gradient[0])
    return (scoring[0]["rows"] if scoring else None), gradient[0]["rows"]


@pytest.mark.parametrize("strategy", ["gradmatch", "loss"])
def test_each_rank_selects_on_its_local_batch(results, strategy):
    seen_by_rank = []
    for rank in range(WORLD):
        result = results[strategy, rank]
        assert result["world_size"] == WORLD and result["global_step"] == STEPS
        assert result["wrapped_model_type"] == "DistributedDataParallel"
        steps = passes_by_step(result["calls"])
        assert sorted(steps) == list(range(STEPS))
        seen = []
        backpropagated = 0
        for step, passes in steps.items():
            scoring, gradient = split_passes(passes)
            backpropagated += len(gradient)
            if strategy == "loss" and step in LOSS_FULL_STEPS:
                assert scoring is None, "an interrupted step must not score"
                assert len(gradient) == BATCH
                seen += gradient
                continue
            assert scoring is not None and len(scoring) == BATCH  # the local batch, not the global 16
            assert set(gradient) <= set(scoring) and len(set(gradient)) == len(gradient)
            if strategy == "gradmatch" and (step, rank) == (NAN_STEP, NAN_RANK):
                assert sorted(gradient) == sorted(scoring)  # the fallback trains on the full local batch
            elif strategy == "gradmatch":
                assert 1 <= len(gradient) <= K
            else:
                assert len(gradient) == K  # Composer's rule keeps exactly k
            seen += scoring
        assert result["backprop_examples"] == backpropagated
        seen_by_rank.append(seen)
    # The ranks got disjoint shards that together cover the data set once.
    assert not set(seen_by_rank[0]) & set(seen_by_rank[1])
    assert sorted(seen_by_rank[0] + seen_by_rank[1]) == list(range(1, WORLD * BATCH * STEPS + 1))


@pytest.mark.parametrize("strategy", ["gradmatch", "loss"])
def test_ranks_end_with_identical_trained_parameters(results, strategy):
    digests = {results[strategy, rank]["param_digest"] for rank in range(WORLD)}
    assert len(digests) == 1
    assert digests != {results[strategy, 0]["initial_param_digest"]}


@pytest.mark.parametrize("strategy", ["gradmatch", "loss"])
def test_logged_selection_metrics_are_reduced_across_ranks(results, strategy):
    histories = [
        [log for log in results[strategy, rank]["log_history"] if "sbp/backprop_fraction" in log]
        for rank in range(WORLD)
    ]
    # Trainer.log runs on every rank, and each rank logged the same reduced values.
    assert len(histories[0]) == STEPS
    for log0, log1 in zip(*histories, strict=True):
        sbp0 = {key: value for key, value in log0.items() if key.startswith("sbp/")}
        assert sbp0 == {key: value for key, value in log1.items() if key.startswith("sbp/")}
    # Independent reference: the fraction each rank backpropagated, from its forward hooks.
    per_rank = [passes_by_step(results[strategy, rank]["calls"]) for rank in range(WORLD)]
    for step, log in enumerate(histories[0]):
        assert log["step"] == step + 1
        fractions = [len(split_passes(per_rank[rank][step])[1]) / BATCH for rank in range(WORLD)]
        assert log["sbp/backprop_fraction"] == pytest.approx(sum(fractions) / WORLD)
        full = strategy == "loss" and step in LOSS_FULL_STEPS
        assert log["sbp/selective_steps"] == (0.0 if full else 1.0)  # steps, not steps x processes
        fallback = strategy == "gradmatch" and step == NAN_STEP
        assert log["sbp/fallback_steps"] == (1.0 if fallback else 0.0)


def test_stale_statistics_are_shared_across_ranks(results):
    """In the second epoch every row has statistics from the first, on whichever rank saw it: no scoring pass runs,
    and both ranks hold the same cache, with every row of the data set in it."""
    examples = WORLD * BATCH * STEPS // 2
    seen_by_rank = []
    for rank in range(WORLD):
        result = results["stale-gradmatch", rank]
        steps = passes_by_step(result["calls"])
        scored = {step: split_passes(passes)[0] for step, passes in steps.items()}
        assert all(scored[step] is not None and len(scored[step]) == BATCH for step in range(STEPS // 2))
        assert all(scored[step] is None for step in range(STEPS // 2, STEPS)), "the second epoch must not score"
        second_epoch = [row for step in range(STEPS // 2, STEPS) for row in steps[step][0]["rows"]]
        first_epoch = [row for step in range(STEPS // 2) for row in scored[step]]
        seen_by_rank.append((first_epoch, second_epoch))
        assert result["cache_rows"] == examples
    assert {results["stale-gradmatch", rank]["cache_digest"] for rank in range(WORLD)} == {
        results["stale-gradmatch", 0]["cache_digest"]
    }
    # The exchange mattered: some row a rank selects from in the second epoch was scored by the other rank.
    assert set(seen_by_rank[0][1]) - set(seen_by_rank[0][0]) or set(seen_by_rank[1][1]) - set(seen_by_rank[1][0])
    assert len({results["stale-gradmatch", rank]["param_digest"] for rank in range(WORLD)}) == 1


def test_ranks_agree_on_each_pruned_epoch_and_visit_it_together(results):
    """infobatch under DDP: both ranks hold the same plan at every step (drawn from losses both recorded, with a
    generator that depends only on the seed and the epoch), the rows they train on in an epoch are that plan's
    examples, and the pruned epochs are shorter."""
    plans = [results["infobatch", rank]["plans"] for rank in range(WORLD)]
    assert plans[0] == plans[1] and plans[0]
    orders = {plan["epoch"]: plan["order"] for plan in plans[0]}
    assert sorted(orders) == [0, 1, 2]
    examples = WORLD * BATCH * STEPS // 2
    assert sorted(orders[0]) == list(range(examples))
    assert len(orders[1]) < examples or len(orders[2]) < examples, "nothing was pruned"
    epoch_of_step = {plan["step"]: plan["epoch"] for plan in plans[0]}
    trained: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
    for rank in range(WORLD):
        for step, passes in passes_by_step(results["infobatch", rank]["calls"]).items():
            _, rows = split_passes(passes)
            trained[epoch_of_step[step]].update(row - 1 for row in rows)
    for epoch, order in orders.items():
        assert trained[epoch] == set(order)
    assert len({results["infobatch", rank]["param_digest"] for rank in range(WORLD)}) == 1


@pytest.mark.parametrize("strategy", ["importance", "stale-importance"])
def test_importance_sampling_ranks_switch_together(results, strategy):
    """Every rank scores on the same steps (the switch's estimate is reduced across ranks), the draws are
    importance-weighted subsets of each rank's local batch, and the ranks end with the same parameters."""
    scored = []
    for rank in range(WORLD):
        steps = passes_by_step(results[strategy, rank]["calls"])
        assert sorted(steps) == list(range(STEPS))
        passes = {step: split_passes(p) for step, p in steps.items()}
        for scoring, gradient in passes.values():
            assert 1 <= len(gradient) <= K and len(set(gradient)) == len(gradient)
            assert scoring is None or set(gradient) <= set(scoring)
        scored.append([passes[step][0] is not None for step in range(STEPS)])
    assert scored[0] == scored[1]
    if strategy == "importance":
        assert scored[0] == [False, True, True, True]
        logs = [log for log in results[strategy, 0]["log_history"] if "loss" in log]
        assert [log["sbp/importance_sampling"] for log in logs] == [0.0, 1.0, 1.0, 1.0]
    else:
        assert scored[0] == [True, True, False, False]  # the second epoch selects from the shared cache
    assert len({results[strategy, rank]["param_digest"] for rank in range(WORLD)}) == 1


@pytest.mark.parametrize("strategy", ["rho-loss", "stale-rho-loss"])
def test_rho_loss_ranks_share_the_irreducible_losses(results, strategy):
    """Both ranks computed the same irreducible losses for the whole data set, each trained k rows of its local
    batch per step (the scored ones, when it scored), and they end with the same parameters."""
    losses = [results[strategy, rank]["irreducible_losses"] for rank in range(WORLD)]
    assert losses[0] == losses[1] and len(losses[0]) == WORLD * BATCH * STEPS // (
        2 if strategy.startswith("stale") else 1
    )
    for rank in range(WORLD):
        for scoring, gradient in map(split_passes, passes_by_step(results[strategy, rank]["calls"]).values()):
            assert len(set(gradient)) == len(gradient) == K
            assert scoring is None or set(gradient) <= set(scoring)
    assert len({results[strategy, rank]["param_digest"] for rank in range(WORLD)}) == 1


def test_accelerate_launch(tmp_path):
    """The same worker, unchanged, under `accelerate launch` (two CPU processes; `--multi_gpu` is the
    flag that makes accelerate start several processes, and with no GPU they use gloo on the CPU)."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={WORLD}"]
    accelerate += ["--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
    launched = launch(accelerate, tmp_path, ["loss"])
    test_each_rank_selects_on_its_local_batch(launched, "loss")
    test_ranks_end_with_identical_trained_parameters(launched, "loss")
    test_logged_selection_metrics_are_reduced_across_ranks(launched, "loss")


def test_every_rank_runs_a_scoring_forward_when_any_rank_has_rows_to_score(results):
    """After the first step, rank 1 has its whole batch to score and rank 0 none (test-uneven-scoring). DDP's forward
    broadcasts the buffers, a collective, so rank 0 scores one row rather than skipping the pass, and the ranks stay in
    step to the end."""
    for step in range(STEPS):
        scored = []
        for rank in range(WORLD):
            passes = passes_by_step(results["test-uneven-scoring", rank]["calls"])[step]
            scored.append(split_passes(passes)[0])
        assert scored[1] is not None and len(scored[1]) == BATCH
        assert scored[0] is not None and len(scored[0]) == (BATCH if step == 0 else 1)
    assert len({results["test-uneven-scoring", rank]["param_digest"] for rank in range(WORLD)}) == 1
