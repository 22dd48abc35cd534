"""FSDP and DeepSpeed ZeRO-3: refused when the trainer is built, for every selective strategy, with a clear error.

FSDP through the ``Trainer`` cannot run on a CPU here (accelerate keeps ``MULTI_CPU`` and drops the FSDP plugin:
``fsdp=...`` would silently train with DDP), FSDP1 needs an accelerator, and DeepSpeed is not installed: a sharded run
of selection has never been verified, so it is refused rather than risk a silently wrong gradient. The probe
``fsdp_worker.py`` records the facts behind that (and that scoring itself, through hooks, survives FSDP2 sharding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import make_args, tiny_bert, tiny_dataset

from hf_sbp import SelectiveBackpropArguments, SelectiveBackpropTrainer
from hf_sbp.setup_checks import check_sharding, deepspeed_zero_stage

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("strategy", ["gradmatch", "loss", "random", "stale-gradmatch", "infobatch"])
def test_fsdp_is_refused_when_the_trainer_is_built(tmp_path, strategy):
    keep = None if strategy == "infobatch" else 0.5
    args = make_args(tmp_path, fsdp=True, sbp_strategy=strategy, sbp_keep=keep)
    with pytest.raises(ValueError, match=rf"does not support FSDP with sbp_strategy='{strategy}'"):
        SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(16))


def test_fsdp_with_the_plain_step_is_left_to_the_trainer(tmp_path):
    """'none' is the plain Trainer step: not refused here (the Trainer's own check speaks, in one process)."""
    args = make_args(tmp_path, fsdp=True, sbp_strategy="none")
    with pytest.raises(ValueError, match="Using fsdp only works in distributed training"):
        SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(16))


def test_deepspeed_zero3_is_refused_and_stages_1_and_2_are_not(tmp_path):
    # TrainingArguments(deepspeed=...) needs the deepspeed package, which is not installed here: set it afterwards,
    # as a launcher's config would arrive (the check runs before the Trainer reads it).
    args = make_args(tmp_path)
    args.deepspeed = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match=r"does not support DeepSpeed ZeRO-3 \(partitioned parameters\)"):
        SelectiveBackpropTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(16))
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    assert deepspeed_zero_stage(str(path)) == 3
    assert deepspeed_zero_stage({"zero_optimization": {"stage": 2}}) == 2
    assert deepspeed_zero_stage({"train_batch_size": 8}) is None and deepspeed_zero_stage(None) is None
    assert deepspeed_zero_stage(SimpleNamespace(is_zero3=lambda: True)) == 3
    sbp = SelectiveBackpropArguments()
    check_sharding(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}), sbp)  # not refused
    check_sharding(SimpleNamespace(deepspeed=str(path)), SelectiveBackpropArguments(sbp_strategy="none"))


def test_a_launchers_fsdp_or_zero3_in_the_accelerator_state_is_refused():
    """``accelerate launch`` with an FSDP or DeepSpeed config reaches the trainer through its accelerator, not
    through ``args``."""
    sbp, args = SelectiveBackpropArguments(), SimpleNamespace()

    def trainer(fsdp: bool, deepspeed_stage: int | None):
        plugin = SimpleNamespace(zero_stage=deepspeed_stage)
        state = SimpleNamespace(deepspeed_plugin=plugin)
        return SimpleNamespace(
            is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed_stage is not None,
            accelerator=SimpleNamespace(state=state),
        )  # fmt: skip

    with pytest.raises(ValueError, match="does not support FSDP with"):
        check_sharding(args, sbp, trainer(True, None))
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_sharding(args, sbp, trainer(False, 3))
    check_sharding(args, sbp, trainer(False, 2))
    check_sharding(args, sbp, trainer(False, None))


def test_fsdp2_shards_the_head_on_the_cpu_but_the_trainer_route_does_not(tmp_path):
    """Two ranks (gloo): ``fully_shard`` makes the head's weight a DTensor, and the scoring hooks still see the whole
    ``h`` and ``z`` of the local rows; the Trainer's ``fsdp=`` route on the CPU builds no FSDP at all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}",
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "fsdp_worker.py"), "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["weight_type"] == "DTensor" and result["local_weight_rows"] < 3  # 3 labels over 2 ranks
        seen = result["seen"]
        assert seen["sharded"]["h_type"] == "Tensor"
        for key in ("h", "z", "logits"):
            torch.testing.assert_close(torch.tensor(seen["sharded"][key]), torch.tensor(seen["reference"][key]))
        assert result["trainer_fsdp_enabled"] is False and result["trainer_distributed_type"].endswith("MULTI_CPU")
