"""One rank of the trainer with `model.compile` (1 or 2 ranks): the project's Trainer steps by hand through its
first epoch, eager or compiled, and writes each step's loss to OUT/rank{N}.json. Compiled, it then trains
`--fixed` more steps under torch.compiler.set_stance("fail_on_recompile") and records how many graphs dynamo
compiled before and during them, and its graph breaks.

    torchrun --standalone --nproc_per_node 2 compile_worker.py RECIPE DS_CONFIG OUT [--fixed N] [overrides...]
"""
import json
import os
import sys
import time

import torch
import torch._dynamo.utils

from clorae_ds.train.config import load_config
from clorae_ds.train.trainer import Trainer


def main():
    recipe, ds_config, out_dir = sys.argv[1:4]
    rest = sys.argv[4:]
    fixed = 0
    if rest[:1] == ["--fixed"]:
        fixed, rest = int(rest[1]), rest[2:]
    overrides = [o for o in rest if not o.startswith("ds.")]
    trainer = Trainer(load_config(recipe, overrides), ds_config, ds_overrides=[o for o in rest if o.startswith("ds.")])
    state, start = trainer.begin(), time.time()
    losses = []

    def step(batch):  # the recipe logs every step: the interval's mean is the step's loss
        trainer.train_optimizer_step([batch], state, start)
        losses.append(trainer.interval.last_loss)

    batches = list(trainer.loader.train_epoch(0))
    for batch in batches:
        step(batch)
    counters = torch._dynamo.utils.counters
    graphs_warm = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        for i in range(fixed):
            step(batches[i % len(batches)])
    result = {"losses": losses, "graphs_after_warmup": graphs_warm,
              "graphs_after_fixed": counters["stats"]["unique_graphs"],
              "graph_breaks": sum(counters["graph_break"].values()),
              "lengths": sorted({tuple(b["input_ids"].shape) + tuple(b["labels"].shape) for b in batches})}
    with open(os.path.join(out_dir, f"rank{trainer.ctx.rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
