"""Where one training step's time goes on this device: the embedded default (MiniLM encoder-decoder) at a given
micro-batch, LoRA and C-LoRAE (with and without MIM), in a plain PyTorch loop and under DeepSpeed ZeRO-2.

    python benchmarks/profile_step.py --device cuda --dtype bf16 --batch 32 --out DIR
    python benchmarks/profile_step.py --device cpu --dtype fp32 --batch 4 --steps 3 --out DIR   (a quick look)

Per arm: seconds per step (device synchronised at both ends of the timed steps), then torch.profiler over a few
more steps: host time per step, device (kernel) time per step, kernel launches and host-device syncs per step,
and the ops that take the most host and device time. A step whose host time is far above its kernel time is
launch-bound: its cost is the number of ops, not their FLOPs. Writes DIR/profile.json and DIR/profile.md (also
printed), rewritten after every arm; arms that would overrun --budget-s are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_report import profile_markdown  # noqa: E402

ADAPTERS = {"lora": "universal_only", "clorae": "clorae", "clorae_without_mim": "clorae_without_mim"}  # arm: mode
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def batches_for(args, built, device) -> tuple[list[dict], list[int]]:
    from benchmarks.default_step import embedded_batches

    batches, tokens = embedded_batches(built.tokenizer, args.batch, args.warmup + args.steps + args.profile_steps)
    return [{k: v.to(device) for k, v in b.items()} for b in batches], tokens


def step_function(args, engine: str, built, device, dtype):
    from benchmarks.default_step import training_step

    model = built.model.train()
    if engine == "plain":
        model.to(device=device, dtype=dtype)
        return training_step(model)
    from clorae_ds.train.ds_config import load_ds_config

    config = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"), 1, micro_batch=args.batch)
    config.update(bf16={"enabled": dtype == torch.bfloat16})
    return training_step(model, config)


def profile_arm(args, engine: str, arm: str, device, dtype) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.default_step import build_model

    built = build_model(ADAPTERS[arm], args.rank, args.pretrained)
    batches, tokens = batches_for(args, built, device)
    step = step_function(args, engine, built, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm, timed = batches[:args.warmup], batches[args.warmup:args.warmup + args.steps]
    for batch in warm:
        step(batch)
    sync()
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    sync()
    seconds = (time.perf_counter() - start) / len(timed)
    row = {"engine": engine, "arm": arm, "seconds_per_step": round(seconds, 5),
           "tokens_per_s": round(sum(tokens[args.warmup:args.warmup + args.steps]) / (seconds * len(timed)), 1)}

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiled = batches[args.warmup + args.steps:]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for batch in profiled:
            step(batch)
        sync()
        wall = (time.perf_counter() - start) / len(profiled)
    events = prof.key_averages()
    n = len(profiled)
    per_step = lambda us: round(us / n / 1000, 3)  # noqa: E731 - microseconds in total -> ms per step
    device_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = [e for e in events if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)]
    row.update(
        profiled_ms_per_step=round(1000 * wall, 3),
        kernel_ms_per_step=per_step(sum(getattr(e, device_attr) for e in kernels)),
        kernels_per_step=round(sum(e.count for e in kernels) / n, 1),
        launches_per_step=round(sum(e.count for e in events if e.key in LAUNCHES) / n, 1),
        syncs_per_step=round(sum(e.count for e in events if e.key in SYNCS) / n, 1),
        memcpy_per_step=round(sum(e.count for e in events if e.key in ("cudaMemcpyAsync", "cudaMemcpy")) / n, 1),
        top_host=[{"op": e.key[:60], "calls": round(e.count / n, 1), "self_ms": per_step(e.self_cpu_time_total)}
                  for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]],
        top_device=[{"op": e.key[:60], "calls": round(e.count / n, 1), "ms": per_step(getattr(e, device_attr))}
                    for e in sorted(kernels, key=lambda e: -getattr(e, device_attr))[:args.top]],
        ops_per_step=round(sum(e.count for e in events if not e.key.startswith(("cuda", "cu"))
                               and e not in kernels) / n, 1))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pretrained", default=None,
                        help="MiniLM folder (default .whl/minilm when present, else the installed package)")
    parser.add_argument("--engines", default="plain,zero2")
    parser.add_argument("--arms", default="lora,clorae,clorae_without_mim")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--budget-s", type=float, default=None, help="skip arms once this much wall time is spent")
    args = parser.parse_args(argv)
    local = os.path.join(ROOT, ".whl", "minilm")
    args.pretrained = args.pretrained or (local if os.path.isdir(local) else "minilm")
    device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cuda":  # the kernels the trainer uses (init_distributed does the same)
        from clorae_ds.train.hardware import configure_cuda_kernels
        configure_cuda_kernels()
    os.makedirs(args.out, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "batch": args.batch, "rank": args.rank, "dtype": args.dtype, "arms": []}
    start, longest = time.time(), 0.0
    for engine in args.engines.split(","):
        for arm in args.arms.split(","):
            if args.budget_s is not None and time.time() - start + 1.2 * longest > args.budget_s:
                report["arms"].append({"engine": engine, "arm": arm, "skipped": "time"})
                continue
            arm_start = time.time()
            try:
                row = profile_arm(args, engine, arm, device, dtype)
            except Exception as err:  # noqa: BLE001 - recorded; the other arms still run
                import traceback
                row = {"engine": engine, "arm": arm, "error": f"{err}\n{traceback.format_exc()}"}
            longest = max(longest, time.time() - arm_start)
            report["arms"].append(row)
            lora = next((r for r in report["arms"] if r["engine"] == engine and r["arm"] == "lora"
                         and "seconds_per_step" in r), None)
            if lora and "seconds_per_step" in row:
                row["over_lora"] = round(row["seconds_per_step"] / lora["seconds_per_step"], 3)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            with open(os.path.join(args.out, "profile.json"), "w") as f:
                json.dump(report, f, indent=1)
            with open(os.path.join(args.out, "profile.md"), "w") as f:
                f.write(profile_markdown(report))
    print(profile_markdown(report))
    return 0 if all("seconds_per_step" in r or "skipped" in r for r in report["arms"]) else 1


if __name__ == "__main__":
    sys.exit(main())
