"""Training throughput of the embedded default (MiniLM encoder-decoder + C-LoRAE r16, batch 8) under the
DeepSpeed engine — ZeRO-0 and ZeRO-2, 1 and 2 ranks — beside a plain PyTorch loop on the same model and the
same batches (`zero0_1rank_overhead`, `zero2_1rank_overhead`: engine step / plain step − 1), and what a user pays
per step for C-LoRAE against LoRA r16 (the universal expert alone, no MIM): `clorae_over_lora_step`, and the same
for C-LoRAE without MIM (β 0: `clorae_without_mim_over_lora_step`), which splits that price between MIM and the
gate with the task experts, and both compiled (model.compile, as the trainer does): `compiled_clorae_over_compiled_lora_step`.
The one-rank arms (the plain loop, C-LoRAE under ZeRO-0 and ZeRO-2, LoRA and C-LoRAE without MIM under ZeRO-0, C-LoRAE
and LoRA compiled under ZeRO-0) train in one process, step by step in turn on the same batch (the order rotating), so
each step's ratio compares arms timed seconds apart; every ratio kept is the median over every round's steps
(arms in separate processes a minute apart drifted by 10-30 % on this machine, more than what they compared). Every arm trains in the precision the engine's configs give on this machine — bf16 where the CPU has
bf16 instructions (load_ds_config's fallback), fp32 elsewhere — the plain loop's model cast to match; the last JSON
line names it (`precision`).

    python benchmarks/bench_train.py [--steps 15] [--rounds 5]

Each arm runs in its own process(es); batches are read from the embedded shards before timing, so only the
training step is measured. The one-rank process and the 2-rank arms run in turn, `--rounds` times, and each arm's median
throughput is reported. Tokens = non-padding input + target tokens. 2-rank arms use one thread per rank (2 cores);
1-rank arms two threads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# (label, loop, DeepSpeed config, ranks, adapter mode); "paired": the PAIRED arms interleaved step by step in one
# process, each reported as an arm of its own.
ARMS = [("one rank, step by step", "paired", None, 1, "paired"),
        ("DeepSpeed ZeRO-0", "deepspeed", "zero0.json", 2, "clorae"),
        ("DeepSpeed ZeRO-2", "deepspeed", "zero2.json", 2, "clorae")]
# (label, DeepSpeed config or None for the plain loop, adapter mode, compiled: model.compile() as the trainer does)
PAIRED = [("plain loop", None, "clorae", False), ("DeepSpeed ZeRO-0", "zero0.json", "clorae", False),
          ("DeepSpeed ZeRO-2", "zero2.json", "clorae", False), ("ZeRO-0, LoRA", "zero0.json", "universal_only", False),
          ("ZeRO-0, C-LoRAE without MIM", "zero0.json", "clorae_without_mim", False),
          ("ZeRO-0, C-LoRAE compiled", "zero0.json", "clorae", True),
          ("ZeRO-0, LoRA compiled", "zero0.json", "universal_only", True)]


def embedded_batches(tokenizer, batch_size: int, count: int, rank: int = 0, world: int = 1) -> tuple:
    """`count` model-input batches of the embedded shards (this rank's share) read before any timing, and each
    one's tokens (non-padding input + target)."""
    from benchmarks.bench_loader import embedded_train_shards
    from clorae_ds.data.loader import DataConfig, Encoding

    loader = DataConfig(train=embedded_train_shards(), micro_batch_size=batch_size, num_workers=0,
                        batches_per_epoch=count).build(tokenizer, Encoding(drop_target_bos=True), rank, world)
    keys = ("input_ids", "attention_mask", "labels", "task_ids")
    batches = [{k: b[k] for k in keys} for b in loader.train_epoch(0)]
    return batches, [int(b["attention_mask"].sum() + (b["labels"] >= 0).sum()) for b in batches]


def training_step(model, ds_config=None, total_steps: int = 10_000, compiled: bool = False):
    """step(batch): one optimiser step on L + 0.01·MIM (L alone where the model has no MIM) — a plain PyTorch
    loop (fused AdamW, gradients clipped at 1) when ds_config is None, else the DeepSpeed engine with that
    config (joining or creating the process group). `compiled`: the model compiled in place before the engine
    wraps it, batch and length dimensions dynamic (as the trainer's model.compile)."""
    import torch

    def with_mim(out):
        mim = out.get("mim_loss")  # None for LoRA
        return out.loss if mim is None else out.loss + 0.01 * mim

    def inputs(batch):
        if compiled:
            for tensor in batch.values():
                for dim in range(min(tensor.dim(), 2)):
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return {**batch, "return_mim": True}

    if compiled:
        model.compile()
    if ds_config is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def step(batch):
            loss = with_mim(model(**inputs(batch)))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    from clorae_ds.adapters.model import parameter_groups
    from clorae_ds.train.engine import DeepSpeedRunner, init_distributed

    ctx = init_distributed(600)
    runner = DeepSpeedRunner(model, ds_config, parameter_groups(model, 1e-4, 1e-4, 0.0), (0.9, 0.999), 0,
                             total_steps, "constant", ctx)

    def step(batch):
        loss = with_mim(runner.forward(**inputs(batch)))
        runner.backward(loss)
        runner.step()
    return step


def build_model(adapter_mode: str):
    """The default model with a LoRA r16 (universal_only), C-LoRAE or C-LoRAE-without-MIM adapter, seeded."""
    import torch

    from clorae_ds.models import ModelConfig

    torch.manual_seed(0)
    adapter = {"rank": 16, "alpha": 32, "mode": adapter_mode}
    if adapter_mode == "clorae_without_mim":
        adapter.update(mode="clorae", mim_beta=0.0)
    return ModelConfig(family="encoder_decoder", pretrained="minilm", adapter=adapter).build()


def worker(mode: str, ds_config: str, steps: int, adapter_mode: str) -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(2 if world == 1 else 1)
    if mode == "paired":
        paired_worker(steps)  # exits the process
        return
    built = build_model(adapter_mode)
    batches, tokens = embedded_batches(built.tokenizer, 8, steps + 3, rank, world)
    step = training_step(built.model.train(), engine_config(ds_config, world), steps + 3)

    for batch in batches[:3]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[3:]:
        step(batch)
    elapsed = time.perf_counter() - start
    from clorae_ds.train.engine import sum_across_ranks

    rate = sum_across_ranks([sum(tokens[3:]) / elapsed], "cpu")[0]  # every rank's tokens
    if rank == 0:
        print("RESULT " + json.dumps({"tokens_per_s": rate, "seconds_per_step": elapsed / (len(batches) - 3)}),
              flush=True)
    sys.stdout.flush()
    os._exit(0)


def engine_config(ds_config: str, world: int) -> dict:
    from clorae_ds.train.ds_config import load_ds_config

    return load_ds_config(os.path.join(ROOT, "ds_configs", ds_config), world, micro_batch=8)  # embedded_batches' size


def engine_bf16() -> bool:
    """Whether the engine arms train in bf16: the configs enable it, and load_ds_config keeps it where the hardware
    has bf16 (a CPU with AVX512-BF16 or AMX-BF16), falling back to fp32 elsewhere."""
    from clorae_ds.train.ds_config import bf16_enabled

    return bf16_enabled(engine_config("zero0.json", 1))


def paired_worker(steps: int) -> None:
    """The PAIRED arms in one process, a model and a loop (or engine) each, every batch through each of them in
    turn (the order rotating with the batch): prints each arm's step times, step i of every arm on the same batch."""
    import torch

    steppers, tokenizer = [], None
    for _, ds_config, adapter_mode, compiled in PAIRED:
        built = build_model(adapter_mode)
        tokenizer = built.tokenizer
        model = built.model.train()
        if ds_config is None and engine_bf16():  # the engine arms' precision, so that the overhead compares like with like
            model.to(torch.bfloat16)
        steppers.append(training_step(model, engine_config(ds_config, 1) if ds_config else None, steps + 3, compiled))
    batches, tokens = embedded_batches(tokenizer, 8, steps + 3)
    seconds = [[] for _ in PAIRED]
    for i, batch in enumerate(batches):
        for k in range(len(PAIRED)):
            arm = (i + k) % len(PAIRED)
            start = time.perf_counter()
            steppers[arm](batch)
            if i >= 3:
                seconds[arm].append(time.perf_counter() - start)
    print("RESULT " + json.dumps({"tokens": tokens[3:], "step_seconds": seconds}), flush=True)
    sys.stdout.flush()
    os._exit(0)


def summary(label: str, ranks: int, runs: list) -> dict:
    rates = sorted(r["tokens_per_s"] for r in runs)
    return {"arm": label, "ranks": ranks, "tokens_per_s": statistics.median(rates),
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),
            "all_rounds": [round(r, 1) for r in rates]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", choices=["deepspeed", "paired"], help=argparse.SUPPRESS)
    parser.add_argument("--ds", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--adapter-mode", default="clorae", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.ds, args.steps, args.adapter_mode)
        return 0
    env = {**os.environ, "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    runs = {i: [] for i in range(len(ARMS))}
    for _ in range(args.rounds):
        for i, (label, mode, ds_config, ranks, adapter_mode) in enumerate(ARMS):
            cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(args.steps),
                   "--adapter-mode", adapter_mode] + (["--ds", ds_config] if ds_config else [])
            if ranks > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] + cmd[1:]
            proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1" if ranks > 1 else "2"}, capture_output=True,
                                  text=True, timeout=900)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"arm {label} x{ranks} failed")
            runs[i].append(json.loads(line[len("RESULT "):]))
    results, arm_runs = [], {}
    for i, (label, mode, _, ranks, _) in enumerate(ARMS):
        if mode == "paired":  # one arm per adapter: seconds per step and tokens/s from its own steps
            for k, (paired_label, *_) in enumerate(PAIRED):
                arm_runs[paired_label] = [r["step_seconds"][k] for r in runs[i]]
                runs_k = [{"tokens_per_s": sum(r["tokens"]) / sum(r["step_seconds"][k]),
                           "seconds_per_step": statistics.mean(r["step_seconds"][k])} for r in runs[i]]
                results.append(summary(paired_label, ranks, runs_k))
        else:
            results.append(summary(label, ranks, runs[i]))
    plain = results[0]["tokens_per_s"]
    print(f"{'arm':28s} {'ranks':>5s} {'tokens/s':>10s} {'s/step':>8s} {'vs plain':>9s}")
    for r in results:
        print(f"{r['arm']:28s} {r['ranks']:5d} {r['tokens_per_s']:10.1f} {r['seconds_per_step']:8.3f} "
              f"{r['tokens_per_s'] / plain:9.3f}")

    def paired_ratio(label, baseline):  # per step, the arms timed on the same batch seconds apart; per round and over all
        per_round = [[c / b for c, b in zip(arm_round, base_round)]
                     for arm_round, base_round in zip(arm_runs[label], arm_runs[baseline])]
        return (statistics.median(r for ratios in per_round for r in ratios),
                sorted(statistics.median(r) for r in per_round))

    overhead = {f"zero{stage}_1rank_overhead": round(paired_ratio(f"DeepSpeed ZeRO-{stage}", "plain loop")[0] - 1, 4)
                for stage in (0, 2)}
    step_ratio, step_rounds = paired_ratio("DeepSpeed ZeRO-0", "ZeRO-0, LoRA")
    without_mim_ratio, without_mim_rounds = paired_ratio("ZeRO-0, C-LoRAE without MIM", "ZeRO-0, LoRA")
    compiled_ratio, compiled_rounds = paired_ratio("ZeRO-0, C-LoRAE compiled", "ZeRO-0, LoRA compiled")
    print(f"C-LoRAE over LoRA per step, median of each round's steps: "
          f"{', '.join(f'{r:.3f}' for r in step_rounds)}; "
          f"without MIM: {', '.join(f'{r:.3f}' for r in without_mim_rounds)}; "
          f"compiled: {', '.join(f'{r:.3f}' for r in compiled_rounds)}")
    print(json.dumps({"precision": "bf16" if engine_bf16() else "fp32", "plain_tokens_per_s": round(plain, 1),
                      **overhead, "rounds": args.rounds, "steps": args.steps,
                      "clorae_over_lora_step": round(step_ratio, 4),
                      "clorae_over_lora_step_each_round": [round(r, 4) for r in step_rounds],
                      "clorae_without_mim_over_lora_step": round(without_mim_ratio, 4),
                      "clorae_without_mim_over_lora_step_each_round": [round(r, 4) for r in without_mim_rounds],
                      "compiled_clorae_over_compiled_lora_step": round(compiled_ratio, 4),
                      "compiled_clorae_over_compiled_lora_step_each_round": [round(r, 4) for r in compiled_rounds],
                      "arms": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
