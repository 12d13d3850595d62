"""One optimiser step of the Trainer on 8 fixed dev samples, this rank's share cut into micro-batches of
data.micro_batch_size: rank 0 writes the step's full gradient (every trainable tensor, reduced over ranks) to
OUT_DIR/grads.safetensors. Run: python -m torch.distributed.run ... loss_worker.py RECIPE DS_CONFIG OUT_DIR
[key=value ...] [ds.key=value ...]"""
import json
import os
import sys
import tarfile
import time

import torch
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file

from clorae_ds.data.record import Record
from clorae_ds.train.config import load_config
from clorae_ds.train.trainer import Trainer

SAMPLES = 8


def dev_records(patterns: dict) -> list[Record]:
    """The first samples of each dev shard, interleaved across datasets."""
    per_dataset = []
    for pattern in sorted(patterns.values()):
        with tarfile.open(pattern) as tar:
            per_dataset.append([Record.from_dict(json.load(tar.extractfile(m))) for m in tar if m.name.endswith(".json")])
    return [records[i] for i in range(SAMPLES // len(per_dataset)) for records in per_dataset]


def main():
    recipe, ds_config, out_dir, *rest = sys.argv[1:]
    config = load_config(recipe, [o for o in rest if not o.startswith("ds.")])
    trainer = Trainer(config, ds_config, ds_overrides=[o for o in rest if o.startswith("ds.")])
    state = trainer.begin()
    trainer.task_weights = torch.tensor([0.8, 0.2])  # unequal: the datasets' tokens weigh differently
    rank, world = trainer.ctx.rank, trainer.ctx.world_size
    encoder, micro = trainer.loader.encoder, config.data.micro_batch_size
    items = [encoder.encode(record, None, None) for record in dev_records(config.data.dev)]
    mine = items[rank * SAMPLES // world:(rank + 1) * SAMPLES // world]
    batches = [{**encoder.collate(mine[i:i + micro]), "skipped": {}} for i in range(0, len(mine), micro)]
    assert len(batches) == trainer.accumulation, (len(batches), trainer.accumulation)

    runner, grads = trainer.runner, {}
    real_step = runner.step

    def step():  # the gradient the optimiser is about to apply, whole on every rank
        if runner.engine.is_gradient_accumulation_boundary():
            for name, param in runner.module.named_parameters():
                if param.requires_grad:
                    grads[name] = safe_get_full_grad(param).detach().clone().contiguous()
        real_step()

    runner.step = step
    trainer.train_optimizer_step(batches, state, time.time())
    assert runner.global_step == 1 and grads
    if rank == 0:
        save_file(grads, os.path.join(out_dir, "grads.safetensors"))


if __name__ == "__main__":
    main()
