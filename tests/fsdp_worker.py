"""One process of test_sharding.py's FSDP probe: run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

It records what the refusal in :func:`hf_sbp.setup_checks.check_sharding` rests on, with this torch and accelerate:

* FSDP2 (``fully_shard``) itself runs on the CPU with gloo, and the head's weight becomes a sharded ``DTensor``;
  the capture hooks of the scoring pass still see the head's whole input ``h`` and output ``z`` for the local rows
  (the same as the unsharded model's): scoring never reads the sharded weight.
* The ``Trainer``'s route to FSDP (accelerate's plugin) does not: on the CPU accelerate keeps ``MULTI_CPU`` and
  drops the FSDP plugin, so ``fsdp=...`` would quietly train with DDP. ``SelectiveBackpropTrainer`` refuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from tiny_models import tiny_bert, tiny_dataset
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import Trainer, TrainingArguments

from hf_sbp.head import HeadCapture


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs = {"input_ids": torch.randint(1, 100, (4, 8), generator=torch.Generator().manual_seed(rank))}
    reference = tiny_bert().eval()
    sharded = tiny_bert().eval()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in sharded.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    weight = sharded.classifier.weight  # sharded until a forward gathers it (the root keeps it gathered after)
    result = {"weight_type": type(weight).__name__, "local_weight_rows": weight.to_local().shape[0]}
    seen = {}
    for name, model in (("reference", reference), ("sharded", sharded)):
        capture = HeadCapture([("classifier", model.classifier)])
        with torch.no_grad(), capture.capturing():
            logits = model(**inputs).logits
        (_, h, z) = capture.calls[-1]
        seen[name] = {"h": h.tolist(), "z": z.tolist(), "logits": logits.tolist(), "h_type": type(h).__name__}
    result["seen"] = seen
    args = TrainingArguments(
        output_dir=os.path.join(out, "plain"), fsdp=True, use_cpu=True, report_to="none", max_steps=1
    )
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(8))
    result["trainer_fsdp_enabled"] = trainer.is_fsdp_enabled
    result["trainer_distributed_type"] = str(trainer.accelerator.distributed_type)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads may abort the interpreter's teardown (see distributed_worker.py)
