"""bench_memory's counting and projection, on a tiny T5 (the benchmark itself runs T5-XL-wide blocks)."""
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "launchers"))

import bench_memory  # noqa: E402

TINY = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, feed_forward_proj="gated-gelu", vocab_size=300)


def test_the_four_way_split_predicts_a_deeper_larger_forward_and_sizes_the_batch():
    """Measured at 1-2 block pairs and 1-2 samples, the split predicts 3 block pairs of 3 samples exactly."""
    for method in ("clorae", "lora"):
        measured = bench_memory.measure(method, 4, 1, 12, 5, "cpu", torch.float32, TINY)["plain"]
        model = bench_memory.build(method, 3, 4, False, "cpu", torch.float32, TINY)
        predicted = measured["fixed_rest"] + 3 * measured["fixed_block_pair"] + \
            3 * (measured["rest"] + 3 * measured["block_pair"])
        assert bench_memory.forward_saved_bytes(model, 3, 12, 5) == predicted
        assert measured["block_pair"] > 0 and measured["rest"] > 0
    gib = 2 ** 30
    projection = lambda micro_batch: {"fixed": 10 * gib, "per_sample": gib // 2 * micro_batch}
    assert bench_memory.largest_micro_batch(projection, 100 * gib, share=0.85, multiple=8) == 144  # 150 fits
    assert bench_memory.largest_micro_batch(projection, 10 * gib) == 0
    measured = {"block_pair": 1, "rest": 2, "fixed_block_pair": 3, "fixed_rest": 4, "recompute_block_pair": 5}
    terms = bench_memory.project(measured, frozen=10, trainable=20, micro_batch=2, target_len=3, reduce_bucket=7)
    vocab = bench_memory.T5_XL["vocab_size"]
    assert terms == {"weights": 60, "gradients": 40, "optimizer": 320, "reduce_bucket": 14,
                     "activations": 4 + 24 * 3 + 2 * (2 + 24 * 1), "logits_gradient": 2 * 3 * vocab * 6,
                     "recompute": 10}
