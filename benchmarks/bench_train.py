"""What a training step costs under the DeepSpeed engine and what C-LoRAE costs a step against LoRA: the embedded
default (MiniLM encoder-decoder + C-LoRAE r 16, micro-batch 8) on the same batches.

    python benchmarks/bench_train.py [--steps 15] [--rounds 5]

One process trains the one-rank arms step by step in turn on the same batch, the order rotating (harness): a plain
PyTorch loop, C-LoRAE under ZeRO-0 and ZeRO-2, LoRA r 16 (the universal expert alone) and C-LoRAE without MIM under
ZeRO-0, and C-LoRAE and LoRA compiled (model.compile, as the trainer does) under ZeRO-0. Each ratio is the median over
every step's ratio of arms timed seconds apart: `zero0_1rank_overhead`, `zero2_1rank_overhead` (engine step / plain
step − 1), `clorae_over_lora_step`, `clorae_without_mim_over_lora_step` (MIM's share is the difference) and
`compiled_clorae_over_compiled_lora_step`; `--rounds` processes of it. Throughputs and step times are medians over
steps (a compiled arm recompiles once at a new kind of shape, e.g. a batch of 2-token targets: no steady state). Every arm trains in
the precision the engine's configs give on this machine (bf16 where the CPU has bf16 instructions, else fp32:
`precision`). Tokens are non-padding input + target tokens; batches are read before any timing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from benchmarks.default_step import build_model, embedded_batches, engine_bf16, engine_config, training_step  # noqa: E402
from benchmarks.harness import emit, interleaved_seconds, markdown_table, median_ratio, run_worker  # noqa: E402

# (label, DeepSpeed config or None for the plain loop, adapter mode, compiled)
PAIRED = [("plain loop", None, "clorae", False), ("DeepSpeed ZeRO-0", "zero0.json", "clorae", False),
          ("DeepSpeed ZeRO-2", "zero2.json", "clorae", False), ("ZeRO-0, LoRA", "zero0.json", "universal_only", False),
          ("ZeRO-0, C-LoRAE without MIM", "zero0.json", "clorae_without_mim", False),
          ("ZeRO-0, C-LoRAE compiled", "zero0.json", "clorae", True),
          ("ZeRO-0, LoRA compiled", "zero0.json", "universal_only", True)]
WARMUP = 3


def paired_worker(steps: int) -> dict:
    """The PAIRED arms in this process, every batch through each in turn: each arm's step seconds and the tokens."""
    import torch

    steppers, tokenizer = {}, None
    for label, ds_config, adapter_mode, compiled in PAIRED:
        built = build_model(adapter_mode)
        tokenizer, model = built.tokenizer, built.model.train()
        if ds_config is None and engine_bf16():  # the engine arms' precision: like compared with like
            model.to(torch.bfloat16)
        steppers[label] = training_step(model, engine_config(ds_config, 1) if ds_config else None, steps + WARMUP,
                                        compiled)
    batches, tokens = embedded_batches(tokenizer, 8, steps + WARMUP)
    seconds = interleaved_seconds({label: (lambda r, s=step: s(batches[r])) for label, step in steppers.items()},
                                  steps, warmup=WARMUP)
    return {"tokens": tokens[WARMUP:], "step_seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import json

        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(2)
        print(json.dumps(paired_worker(args.steps)), flush=True)
        os._exit(0)  # gloo's teardown can abort at interpreter exit
    rounds = [run_worker([sys.executable, __file__, "--steps", str(args.steps), "--worker"],
                         {"OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu"}) for _ in range(args.rounds)]
    results = []
    for label, *_ in PAIRED:  # medians over steps: a compiled arm's one-off recompile (a new shape) is no steady state
        rates = [statistics.median(t / s for t, s in zip(p["tokens"], p["step_seconds"][label])) for p in rounds]
        results.append({"arm": label, "tokens_per_s": statistics.median(rates),
                        "seconds_per_step": statistics.median(statistics.median(p["step_seconds"][label]) for p in rounds),
                        "all_rounds": sorted(round(r, 1) for r in rates)})

    def ratio(label: str, baseline: str) -> tuple[float, list]:  # over every step of every round; each round's
        seconds = [(p["step_seconds"][label], p["step_seconds"][baseline]) for p in rounds]
        return (round(median_ratio(sum((a for a, _ in seconds), []), sum((b for _, b in seconds), [])), 4),
                sorted(round(median_ratio(a, b), 4) for a, b in seconds))

    overhead = {f"zero{stage}_1rank_overhead": round(ratio(f"DeepSpeed ZeRO-{stage}", "plain loop")[0] - 1, 4)
                for stage in (0, 2)}
    summary = {"precision": "bf16" if engine_bf16() else "fp32", "plain_tokens_per_s": round(results[0]["tokens_per_s"], 1),
               **overhead, "rounds": args.rounds, "steps": args.steps}
    for key, label, baseline in (("clorae_over_lora_step", "DeepSpeed ZeRO-0", "ZeRO-0, LoRA"),
                                 ("clorae_without_mim_over_lora_step", "ZeRO-0, C-LoRAE without MIM", "ZeRO-0, LoRA"),
                                 ("compiled_clorae_over_compiled_lora_step", "ZeRO-0, C-LoRAE compiled",
                                  "ZeRO-0, LoRA compiled")):
        summary[key], summary[f"{key}_each_round"] = ratio(label, baseline)
    summary["arms"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results]
    plain = results[0]["tokens_per_s"]
    emit(summary, markdown_table(["arm", "tokens/s", "s/step", "vs plain"],
                                 [[r["arm"], round(r["tokens_per_s"], 1), round(r["seconds_per_step"], 3),
                                   round(r["tokens_per_s"] / plain, 3)] for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
