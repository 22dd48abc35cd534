"""CUDA checks, marked ``gpu``: they skip with a reason where CUDA is not available, and scripts/gpu_check.sh runs
them (``pytest -m gpu``) on one GPU.

* every registered strategy trains a tiny model on CUDA in bf16 and in fp16, with finite losses;
* the torch OMP loop on CUDA against the compiled loop (the same atoms and weights), and its steps never make the host
  wait for the device (``torch.cuda.set_sync_debug_mode("error")``); gradmatch on CUDA runs it;
* the peak memory of a training step (``torch.cuda.max_memory_allocated``), full batch against selective, written to
  ``$HF_SBP_GPU_RESULTS/gpu_memory.json`` when that folder is set.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from test_omp_torch import ADVERSARIAL, OPTIONS, assert_same_result
from tiny_models import make_args, tiny_bert, tiny_dataset
from transformers import TrainerCallback

from hf_sbp import SelectiveBackpropTrainer
from hf_sbp.core import omp_torch
from hf_sbp.core.selection import mean_gradient_target
from hf_sbp.strategies import gradmatch, registered_strategies, strategy_class

pytestmark = pytest.mark.gpu
BUILT_IN = [name for name in registered_strategies() if strategy_class(name).__module__.startswith("hf_sbp.")]
"""The package's strategies (not those other test modules register when they are collected first)."""


def _cuda_args(tmp_path, strategy: str, **overrides):
    dataset_level = strategy_class(strategy).prunes_dataset  # they accept only keep 1 (their default)
    values = {"use_cpu": False, "sbp_strategy": strategy, "sbp_keep": None if dataset_level else 0.5, "max_steps": 4}
    return make_args(tmp_path, **{**values, **overrides})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("strategy", BUILT_IN)
def test_every_strategy_trains_on_cuda_in_mixed_precision(tmp_path, strategy, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    args = _cuda_args(tmp_path, strategy, **{precision: True})
    trainer = SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(64))
    trainer.train()
    assert next(trainer.model.parameters()).device.type == "cuda"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses), losses


def test_gradmatch_on_cuda_runs_the_torch_loop_on_the_device(tmp_path, monkeypatch):
    seen = []
    omp_gram = gradmatch.omp_gram

    def recording(gram, *args, **kwargs):
        result = omp_gram(gram, *args, **kwargs)
        seen.append((gram.device.type, kwargs.get("impl"), result.indices.device.type))
        return result

    monkeypatch.setattr(gradmatch, "omp_gram", recording)
    trainer = SelectiveBackpropTrainer(
        model=tiny_bert(), args=_cuda_args(tmp_path, "gradmatch", bf16=True), train_dataset=tiny_dataset(64)
    )
    trainer.train()
    assert seen and all(entry == ("cuda", "auto", "cuda") for entry in seen), seen


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_torch_loop_on_cuda_matches_the_compiled_loop(name, options):
    K = ADVERSARIAL[name].cuda()
    n = K.shape[0]
    for k in sorted({1, max(1, n // 4), n // 2 or 1, n}):
        assert_same_result(K, k, **options)


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[2], OPTIONS[4]])
def test_a_step_of_the_torch_loop_never_waits_for_the_device(options):
    K = ADVERSARIAL["duplicated columns"].cuda()
    corr, target_sq = mean_gradient_target(K)
    loop, state = omp_torch._start(
        K, corr, float(target_sq), 12, 0.0, options["nonnegative"], -math.inf, options["batch"]
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(30):
            loop.step(state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(state.done)


class _StepPeak(TrainerCallback):
    """The peak of the allocator during the last step, above what was allocated when it began (the model, the
    optimizer's state): what the step itself holds (activations, gradients, the scoring pass, selection)."""

    def __init__(self) -> None:
        self.transient_mb: float | None = None
        self._base = 0

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._base = torch.cuda.memory_allocated()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.transient_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20


def test_peak_memory_of_a_step_full_batch_against_selective(tmp_path):
    """A model whose activations dominate its step (hidden 128, 4 layers, 64 rows of 64 tokens): a selective step
    at keep 0.5 backpropagates half the rows, after a scoring pass without autograd, so it must hold less than the
    full step."""
    peaks = {}
    for strategy in ("none", "random", "gradmatch", "loss"):
        torch.cuda.empty_cache()
        model = tiny_bert(hidden_size=128, num_hidden_layers=4, intermediate_size=512, num_attention_heads=4)
        args = _cuda_args(tmp_path / strategy, strategy, per_device_train_batch_size=64, max_steps=2, bf16=True)
        peak = _StepPeak()
        trainer = SelectiveBackpropTrainer(
            model=model, args=args, train_dataset=tiny_dataset(128, seq_len=64), callbacks=[peak]
        )
        trainer.train()  # the second step's peak: the optimizer's state exists by then
        peaks[strategy] = peak.transient_mb
        del trainer, model
    assert all(value is not None and value > 0 for value in peaks.values()), peaks
    for strategy in ("random", "gradmatch", "loss"):
        assert peaks[strategy] < peaks["none"], peaks
    folder = os.environ.get("HF_SBP_GPU_RESULTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        record = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "keep": 0.5,
                  "rows": 64, "seq_len": 64, "step_peak_above_start_mb": peaks}  # fmt: skip
        with open(os.path.join(folder, "gpu_memory.json"), "w") as handle:
            json.dump(record, handle, indent=1)
