"""What gradient checkpointing (model.gradient_checkpointing) buys and costs: peak memory and time of a C-LoRAE
training step (forward, L + 0.01·MIM, backward) with every block's activations kept and with the blocks recomputed
in backward, side by side on the same model and batch.

    python benchmarks/bench_checkpointing.py [--batch 16] [--source-length 256] [--rounds 3]

A T5-shaped model from a config (random weights: memory and speed do not need trained ones; Flan-T5-small's
widths and 8 + 8 layers by default), C-LoRAE r 64, a mixed-task batch of random tokens. Each arm runs in processes
of its own, the arms alternating round by round, two processes per arm and round:
- memory: the process's peak resident set during the steps above its resting set after a warm-up step (Linux
  /proc: VmHWM, reset through clear_refs), glibc set to unmap every allocation over 64 KiB when it is freed, so
  that the resident set follows the live tensors;
- time: seconds per step (median), with glibc's own allocation policy (unmapping at once slows every step).
Prints a table and ends with one JSON line: `checkpointed_over_kept_peak_memory`, `checkpointed_over_kept_step`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from benchmarks.harness import emit, markdown_table, run_worker  # noqa: E402

SHAPE = dict(d_model=512, d_ff=1024, d_kv=64, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu")
ARMS = {"kept": False, "checkpointed": True}


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(args) -> dict:
    """One arm in this process: seconds per step (median) and the peak resident set above the resting one."""
    import torch

    from clorae_ds.adapters import collect_mim_loss
    from clorae_ds.models import ModelConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        texts = [f"sample {i} of the benchmark corpus ( ( person : x{i} ) )" for i in range(200)]
        built = ModelConfig(family="t5", preset="tiny", shape=SHAPE, adapter={"rank": args.rank},
                            gradient_checkpointing=ARMS[args.arm]).build(texts, tokenizer_dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = built.model.to(dtype).train()
    vocab = model.lm.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(2, vocab, (args.batch, args.source_length), generator=generator),
             "attention_mask": torch.ones(args.batch, args.source_length, dtype=torch.long),
             "labels": torch.randint(2, vocab, (args.batch, args.target_length), generator=generator),
             "task_ids": torch.arange(args.batch) % 3}

    def step():
        loss = model(**batch).loss + 0.01 * collect_mim_loss(model)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: gradients allocated once, caches filled
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    resting = resident_kib("VmRSS")
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return {"step_s": statistics.median(seconds), "peak_mib": (resident_kib("VmHWM") - resting) / 1024}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--source-length", type=int, default=256)
    parser.add_argument("--target-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="default: bf16 where the hardware has bf16 matmuls (as the engine decides), else fp32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)  # one arm, in this process
    args = parser.parse_args(argv)
    if args.dtype is None:  # emulated bf16 (a CPU without AVX512-BF16) runs many times slower than fp32
        from clorae_ds.train.hardware import bf16_supported

        args.dtype = "bf16" if bf16_supported() else "fp32"
    if args.arm:
        print(json.dumps(measure(args)))
        return
    results = {(arm, key): [] for arm in ARMS for key in ("step_s", "peak_mib")}
    for _ in range(args.rounds):
        for arm in ARMS:
            for key, malloc in (("step_s", {}), ("peak_mib", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
                cmd = [sys.executable, os.path.abspath(__file__), "--arm", arm, "--dtype", args.dtype] + \
                    (argv if argv is not None else sys.argv[1:])
                results[arm, key].append(run_worker(cmd, malloc)[key])
    summary = {arm: {key: statistics.median(results[arm, key]) for key in ("step_s", "peak_mib")} for arm in ARMS}
    tokens = args.batch * (args.source_length + args.target_length)

    def ratio(key):
        return summary["checkpointed"][key] / summary["kept"][key]

    emit({"checkpointed_over_kept_peak_memory": round(ratio("peak_mib"), 3),
          "checkpointed_over_kept_step": round(ratio("step_s"), 3), "arms": summary, "shape": SHAPE, "rank": args.rank,
          "batch": [args.batch, args.source_length, args.target_length], "dtype": args.dtype},
         f"T5 {SHAPE['d_model']}/{SHAPE['d_ff']}, {SHAPE['num_layers']} + {SHAPE['num_layers']} layers, C-LoRAE "
         f"r {args.rank}, {args.dtype}, batch {args.batch} x ({args.source_length} + {args.target_length}) = {tokens} "
         f"tokens; medians of {args.rounds} rounds, {args.steps} steps a process",
         markdown_table(["arm", "step s", "peak MiB above resting"],
                        [[arm, round(row["step_s"], 3), round(row["peak_mib"])] for arm, row in summary.items()]))


if __name__ == "__main__":
    main()
