"""The loader's batches on the full training splits: real / padded tokens (input + target) per micro-batch and the
mean total-variation distance of each batch's dataset mix to the run's mix, for three orders of the same draws
(random: no bucketing; mix-keeping: the recipe default; by length alone), at micro-batch 32 and 1024; then the
loader's samples/s beside what the embedded default model consumes in training (MiniLM encoder-decoder + C-LoRAE,
forward + backward + AdamW step), one after the other in one run.

    bash shards/build_full.sh && python benchmarks/bench_loader.py
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
from clorae_ds.data.loader import DataConfig, Encoding  # noqa: E402
from clorae_ds.models import ModelConfig  # noqa: E402

MICRO_BATCHES = (32, 1024)


def train_shards(directory: str) -> dict:
    shards = {}
    for index in sorted(glob.glob(os.path.join(directory, "*-train.index.json"))):
        dataset = os.path.basename(index)[:-len("-train.index.json")]
        count = len(json.load(open(index))["shards"])
        shards[dataset] = os.path.join(directory, f"{dataset}-train-{{000000..{count - 1:06d}}}.tar")
    return shards


def embedded_train_shards() -> dict:
    return train_shards(os.path.join(ROOT, "shards"))


def batch_shapes(data: DataConfig, tokenizer) -> dict:
    """One epoch of the loader: real / padded tokens, mean mix distance, samples/s."""
    loader = data.build(tokenizer, Encoding(drop_target_bos=True))
    mix = torch.tensor([loader.mix[d] for d in loader.datasets if d in loader.mix])
    mix = mix / mix.sum()
    real = padded = samples = 0
    distances = []
    start = time.perf_counter()
    for batch in loader.train_epoch(0):
        real += batch["tokens"]
        padded += batch["attention_mask"].numel() + batch["labels"].numel()
        counts = torch.bincount(batch["dataset_ids"], minlength=len(mix)).float()
        distances.append(0.5 * float((counts / counts.sum() - mix).abs().sum()))
        samples += len(batch["ids"])
    return {"real_over_padded": round(real / padded, 3), "mix_distance": round(sum(distances) / len(distances), 3),
            "batches": len(distances), "samples_per_s": round(samples / (time.perf_counter() - start), 1)}


def train_rate(built, data: DataConfig, steps: int) -> float:
    """Samples/s of forward + backward + AdamW step on the loader's first batches (two warm-up steps)."""
    loader = DataConfig(**{**data.__dict__, "batches_per_epoch": steps + 2, "num_workers": 0}).build(
        built.tokenizer, Encoding(drop_target_bos=True))
    batches = list(loader.train_epoch(0))
    model = built.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    keys = ("input_ids", "attention_mask", "labels", "task_ids")
    samples, start = 0, None
    for index, batch in enumerate(batches):
        if index == 2:
            start = time.perf_counter()
        loss = model(**{k: batch[k] for k in keys}).loss + 0.01 * collect_mim_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(batch["ids"]) if index >= 2 else 0
    return samples / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=os.path.join(ROOT, "shards", "full"),
                        help="directory of the train shards (default: the full splits of shards/build_full.sh)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=4)
    args = parser.parse_args(argv)
    shards = train_shards(args.shards)
    if not shards:
        raise SystemExit(f"no *-train.index.json in {args.shards}: run bash shards/build_full.sh first")
    torch.set_num_threads(2)
    import transformers

    transformers.logging.set_verbosity_error()
    built = ModelConfig(family="encoder_decoder", pretrained="minilm", adapter={"rank": 16}).build()
    default = DataConfig()
    orders = {"random": {"length_group": 1}, "mix_keeping": {}, "length": {"length_weight": 1.0}}
    rows = {}
    for micro_batch in MICRO_BATCHES:
        for order, options in orders.items():
            data = DataConfig(train=shards, micro_batch_size=micro_batch, num_workers=args.workers, **options)
            row = rows.setdefault(order, {})[str(micro_batch)] = batch_shapes(data, built.tokenizer)
            print(f"micro-batch {micro_batch:5d} {order:12s} real/padded {row['real_over_padded']:.3f}  mix distance "
                  f"{row['mix_distance']:.3f}  ({row['batches']} batches, {row['samples_per_s']:.0f} samples/s)",
                  flush=True)
    data = DataConfig(train=shards, micro_batch_size=MICRO_BATCHES[0], num_workers=args.workers)
    consumed = train_rate(built, data, args.train_steps)
    delivered = rows["mix_keeping"][str(MICRO_BATCHES[0])]["samples_per_s"]
    print(f"train: {consumed:.1f} samples/s (MiniLM encoder-decoder + C-LoRAE r16, micro-batch {MICRO_BATCHES[0]}, "
          f"CPU); loader headroom {delivered / consumed:.1f}x (target >= 20x)")
    chosen = rows["mix_keeping"]
    print(json.dumps({"event": "bench_loader", "length_group": default.length_group,
                      "length_weight": default.length_weight,
                      "real_over_padded": {b: chosen[b]["real_over_padded"] for b in chosen},
                      "mix_distance": {b: chosen[b]["mix_distance"] for b in chosen},
                      "orders": rows, "loader_samples_per_s": delivered, "train_samples_per_s": round(consumed, 2),
                      "loader_over_train": round(delivered / consumed, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
