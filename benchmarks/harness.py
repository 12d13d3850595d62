"""What the benchmarks share: arms timed side by side, host ops and syncs counted, saved bytes counted, a device's
kernel policy forced, worker processes, and the output: a Markdown table, then one JSON line."""
from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# Ops that only reinterpret a tensor's metadata: no kernel runs for them, so op counts leave them out.
VIEW_OPS = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
    "squeeze", "alias", "detach", "_reshape_alias", "reshape", "view_as", "unflatten", "flatten", "narrow", "split",
    "chunk", "unbind", "expand_as", "lift_fresh", "split_with_sizes", "numpy_T", "contiguous"))
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero"})  # each reads a device value on the host


def interleaved_seconds(steps: dict[str, Callable[[int], None]], rounds: int, warmup: int = 3,
                        sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Each arm's step(round) timed once a round, the arms in turn and the order rotating round by round, so that
    arms compare steps timed seconds apart (arms timed minutes apart drift by more than they differ on a shared
    machine). `warmup` untimed rounds first; round numbers count them."""
    names = list(steps)
    seconds = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        for k in range(len(names)):
            name = names[(round_ + k) % len(names)]
            sync()
            start = time.perf_counter()
            steps[name](round_)
            sync()
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def median_ratio(seconds: list[float], baseline: list[float]) -> float:
    """The median over rounds of an arm's time over the baseline's in the same round."""
    return statistics.median(a / b for a, b in zip(seconds, baseline))


def sync_site(event) -> str:
    """Who asked for a host sync: the innermost Python frame (the profiler's Python events are an op's ancestors)
    in the project, DeepSpeed, transformers or torch.optim; two kinds that are no device sync on a GPU are named
    apart: torch.optim's step counters (CPU tensors) and the range check of task ids kept on the CPU."""
    caller = event.cpu_parent
    while caller is not None:
        path = caller.name.replace(os.sep, "/")
        if "torch/optim/" in path:
            return "optimizer step counters"
        if path.endswith(": check_task_ids"):
            return "task ids on the CPU"
        if "transformers/" in path:
            return "transformers:" + path.split("transformers/", 1)[1]
        if path.startswith("deepspeed/") or "/deepspeed/" in path:
            return "deepspeed:" + path.split("deepspeed/", 1)[1]
        if any(f"{part}/" in path for part in ("clorae_ds", "launchers", "benchmarks", "tests")):
            return "project:" + path.rsplit("/", 1)[-1]
        caller = caller.cpu_parent
    return "other"


def count_host_work(run: Callable[[], None], calls: int = 1) -> dict:
    """Per call of `run`, under torch.profiler (which, unlike a dispatch mode, lets a compiled function run
    compiled): ATen ops dispatched at the top level, views left out, plus inductor's generated kernels (where
    torch._inductor.config.cpp.enable_kernel_profile is on), and host syncs by call site."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(calls):
            run()
    ops, syncs = 0, collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name in SYNC_OPS:
            syncs[sync_site(event)] += 1
        elif "cpp_fused" in event.name or event.name.startswith("aten::") and event.name not in VIEW_OPS \
                and not (parent is not None and parent.name.startswith("aten::")):
            ops += 1
    return {"ops_per_step": ops / calls, "syncs_per_step": {site: n / calls for site, n in sorted(syncs.items())}}


def saved_bytes(run: Callable[[], object], parameters=()) -> int:
    """Bytes autograd keeps for backward while `run()` runs (its result alive until counted), each storage once,
    parameters' storages left out: the CPU stand-in for an accelerator's activation memory."""
    weights = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    import torch

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    del result
    return sum(saved.values())


def force_kernel_policy(model, device_type: str, **changes) -> None:
    """The adapter layers of `model` take `device_type`'s kernel choices (KERNEL_POLICIES), with `changes`:
    counts of one device's code paths taken on another."""
    from dataclasses import replace

    from clorae_ds.adapters import KERNEL_POLICIES, KernelPolicy, set_kernel_policy

    set_kernel_policy(model, replace(KERNEL_POLICIES.get(device_type, KernelPolicy()), **changes))


def run_worker(cmd: list[str], env: Optional[dict] = None, timeout: float = 1800) -> dict:
    """Run a benchmark's worker process; the JSON object on the last line of its stdout. A failure stops the
    benchmark with the worker's output."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:,.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def emit(summary: dict, *text: str) -> None:
    """Print `text` (a title, tables), then the benchmark's one JSON line, last, for whoever reads the output."""
    for block in text:
        print(block)
    print(json.dumps(summary))
    sys.stdout.flush()
