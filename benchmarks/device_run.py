"""The prepared GPU run: the engine at scale and C-LoRAE vs LoRA at convergence, time-boxed to fit one command.

    bash benchmarks/device_run.sh --out DIR            # one H100/H200, about 9 minutes
    bash benchmarks/device_run.sh --out DIR --smoke    # CPU: tiny models, a few steps, a few minutes

Phases, in order, each given what is left of --budget-s (a phase that cannot fit is recorded as skipped):
1. sanity: the device, DeepSpeed, one ZeRO-2 bf16 step of launchers/train.py (NCCL on a GPU).
2. targets (TARGET_GROUPS, --engine-share of the budget): launchers/train.py on a T5-XL-shaped model (random
   weights), ZeRO-2, bf16, C-LoRAE beside LoRA (a pair is run whole or not at all), eager and compiled, phase
   timing off; first checkpointed at the largest micro-batch whose projected peak (benchmarks/bench_memory.py)
   fits 85 % of the chip, then at 32: tokens/s, step time, MFU, peak memory beside the projection. Targets:
   C-LoRAE MFU >= 20 %, C-LoRAE / LoRA step <= 1.15. MFU = model FLOPs per token × tokens/s ÷ the chip's dense
   bf16 peak, with 4 FLOPs a token per frozen parameter and 6 per trainable one (model_flops_per_token).
3. profile: benchmarks/profile_step.py on the default at the quality phase's micro-batch (LoRA and C-LoRAE, a plain
   loop and ZeRO-2): host and kernel time per step, kernels per step, the ops that take the time.
4. quality: the MiniLM encoder-decoder on the FULL train splits (built here from the raw data), C-LoRAE and LoRA
   trained at the same time on the one device (launchers/run_experiments.py --parallel), an equal number of
   epochs sized from a measured calibration, dev F1 after each epoch, the paired bootstrap against C-LoRAE, and
   each arm's best adapter (bf16, in a tar). Where fewer than --min-epochs full epochs fit, it runs
   --min-epochs evaluation rounds of as many steps as fit (a part of the data each: the summary says how much).
5. engine, the rest (OTHER_GROUPS) while time lasts: ZeRO-3 and T5-large, phase timing on (the step split into
   data wait, forward, backward and optimizer step).
6. adapter: benchmarks/bench_adapter.py in bf16 at a small and a large shape, eager and compiled.

Writes OUT/device_run.json, OUT/SUMMARY.md (also printed; both rewritten after every phase), OUT/logs.tar.gz and
OUT/adapter-ARM.tar per quality arm: few files.
Scratch work goes to --work (default /tmp/device_run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "launchers"))

import torch  # noqa: E402

from gpu_report import TARGETS, device_run_markdown  # noqa: E402

# Dense bf16 peak FLOP/s (no sparsity), by the device name's model: H100 SXM and H200 share the compute die.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}
SHAPES = {  # Flan-T5 shapes (gated-GELU feed-forward)
    "t5-xl": dict(d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_heads=32, feed_forward_proj="gated-gelu"),
    "t5-large": dict(d_model=1024, d_ff=2816, d_kv=64, num_layers=24, num_heads=16, feed_forward_proj="gated-gelu"),
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4),
}
# The engine runs' micro-batch: at 8 short samples (about 530 tokens a step) the T5-XL step was all host time.
ENGINE_MICRO_BATCH = 32
# A micro-batch large enough that T5-XL's kernels, not the host's launches, set the step time: the real samples
# are short (70 tokens each in the 2026-11-28 run: 390 tokens/s at 5.59 samples/s), so 1024 make some 72k tokens,
# ~0.45 s of the chip's bf16 peak at 6.2 GFLOP a token before the recompute, against ~1 s of host time a step there.
# Every block is recomputed in backward (model.gradient_checkpointing) so that the activations fit. MFU's target is
# measured there; its loader gets 6 workers (about 1,000 samples/s each on a CPU core). "sized": the largest
# micro-batch whose projected peak (benchmarks/bench_memory.py, measured on the chip, samples at the engine runs'
# length limits) fits 85 % of the chip's memory, for both methods.
ENGINE_LARGE_MICRO_BATCH = "sized"
ENGINE_LENGTHS = (256, 48)  # data.max_input_length / max_target_length of the engine runs
# Groups of engine runs, (shape, ZeRO stage, micro-batch, gradient checkpointing, compiled, phase timing, methods),
# each run whole or not at all. TARGET_GROUPS settle the targets and run first, right after the sanity check: T5-XL
# at ZeRO-2, C-LoRAE beside LoRA, eager and compiled (model.compile), phase timing off (its syncs stall the
# host's run-ahead, which is what the step ratio is about), at the sized micro-batch (MFU) and at 32.
TARGET_GROUPS = [("t5-xl", 2, ENGINE_LARGE_MICRO_BATCH, True, compiled, False, ("clorae", "lora"))
                 for compiled in (False, True)] + \
                [("t5-xl", 2, ENGINE_MICRO_BATCH, False, compiled, False, ("clorae", "lora")) for compiled in (False, True)]
# After the quality phase, while time lasts, with phase timing on: ZeRO-3 and the large shape (full fine-tuning too).
OTHER_GROUPS = [("t5-xl", 3, ENGINE_MICRO_BATCH, False, False, True, ("clorae", "lora")),
                ("t5-large", 2, ENGINE_MICRO_BATCH, False, False, True, ("clorae", "lora", "full_ft")),
                ("t5-large", 3, ENGINE_MICRO_BATCH, False, False, True, ("clorae", "lora"))]
# The smoke runs the eager target pair on a tiny model and one run with phase timing. Compiled training (its first
# step traces for over a minute on CPU even through aot_eager), ZeRO-3 and checkpointing have tests of their own.
SMOKE_TARGET_GROUPS = [("tiny", 2, 4, False, False, False, ("clorae", "lora"))]
SMOKE_OTHER_GROUPS = [("tiny", 2, 4, False, False, True, ("lora",))]
QUALITY_ARMS = ["clorae", "lora"]
# The GPU steps are host-bound (H200, 2026-11-28: C-LoRAE 0.26 s a step at micro-batch 32 for 16 ms of kernels), so
# a larger micro-batch costs little more per step: 128 gives about 4x the samples per second at about the number of
# optimiser steps the 32-sample run made, at the learning rate the CPU experiments found best for 32.
QUALITY_MICRO_BATCH = 128


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget = time.time(), budget_s

    def left(self) -> float:
        return self.budget - (time.time() - self.start)


def events(text: str) -> list[dict]:
    return [json.loads(line[line.find('{"event"'):]) for line in text.splitlines() if '{"event"' in line]


def run(cmd: list[str], timeout: float, log_path: str) -> tuple[int, str]:
    """Run a command with a hard timeout; (exit code, output). 124 when it ran out of time."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout), env=env, cwd=ROOT)
        code, out = proc.returncode, proc.stdout + proc.stderr[-20000:]
    except subprocess.TimeoutExpired as err:
        code = 124
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
    with open(log_path, "w") as f:
        f.write(out)
    return code, out


def ds_config(work: str, stage: int) -> str:
    with open(os.path.join(ROOT, "ds_configs", f"zero{stage}.json")) as f:
        config = json.load(f)
    config.update(bf16={"enabled": True})
    path = os.path.join(work, f"zero{stage}-bf16.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return path


def data_overrides(patterns: dict) -> list[str]:
    return [f"data.train={json.dumps(patterns['train'])}", f"data.dev={json.dumps(patterns['dev'])}"]


# --- phase 1 ------------------------------------------------------------------------------------------
def nonfinite_detection(device: str) -> bool:
    """Whether the engine's fused gradient overflow check (engine.grads_nonfinite, one torch._foreach_norm) finds a
    NaN and an inf on this device and passes finite gradients: CUDA's multi-tensor kernels are not the CPU's."""
    from clorae_ds.train.engine import grads_nonfinite

    grads = [torch.ones(3, 5, device=device, dtype=torch.bfloat16), torch.ones(700, device=device)]
    found = [bool(grads_nonfinite(grads, device))]
    for value in (float("nan"), float("inf")):
        grads[1][600] = value
        found.append(bool(grads_nonfinite(grads, device)))
    return found == [False, True, True]


def sanity(args, work: str, patterns: dict, clock: Clock) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        from clorae_ds.train.engine import deepspeed_version
        info["deepspeed"] = deepspeed_version()
    except Exception as err:  # noqa: BLE001 - reported, and the run stops here
        return {**info, "ok": False, "error": f"deepspeed does not import: {err}"}
    cmd = [sys.executable, "launchers/train.py", "--deepspeed", ds_config(work, 2), "--max-steps", "1",
           "--output-dir", os.path.join(work, "sanity"), "model.family=t5", "model.preset=tiny", "model.pretrained=null", "model.adapter={}",
           "eval.max_samples=2", "eval.max_new_tokens=4", "output.save=false", "schedule.max_minutes=null",
           "data.num_workers=1", "data.micro_batch_size=4", *data_overrides(patterns)]
    start = time.time()
    code, out = run(cmd, min(180, clock.left()), os.path.join(work, "sanity.log"))
    summary = next((e for e in events(out) if e["event"] == "summary"), None)
    ok = code == 0 and summary is not None and summary["global_step"] == 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # reported, not gating the run: DeepSpeed's gradient-norm check would still skip such a step
    detects = nonfinite_detection("cuda" if torch.cuda.is_available() else "cpu")
    return {**info, "ok": ok, "backend": backend, "seconds": round(time.time() - start, 1),
            "nonfinite_detection": detects, "error": None if ok else out[-2000:]}


def profile(args, work: str, clock: Clock) -> dict:
    if clock.left() - args.reserve_s < 2 * args.profile_s:
        return {"skipped": "time"}
    out = os.path.join(work, "profile")
    if args.smoke:
        shape = ["--batch", "4", "--dtype", "fp32", "--steps", "2", "--warmup", "1", "--profile-steps", "1"]
    else:
        shape = ["--batch", str(QUALITY_MICRO_BATCH), "--dtype", "bf16", "--steps", "6", "--warmup", "2",
                 "--profile-steps", "2"]
    code, text = run([sys.executable, "benchmarks/profile_step.py", "--out", out, "--arms", "lora,clorae",
                      "--engines", "zero2,plain", "--budget-s", str(args.profile_s), "--top", "8", *shape],
                     args.profile_s + 60, os.path.join(work, "profile.log"))
    path = os.path.join(out, "profile.json")
    if not os.path.isfile(path):
        return {"error": text[-1500:]}
    with open(path) as f:
        return json.load(f)


# --- phase 2 ------------------------------------------------------------------------------------------
def model_flops_per_token(frozen_params: int, trainable_params: int) -> int:
    """MFU's FLOPs a token: 4 per frozen parameter (forward and the backward to its input, no weight gradient) and 6
    per trainable one (the adapters' own, or every weight's in full fine-tuning); attention's score FLOPs are not
    counted."""
    return 4 * frozen_params + 6 * trainable_params


def peak_flops(device: str):
    for name, peak in PEAK_BF16.items():
        if name in device:
            return peak
    return None


def size_micro_batch(args, work: str, clock: Clock, rank: int) -> dict:
    """bench_memory on this chip: the largest micro-batch whose projected peak of a checkpointed T5-XL ZeRO-2 bf16
    step fits 85 % of its memory, for C-LoRAE and LoRA alike (the smaller), and each method's projection there."""
    from bench_memory import largest_micro_batch, project

    code, out = run([sys.executable, "benchmarks/bench_memory.py", "--rank", str(rank), "--input-tokens",
                     str(ENGINE_LENGTHS[0]), "--target-tokens", str(ENGINE_LENGTHS[1]), "--micro-batches", "1024"],
                    min(240, clock.left() - args.reserve_s), os.path.join(work, "bench_memory.log"))
    report = next((e for e in events(out) if e["event"] == "bench_memory"), None)
    if code != 0 or report is None:
        return {"error": "timed out" if code == 124 else out[-1500:]}
    capacity = torch.cuda.get_device_properties(0).total_memory

    def projection(method: str):
        row = report["methods"][method]
        return lambda micro_batch: project(row["measured"]["checkpointed"], row["frozen_params"],
                                           row["trainable_params"], micro_batch, ENGINE_LENGTHS[1],
                                           report["reduce_bucket"])

    micro_batch = min(largest_micro_batch(projection(method), capacity) for method in report["methods"])
    return {"micro_batch": micro_batch, "capacity_gib": round(capacity / 2**30, 2),
            "projected_peak_gib": {m: round(sum(projection(m)(micro_batch).values()) / 2**30, 2)
                                   for m in report["methods"]},
            "clorae_over_lora_saved_bytes": report["clorae_over_lora_saved_bytes"]}


def engine(args, work: str, patterns: dict, clock: Clock, device: str, groups: list, share: float, rows: list,
           publish) -> None:
    """Run `groups` (TARGET_GROUPS, OTHER_GROUPS) in order within `share` of the budget, appending a row per run to
    `rows` and calling publish() after each, so that a row is in OUT as soon as it is measured. A group that cannot
    fit whole (each run costed at the last run's time) is skipped whole."""
    steps, rank = (4, 8) if args.smoke else (args.engine_steps, 64)
    peak, phase_start = peak_flops(device), time.time()
    sizing = None
    for shape_name, stage, micro_batch, checkpointing, compiled, timed, methods in groups:
        group = [{"shape": shape_name, "zero": stage, "method": method, "micro_batch": micro_batch,
                  "gradient_checkpointing": checkpointing, "compiled": compiled, "phase_timing": timed}
                 for method in methods]
        rows.extend(group)
        if micro_batch == "sized":
            sizing = sizing or size_micro_batch(args, work, clock, rank)
            if not sizing.get("micro_batch"):
                for row in group:
                    row["skipped"] = f"no micro-batch sized: {sizing.get('error', 'none fits')}"[:300]
                continue
            micro_batch = sizing["micro_batch"]
            for row in group:
                row.update(micro_batch=micro_batch, projected_peak_gib=sizing["projected_peak_gib"].get(row["method"]),
                           capacity_gib=sizing["capacity_gib"])
        timed_rows = [r for r in rows if "seconds" in r]
        need = len(group) * (timed_rows[-1]["seconds"] * 1.2 if timed_rows else 60) * (1.5 if compiled else 1)
        left = min(share * clock.budget - (time.time() - phase_start), clock.left() - args.reserve_s)
        if left < need:
            for row in group:
                row["skipped"] = "time"
            publish()
            continue
        for row in group:
            engine_run(args, work, patterns, clock, row, steps, rank, peak,
                       min(clock.left() - args.reserve_s, share * clock.budget - (time.time() - phase_start) + 30))
            publish()
        clorae = next((r for r in group if r["method"] == "clorae" and "step_seconds" in r), None)
        lora = next((r for r in group if r["method"] == "lora" and "step_seconds" in r), None)
        if clorae and lora:
            clorae["clorae_over_lora_step"] = round(clorae["step_seconds"] / lora["step_seconds"], 3)
            publish()


def engine_run(args, work: str, patterns: dict, clock: Clock, row: dict, steps: int, rank: int, peak,
               timeout: float) -> None:
    """One launchers/train.py run of `row` (random weights, bf16): its tokens/s, step time, MFU, peak memory and,
    where phase timing is on, the step's split into data wait, forward, backward and optimizer step."""
    method, shape_name, micro_batch = row["method"], row["shape"], row["micro_batch"]
    adapter = {"full_ft": ["model.full_finetune=true", "model.adapter=null"],
               "lora": [f"model.adapter={{rank: {rank}, alpha: {2 * rank}, dropout: 0.1, mode: universal_only}}"],
               "clorae": [f"model.adapter={{rank: {rank}, alpha: {2 * rank}, dropout: 0.1}}"]}[method]
    name = (f"{shape_name}-z{row['zero']}-{method}-mb{micro_batch}" + ("-checkpointed" if row["gradient_checkpointing"]
                                                                        else "") + ("-compiled" if row["compiled"] else ""))
    cmd = [sys.executable, "launchers/train.py", "--deepspeed", ds_config(work, row["zero"]),
           "--max-steps", str(steps), "--output-dir", os.path.join(work, f"engine-{name}"),
           "model.family=t5", "model.preset=tiny", "model.pretrained=null", f"model.shape={json.dumps(SHAPES[shape_name])}",
           *adapter, f"model.compile={str(row['compiled']).lower()}",
           "schedule.log_every=" + str(max(1, steps // 5)), f"schedule.time_phases={str(row['phase_timing']).lower()}",
           "schedule.max_minutes=null", "eval.max_samples=1", "eval.max_new_tokens=2", "output.save=false",
           f"data.max_input_length={ENGINE_LENGTHS[0]}", f"data.max_target_length={ENGINE_LENGTHS[1]}",
           f"data.micro_batch_size={micro_batch}",
           f"data.num_workers={6 if 'projected_peak_gib' in row else 2}",
           f"model.gradient_checkpointing={str(row['gradient_checkpointing']).lower()}", *data_overrides(patterns)]
    start = time.time()
    code, out = run(cmd, timeout, os.path.join(work, f"engine-{name}.log"))
    row["seconds"] = round(time.time() - start, 1)
    log = events(out)
    train = [e for e in log if e["event"] == "train"][1:]  # the first interval holds the warm-up (and the compile)
    summary = next((e for e in log if e["event"] == "summary"), {})
    model = next((e for e in log if e["event"] == "model"), {})
    if code != 0 or not train or not model:
        row["error"] = "timed out" if code == 124 else out[-1500:]
        return
    tokens_per_s = statistics.median(e["tokens_per_s"] for e in train)
    samples_per_s = statistics.median(e["samples_per_s"] for e in train)
    per_token = model_flops_per_token(model["total_params"] - model["trainable_params"], model["trainable_params"])
    row.update(tokens_per_s=round(tokens_per_s, 1), samples_per_s=samples_per_s,
               step_seconds=round(micro_batch / samples_per_s, 4),  # one device: a step is a micro-batch
               model_gflops_per_token=round(per_token / 1e9, 3),
               mfu=round(per_token * tokens_per_s / peak, 4) if peak else None,
               peak_memory_gib=round(summary["peak_memory_bytes"] / 2**30, 2) if "peak_memory_bytes" in summary else None,
               trainable_params=model["trainable_params"], total_params=model["total_params"])
    if row["phase_timing"]:
        phases = {k: sum(e["phase_seconds"].get(k, 0.0) for e in train) for k in ("data_wait", "forward", "backward", "step")}
        total = sum(phases.values()) or 1.0
        row["step_split"] = {k: round(v / total, 3) for k, v in phases.items()}


# --- phase 3 ------------------------------------------------------------------------------------------
def experiments_cmd(args, out: str, budget: str, ds: str, extra: list[str]) -> list[str]:
    return [sys.executable, "launchers/run_experiments.py", "--budget", budget, "--arms", ",".join(QUALITY_ARMS),
            "--parallel", "--raw", args.raw, "--out", out, "--deepspeed", ds, "--base", args.base,
            *[f"--set={s}" for s in extra]]


def quality(args, work: str, clock: Clock) -> dict:
    budget = "smoke" if args.smoke else "large"
    micro_batch = 4 if args.smoke else QUALITY_MICRO_BATCH
    ds = ds_config(work, 2)
    evaluation = [f"data.micro_batch_size={micro_batch}", "eval.max_samples=8" if args.smoke else "eval.max_samples=300",
                  "eval.batch_size=16" if args.smoke else "eval.batch_size=256", "schedule.max_minutes=null",
                  f"optim.lr={args.lr}"]
    if clock.left() - args.reserve_s < 60:
        return {"skipped": "time"}
    final = os.path.join(work, "quality")
    shutil.rmtree(final, ignore_errors=True)
    if args.smoke:  # one epoch: the calibration would only plan the epochs
        result = {"micro_batch": micro_batch, "epochs": 1, "steps_per_epoch": None}
    else:
        result = calibrate(args, work, budget, ds, evaluation, micro_batch, clock)
        if "error" in result:
            return result
        shutil.copytree(os.path.join(work, "calibrate", "shards"), os.path.join(final, "shards"))  # built once
    epochs, steps_per_epoch = result["epochs"], result["steps_per_epoch"]
    partial = [] if steps_per_epoch is None else [f"data.batches_per_epoch={steps_per_epoch}"]
    cmd = experiments_cmd(args, final, budget, ds, evaluation + partial) + ["--epochs", str(epochs)]
    code, out = run(cmd, clock.left() - args.reserve_s, os.path.join(work, "quality.log"))
    if code != 0:
        result["error"] = "timed out" if code == 124 else out[-1500:]
        return result
    with open(os.path.join(final, "results.json")) as f:
        results = json.load(f)
    result["train_samples"] = train_samples(os.path.join(final, "shards"))
    result["results"] = results
    with open(os.path.join(final, "results.md")) as f:
        result["table"] = f.read()
    result["curves"] = {}
    for arm in QUALITY_ARMS:
        with open(os.path.join(final, f"{arm}-seed0", "train.log")) as f:
            result["curves"][arm] = [{"step": e["step"], "all": e["all"], "f1": e["f1"]}
                                     for e in events(f.read()) if e["event"] == "eval"]
        best = os.path.join(final, f"{arm}-seed0", "adapter_best")
        result.setdefault("adapters", {})[arm] = pack_adapter(best, os.path.join(args.out, f"adapter-{arm}.tar"))
    return result


def calibrate(args, work: str, budget: str, ds: str, evaluation: list, micro_batch: int, clock: Clock) -> dict:
    """Both arms side by side for a fixed number of steps (same processes, same data), then the epochs that fit."""
    calibration_dir = os.path.join(work, "calibrate")
    shutil.rmtree(calibration_dir, ignore_errors=True)
    start = time.time()
    calibration = [f"schedule.max_steps={args.calibration_steps}", "eval.max_samples=2",
                   f"schedule.log_every={max(1, args.calibration_steps // 6)}"]
    code, out = run(experiments_cmd(args, calibration_dir, budget, ds, evaluation + calibration),
                    clock.left() - args.reserve_s, os.path.join(work, "calibrate.log"))
    if code != 0:
        return {"error": "calibration failed: " + out[-1500:]}
    calibration_seconds = time.time() - start
    rates = [json.load(open(os.path.join(calibration_dir, f"{arm}-seed0", "result.json")))["samples_per_s"]
             for arm in QUALITY_ARMS]
    samples = train_samples(os.path.join(calibration_dir, "shards"))
    # Both arms run at once, so the slower one's rate (measured side by side) sets the pace; one evaluation
    # per epoch is budgeted at the calibration's fixed cost (startup + one small evaluation) per epoch / 4.
    rate = min(r for r in rates if r) if all(rates) else None
    available = clock.left() - args.reserve_s - calibration_seconds  # startup and shard building again
    eval_seconds = calibration_seconds / 4
    epoch_seconds = samples / rate + eval_seconds if rate else None
    epochs, steps_per_epoch = plan_epochs(samples, rate, available, eval_seconds, args.min_epochs, micro_batch)
    return {"train_samples": samples, "micro_batch": micro_batch, "calibration_samples_per_s": rates,
            "epochs": epochs, "steps_per_epoch": steps_per_epoch,
            "planned_seconds_per_epoch": round(epoch_seconds, 1) if epoch_seconds else None}


def train_samples(shards: str) -> int:
    return sum(json.load(open(os.path.join(shards, f)))["samples"] for f in os.listdir(shards)
               if f.endswith("-train.index.json"))


def plan_epochs(train_samples: int, rate, available: float, eval_seconds: float, min_epochs: int,
                micro_batch: int) -> tuple:
    """(epochs, steps per epoch or None for full epochs) that fit `available` seconds at `rate` samples/s with
    one evaluation of `eval_seconds` per epoch: as many full epochs as fit, or, when fewer than `min_epochs` do,
    `min_epochs` rounds of as many steps as fit."""
    if not rate:
        return 1, None
    epochs = int(available // (train_samples / rate + eval_seconds))
    if epochs >= min_epochs:
        return epochs, None
    return min_epochs, max(1, int((available / min_epochs - eval_seconds) * rate / micro_batch))


def pack_adapter(directory: str, tar_path: str):
    """The adapter folder as one tar, weights cast to bf16 (half the size; files coming back are capped)."""
    from safetensors.torch import load_file, save_file

    if not os.path.isdir(directory):
        return None
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(os.path.join(directory, "clorae_model.safetensors")).items()}
    scratch = directory + "-bf16"
    os.makedirs(scratch, exist_ok=True)
    save_file(tensors, os.path.join(scratch, "clorae_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(directory, "clorae_config.json"), scratch)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(scratch, arcname=os.path.basename(directory))
    return {"file": os.path.basename(tar_path), "bytes": os.path.getsize(tar_path)}


# --- phase 4 ------------------------------------------------------------------------------------------
def adapter_bench(args, work: str, clock: Clock) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [["--batch", "8", "--seq", "128"], ["--d-model", "1024", "--d-ff", "4096", "--batch", "32", "--seq", "512"]]
    if args.smoke:
        shapes = [["--d-model", "64", "--d-ff", "128", "--layers", "1", "--rank", "8", "--batch", "2", "--seq", "8",
                   "--rounds", "2"]]
    rows = []
    for i, shape in enumerate(shapes):
        if clock.left() < 20:
            rows.append({"args": shape, "skipped": "time"})
            continue
        code, out = run([sys.executable, "benchmarks/bench_adapter.py", "--device", device, "--dtype", "bf16",
                         "--rounds", "5", *([] if args.smoke else ["--compiled"]), *shape],
                        clock.left() - 5, os.path.join(work, f"bench_adapter-{i}.log"))
        last = [line for line in out.splitlines() if line.startswith("{")]
        rows.append({"args": shape, **({k: v for k, v in json.loads(last[-1]).items() if k != "arms"} if code == 0 and last
                                       else {"error": out[-1000:]})})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny models, a few steps")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 530; smoke 400)")
    parser.add_argument("--work", default="/tmp/device_run")
    parser.add_argument("--raw", default=None, help="raw data folder (default: .whl/raw.tar.gz unpacked, else "
                                                    "../shared/data/raw)")
    parser.add_argument("--base", default=None, help="quality recipe (default experiments/base.yaml with the MiniLM "
                                                     "from .whl/minilm when present; smoke: a tiny T5)")
    parser.add_argument("--lr", type=float, default=8e-4, help="the quality arms' adapter learning rate")
    parser.add_argument("--engine-steps", type=int, default=12)
    parser.add_argument("--engine-share", type=float, default=0.8,
                        help="share of the budget the target pairs (phase 2) may use")
    parser.add_argument("--calibration-steps", type=int, default=40)
    parser.add_argument("--min-epochs", type=int, default=4,
                        help="evaluation rounds of the quality phase at least (each a part of an epoch if need be)")
    parser.add_argument("--profile-s", type=float, default=None, help="the step profile's budget (default 70; smoke 40)")
    parser.add_argument("--reserve-s", type=float, default=None, help="kept for the adapter benchmark and the report")
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s or (400 if args.smoke else 530)
    args.reserve_s = args.reserve_s if args.reserve_s is not None else (20 if args.smoke else 50)
    args.profile_s = args.profile_s or (40 if args.smoke else 70)
    clock = Clock(args.budget_s)
    os.makedirs(args.out, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    args.raw = args.raw or prepare_raw(args.work)
    args.base = args.base or base_recipe(args, args.work)

    from run_experiments import build_all_shards

    # Samples a dataset for the sanity and engine phases: an epoch holds 12 steps of the large micro-batch
    small = build_all_shards(args.raw, os.path.join(args.work, "small-shards"), 64 if args.smoke else 2500, 16)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": args.smoke,
              "budget_s": args.budget_s, "targets": TARGETS, "engine": []}

    def publish():  # after every row and phase: a run killed from outside still leaves what it measured
        write_report(args, report, clock)

    report["sanity"] = sanity(args, args.work, small, clock)
    publish()
    if report["sanity"]["ok"]:
        device = report["sanity"]["device"]
        engine(args, args.work, small, clock, device, SMOKE_TARGET_GROUPS if args.smoke else TARGET_GROUPS,
               args.engine_share, report["engine"], publish)
        report["profile"] = profile(args, args.work, clock)
        publish()
        report["quality"] = quality(args, args.work, clock)
        publish()
        engine(args, args.work, small, clock, device, SMOKE_OTHER_GROUPS if args.smoke else OTHER_GROUPS, 1.0,
               report["engine"], publish)
    report["adapter_bench"] = adapter_bench(args, args.work, clock)
    print(write_report(args, report, clock))
    return 0 if report["sanity"]["ok"] else 1


def write_report(args, report: dict, clock: Clock) -> str:
    """OUT/device_run.json, OUT/SUMMARY.md and OUT/logs.tar.gz (every phase's log); the summary's text."""
    report["wall_seconds"] = round(time.time() - clock.start, 1)
    with open(os.path.join(args.out, "device_run.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = device_run_markdown(report)
    with open(os.path.join(args.out, "SUMMARY.md"), "w") as f:
        f.write(text)
    with tarfile.open(os.path.join(args.out, "logs.tar.gz"), "w:gz") as tar:
        for name in sorted(os.listdir(args.work)):
            if name.endswith(".log"):
                tar.add(os.path.join(args.work, name), arcname=name)
        for arm in QUALITY_ARMS:  # the quality arms' own training logs
            log = os.path.join(args.work, "quality", f"{arm}-seed0", "train.log")
            if os.path.isfile(log):
                tar.add(log, arcname=f"quality-{arm}-train.log")
    return text


def prepare_raw(work: str) -> str:
    packed = os.path.join(ROOT, ".whl", "raw.tar.gz")
    if os.path.isfile(packed):
        with tarfile.open(packed) as tar:
            tar.extractall(work, filter="data")
        return os.path.join(work, "raw")
    return os.path.join(ROOT, "..", "shared", "data", "raw")


def base_recipe(args, work: str) -> str:
    import yaml

    with open(os.path.join(ROOT, "experiments", "base.yaml")) as f:
        base = yaml.safe_load(f)
    if args.smoke:
        base["model"] = {"family": "t5", "preset": "tiny"}
        base["data"].update(max_input_length=64, max_target_length=24)
    elif os.path.isdir(os.path.join(ROOT, ".whl", "minilm")):
        base["model"]["pretrained"] = os.path.join(ROOT, ".whl", "minilm")
    base["data"]["num_workers"] = 1 if args.smoke else 4
    path = os.path.join(work, "base.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(base, f)
    return path


if __name__ == "__main__":
    sys.exit(main())
