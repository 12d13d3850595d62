"""Loader headroom: samples/s the loader delivers (decode + render + tokenise + collate, 2 workers) beside the
samples/s the embedded default model consumes in training (MiniLM encoder-decoder with C-LoRAE, forward +
backward + AdamW step), measured one after the other in one run on the embedded shards.

    python benchmarks/bench_loader.py [--batches 200] [--train-steps 10]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from clorae_ds.adapters import collect_mim_loss  # noqa: E402
from clorae_ds.data.loader import Encoding, MIELoader  # noqa: E402
from clorae_ds.models import ModelConfig  # noqa: E402


def embedded_train_shards() -> dict:
    shards = {}
    for index in sorted(glob.glob(os.path.join(ROOT, "shards", "*-train.index.json"))):
        dataset = os.path.basename(index)[:-len("-train.index.json")]
        count = len(json.load(open(index))["shards"])
        shards[dataset] = os.path.join(ROOT, "shards", f"{dataset}-train-{{000000..{count - 1:06d}}}.tar")
    return shards


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    import transformers

    transformers.logging.set_verbosity_error()
    built = ModelConfig(family="encoder_decoder", pretrained="minilm", adapter={"rank": 16}).build()
    config = MIELoader.Config(train=embedded_train_shards(), batch_size=args.batch_size, num_workers=args.workers,
                              batches_per_epoch=args.batches)
    loader = config.build(built.tokenizer, Encoding(drop_target_bos=True))

    start, samples = time.perf_counter(), 0
    batches = []
    for batch in loader.train_epoch(0):
        samples += len(batch["ids"])
        if len(batches) < args.train_steps + 2:
            batches.append(batch)
    loader_rate = samples / (time.perf_counter() - start)

    model = built.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    keys = ("input_ids", "attention_mask", "labels", "task_ids")

    def step(batch):
        loss = model(**{k: batch[k] for k in keys}).loss + 0.01 * collect_mim_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:2]:  # warm-up
        step(batch)
    start = time.perf_counter()
    for batch in batches[2:]:
        step(batch)
    train_rate = args.batch_size * (len(batches) - 2) / (time.perf_counter() - start)

    print(f"loader: {loader_rate:8.1f} samples/s ({args.workers} workers, {samples} samples)")
    print(f"train:  {train_rate:8.1f} samples/s (MiniLM encoder-decoder + C-LoRAE r16, batch {args.batch_size}, CPU)")
    print(f"headroom: {loader_rate / train_rate:.1f}x (target >= 20x)")
    print(json.dumps({"loader_samples_per_s": round(loader_rate, 1), "train_samples_per_s": round(train_rate, 2),
                      "loader_over_train": round(loader_rate / train_rate, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
