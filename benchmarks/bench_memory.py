"""Activation memory measured, a T5-XL step's peak projected. Saved-tensor hooks count the bytes autograd keeps
for backward (each storage once, parameters left out) in a training forward of T5-XL-wide models (d_model 2048,
gated-GELU, random weights) with C-LoRAE and with LoRA, with and without activation checkpointing, at 1 and 2
encoder + decoder blocks and 1 and 2 samples: per sample or per step (weight-sized tensors), one block pair's or the
rest's (embeddings, head, loss). From
them and the full model's parameter counts (on the meta device) it projects the peak of one ZeRO-2 bf16 step of the
whole 24 + 24-block model on one GPU at a micro-batch B of full-length samples:
  weights (bf16) + trainable parameters' bf16 gradients, fp32 masters, Adam moments and fp32 gradient partition
  + DeepSpeed's reduce bucket + saved activations + the logits' gradients (bf16 and the loss's fp32 copy)
  + with checkpointing, one block pair's activations recomputed in backward.

    python benchmarks/bench_memory.py [--rank 64] [--batch 2] [--device cpu|cuda] [--micro-batches 32,256,1024]

Ends with {"event": "bench_memory", "clorae_over_lora_saved_bytes": ..., "projected_peak_gib": {...}, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "launchers"))

from benchmarks.harness import emit, saved_bytes  # noqa: E402
from clorae_ds.adapters import collect_mim_loss  # noqa: E402
from clorae_ds.train.trainer import multi_task_loss, per_dataset_token_loss  # noqa: E402

T5_XL = dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, feed_forward_proj="gated-gelu", vocab_size=32128)
BLOCKS = 24  # per stack
METHODS = {"clorae": "C-LoRAE", "lora": "LoRA"}
GIB = 2 ** 30


def build(method: str, blocks: int, rank: int, checkpointing: bool, device, dtype, shape=T5_XL):
    from report_cost import build as build_t5

    with torch.device(device):
        model = build_t5({**shape, "num_layers": blocks}, METHODS[method], rank)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.to(dtype).train()


def forward_saved_bytes(model, batch: int, input_len: int, target_len: int) -> int:
    """harness.saved_bytes of one training forward + the trainer's loss on `batch` random samples of full length."""
    device = next(model.parameters()).device
    vocab = model.lm.config.vocab_size
    ids = torch.randint(1, vocab, (batch, input_len), device=device)
    labels = torch.randint(1, vocab, (batch, target_len), device=device)
    task_ids = torch.arange(batch, device=device) % 3

    def run():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, task_ids=task_ids,
                    return_loss=False)
        sums, tokens = per_dataset_token_loss(out.logits, labels, torch.zeros_like(task_ids), False, 1)
        loss = multi_task_loss(torch.ones(1, device=device), sums, tokens.sum())
        mim = collect_mim_loss(model)
        return loss if mim is None else loss + 0.01 * mim

    return saved_bytes(run, model.parameters())


def parameters(method: str, rank: int) -> tuple[int, int]:
    """(frozen, trainable) parameters of the whole T5-XL with the adapter, counted on the meta device."""
    model = build(method, BLOCKS, rank, False, "meta", torch.bfloat16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in model.parameters()) - trainable, trainable


def project(measured: dict, frozen: int, trainable: int, micro_batch: int, target_len: int,
            reduce_bucket: int) -> dict:
    """Bytes per term of a ZeRO-2 bf16 step's peak on one GPU at `micro_batch` samples (measured: measure()'s)."""
    terms = {"weights": 2 * (frozen + trainable), "gradients": 2 * trainable,
             "optimizer": (4 + 8 + 4) * trainable,  # fp32 master, Adam's two moments, fp32 gradient partition
             "reduce_bucket": 2 * min(reduce_bucket, trainable),
             "activations": measured["fixed_rest"] + BLOCKS * measured["fixed_block_pair"]
             + micro_batch * (measured["rest"] + BLOCKS * measured["block_pair"]),
             "logits_gradient": micro_batch * target_len * T5_XL["vocab_size"] * (2 + 4),
             "recompute": micro_batch * measured.get("recompute_block_pair", 0)}  # one block pair's, in backward
    return terms


def largest_micro_batch(projection, capacity_bytes: float, share: float = 0.85, multiple: int = 8) -> int:
    """The largest multiple of `multiple` whose projected peak (projection(micro_batch) -> bytes per term) fits
    share × capacity; 0 if none does."""
    fixed = sum(projection(0).values())
    per_sample = sum(projection(1).values()) - fixed
    fits = int((share * capacity_bytes - fixed) // per_sample)
    return max(0, fits // multiple * multiple)


def measure(method: str, rank: int, batch: int, input_len: int, target_len: int, device, dtype, shape=T5_XL) -> dict:
    """Saved bytes split four ways, without and with activation checkpointing: per sample of input_len +
    target_len tokens or per step (weight-sized tensors such as a layer's concatenated experts), of one block pair
    or of the rest — from forwards at 1 and 2 block pairs, of `batch` and 2 × `batch` samples."""
    result = {}
    for checkpointing in (False, True):
        total = {}
        for blocks in (1, 2):
            model = build(method, blocks, rank, checkpointing, device, dtype, shape)
            for samples in (batch, 2 * batch):
                total[blocks, samples] = forward_saved_bytes(model, samples, input_len, target_len)
            del model
        per_sample = {b: (total[b, 2 * batch] - total[b, batch]) / batch for b in (1, 2)}
        fixed = {b: total[b, batch] - batch * per_sample[b] for b in (1, 2)}
        result["checkpointed" if checkpointing else "plain"] = {
            "block_pair": per_sample[2] - per_sample[1], "rest": 2 * per_sample[1] - per_sample[2],
            "fixed_block_pair": fixed[2] - fixed[1], "fixed_rest": 2 * fixed[1] - fixed[2]}
    result["checkpointed"]["recompute_block_pair"] = result["plain"]["block_pair"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="samples in each measured forward")
    parser.add_argument("--input-tokens", type=int, default=256, help="the full-length sample (device_run's limits)")
    parser.add_argument("--target-tokens", type=int, default=48)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--micro-batches", default="32,256,1024", help="micro-batches to project")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokens = args.input_tokens + args.target_tokens
    zero2 = json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    bucket = zero2["zero_optimization"]["reduce_bucket_size"]
    rows, projected = {}, {}
    for method in METHODS:
        measured = measure(method, args.rank, args.batch, args.input_tokens, args.target_tokens, args.device,
                           torch.bfloat16)
        frozen, trainable = parameters(method, args.rank)
        rows[method] = {"frozen_params": frozen, "trainable_params": trainable, "measured": measured,
                        **{f"saved_bytes_per_token_{mode}": round((m["rest"] + BLOCKS * m["block_pair"]) / tokens)
                           for mode, m in measured.items()},
                        **{f"saved_gib_per_step_{mode}": round((m["fixed_rest"] + BLOCKS * m["fixed_block_pair"]) / GIB, 3)
                           for mode, m in measured.items()}}
        for mode, m in measured.items():
            for micro_batch in map(int, args.micro_batches.split(",")):
                terms = {k: round(v / GIB, 2) for k, v in project(m, frozen, trainable, micro_batch,
                                                                  args.target_tokens, bucket).items()}
                projected[f"{method}-{mode}-mb{micro_batch}"] = round(sum(terms.values()), 2)
                print(f"{method:6s} {mode:12s} micro-batch {micro_batch:5d}: {sum(terms.values()):7.2f} GiB {terms}")
        print(f"{method:6s} saved bytes per token: {rows[method]['saved_bytes_per_token_plain']:,} "
              f"(checkpointed {rows[method]['saved_bytes_per_token_checkpointed']:,}); "
              f"trainable {trainable:,}, frozen {frozen:,}", flush=True)
    ratio, checkpointed = (rows["clorae"][f"saved_bytes_per_token_{mode}"] / rows["lora"][f"saved_bytes_per_token_{mode}"]
                           for mode in ("plain", "checkpointed"))
    emit({"event": "bench_memory", "clorae_over_lora_saved_bytes": round(ratio, 3),
          "clorae_over_lora_saved_bytes_checkpointed": round(checkpointed, 3),
          "projected_peak_gib": projected, "methods": rows, "rank": args.rank,
          "sample_tokens": [args.input_tokens, args.target_tokens], "reduce_bucket": bucket, "device": args.device},
         f"C-LoRAE / LoRA saved bytes per token: {ratio:.3f} (target <= 1.30); checkpointed {checkpointed:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
