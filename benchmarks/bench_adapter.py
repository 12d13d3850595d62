"""C-LoRAE adapter cost beside peft LoRA and a per-task loop, measured side by side in one run.

    python benchmarks/bench_adapter.py [--device cuda --dtype bf16] [--rounds 20] [--compiled]

A randomly initialised T5 encoder (d_model 512, d_ff 2048, 6 layers by default; all six projections q, k,
v, o, wi, wo adapted), rank r 64, 3 tasks, a mixed batch of 8 x 128 tokens. Each arm runs forward +
backward of the same loss; arms are interleaved round by round and the median time is kept. Each arm's ATen ops per
step (views excluded: about one kernel each on a GPU, where the small shape is launch-bound) are counted once
beside its time. `--compiled` adds C-LoRAE and peft LoRA through torch.compile, timed in the same rounds. On a
device where the layer pads its rank-space widths (CPU, CUDA: KernelPolicy.rank_alignment), two arms
more run C-LoRAE with them unpadded (clorae_unpadded, with and without MIM), which measure that choice. Prints a
table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import T5Config, T5EncoderModel

from clorae_ds.adapters import (KERNEL_POLICIES, CLoRAEConfig, KernelPolicy, apply_clorae, collect_mim_loss,
                                set_kernel_policy, task_routing)
from clorae_ds.adapters.layer import CLoRAELinear

TARGETS = ["q", "k", "v", "o", "wi", "wo"]


class LoopCLoRAELinear(nn.Module):
    """The same math as CLoRAELinear written the straightforward way: plain autograd, a boolean mask and
    an index copy per task."""

    def __init__(self, layer: CLoRAELinear):
        super().__init__()
        self.layer, self.base, self.config = layer, layer.base, layer.config
        self.dropout = nn.Dropout(layer.config.dropout)
        self.task_ids = None
        self.weight = layer.base.weight

    def forward(self, x):
        w = self.layer.split_experts(self.layer.expert_A, self.layer.expert_B)
        xd = self.dropout(x)
        gates = torch.softmax(x @ torch.stack([-w["gate_row"], w["gate_row"]]).t(), dim=-1)  # W_g = [−p; p]
        universal = xd @ w["universal_A"].t() @ w["universal_B"].t()
        task = torch.zeros_like(universal)
        for n in range(self.config.num_tasks):
            mask = self.task_ids == n
            if mask.any():
                task[mask] = xd[mask] @ w["task_A"][n].t() @ w["task_B"][n].t()
        return self.base(x) + self.config.scaling * (gates[..., :1] * universal + gates[..., 1:] * task)


def build_arm(name, t5_config, rank, dropout, device, dtype, **adapter_options):
    torch.manual_seed(0)
    model = T5EncoderModel(t5_config)
    if name == "peft_lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                 target_modules=TARGETS))
    else:
        apply_clorae(model, CLoRAEConfig(rank=rank, alpha=2 * rank, dropout=dropout, target_modules=TARGETS,
                                         **adapter_options))
        if name == "per_task_loop":
            for module_name, module in list(model.named_modules()):
                for child_name, child in list(module.named_children()):
                    if isinstance(child, CLoRAELinear):
                        setattr(module, child_name, LoopCLoRAELinear(child))
    # Non-zero B so every path does real arithmetic.
    for param_name, param in model.named_parameters():
        if param.requires_grad and ("_B" in param_name or "lora_B" in param_name):
            nn.init.normal_(param, std=0.02)
    return model.to(device=device, dtype=dtype).train()


def make_step(name, model, input_ids, task_ids, compiled: bool = False):
    """step(): forward, the loss (+ β·MIM for C-LoRAE), backward; `compiled`: the forward and loss through
    torch.compile (inductor, static shapes), backward through its compiled graph."""
    loop_layers = [m for m in model.modules() if isinstance(m, LoopCLoRAELinear)]

    def loss_of():
        if name == "peft_lora":
            return model(input_ids=input_ids).last_hidden_state.float().pow(2).mean()
        if loop_layers:
            device_ids = task_ids.to(input_ids.device)
            for layer in loop_layers:
                layer.task_ids = device_ids
            return model(input_ids=input_ids).last_hidden_state.float().pow(2).mean()
        with task_routing(model, task_ids):
            loss = model(input_ids=input_ids).last_hidden_state.float().pow(2).mean()
            mim = collect_mim_loss(model)
        return loss if mim is None else loss + model.clorae_config.mim_beta * mim

    forward = torch.compile(loss_of, dynamic=False) if compiled else loss_of

    def step():
        forward().backward()
        model.zero_grad(set_to_none=True)
    return step


def unpadded(step, model, device_type: str):
    """step with the layer's rank-space widths left as they are on this device: R = 127 expert columns (r 64, N 3,
    r_t 21) make every adapter product's width odd, which MKL runs slower and tensor-core kernels want 16-byte
    aligned, against the few kernels a layer call the padding costs."""
    set_kernel_policy(model, replace(KERNEL_POLICIES.get(device_type, KernelPolicy()), rank_alignment=1))
    return step


def saved_activation_bytes(step) -> int:
    """Bytes autograd keeps for backward in one step (parameters excluded): the CPU stand-in for peak
    accelerator memory."""
    seen, total = set(), [0]

    def pack(t):
        if not isinstance(t, nn.Parameter):
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in seen:
                seen.add(key)
                total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total[0]


# Ops that only reinterpret a tensor's metadata: no kernel runs for them.
VIEW_OPS = frozenset({"alias", "as_strided", "detach", "expand", "narrow", "permute", "select", "slice", "split",
                      "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unsqueeze", "view", "_unsafe_view",
                      "_reshape_alias", "lift_fresh"})


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEW_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(step) -> int:
    """ATen ops one step runs below autograd, views excluded: about one kernel launch each on a GPU, the count a
    launch-bound step's time follows (exact and repeatable, unlike a time on a shared machine). Each device's own
    paths are counted (on CPU the layer's dropout mask and rank padding add ops a GPU does not run)."""
    with _OpCounter() as counter:
        step()
    return counter.count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compiled", action="store_true",
                        help="also C-LoRAE and peft LoRA through torch.compile (compiled_clorae_over_compiled_peft_lora)")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    t5_config = T5Config(d_model=args.d_model, d_ff=args.d_ff, num_layers=args.layers, num_heads=8, d_kv=args.d_model // 8,
                         vocab_size=32128, dropout_rate=0.0)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 32000, (args.batch, args.seq), generator=gen).to(args.device)
    # A mixed batch of the 3 tasks, sorted by task as the collator delivers it.
    task_ids = torch.arange(args.batch) * 3 // args.batch
    shuffled_ids = task_ids[torch.randperm(args.batch, generator=gen)]

    # arm: (task ids, implementation, adapter options). The loop arm has no MIM, so it is compared with
    # C-LoRAE without MIM; "clorae" is the full training-time cost (MIM on, beta 0.01).
    arms = {"peft_lora": (task_ids, "peft_lora", {}),
            "clorae": (task_ids, "clorae", {}),
            "clorae_without_mim": (task_ids, "clorae", {"mim_beta": 0.0}),
            "clorae_unsorted_batch": (shuffled_ids, "clorae", {}),
            "universal_only": (task_ids, "clorae", {"mode": "universal_only"}),
            "per_task_loop": (task_ids, "per_task_loop", {"mim_beta": 0.0})}
    if args.compiled:
        arms.update(peft_lora_compiled=(task_ids, "peft_lora", {}), clorae_compiled=(task_ids, "clorae", {}))
    # Where this device pads rank-space widths, the same two unpadded
    device_type = torch.device(args.device).type
    if KERNEL_POLICIES.get(device_type, KernelPolicy()).rank_alignment > 1:
        arms.update(clorae_unpadded=(task_ids, "clorae", {}), clorae_unpadded_without_mim=(task_ids, "clorae", {"mim_beta": 0.0}))
    steps, reports = {}, {}
    for arm, (ids, kind, options) in arms.items():
        model = build_arm(kind, t5_config, args.rank, args.dropout, args.device, dtype, **options)
        compiled = arm.endswith("_compiled")
        steps[arm] = make_step(kind, model, input_ids, ids, compiled)
        if arm.startswith("clorae_unpadded"):
            steps[arm] = unpadded(steps[arm], model, device_type)
        reports[arm] = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if not compiled:  # a dispatch mode or saved-tensor hooks would run a compiled step eagerly (bench_host counts it)
            reports[arm].update(saved_activation_bytes=saved_activation_bytes(steps[arm]),
                                ops_per_step=dispatched_ops(steps[arm]))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(3):
            step()
    times = {arm: [] for arm in steps}
    for _ in range(args.rounds):
        for arm, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[arm].append(time.perf_counter() - start)
    if args.device == "cuda":
        for arm, step in steps.items():
            torch.cuda.reset_peak_memory_stats()
            step()
            reports[arm]["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    for arm in steps:
        reports[arm]["fwd_bwd_ms"] = 1000 * statistics.median(times[arm])

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}, dtype {dtype}, T5 encoder d_model {args.d_model} d_ff {args.d_ff} x "
          f"{args.layers} layers, r {args.rank}, batch {args.batch} x {args.seq}, {args.rounds} rounds")
    print(f"{'arm':24s} {'fwd+bwd ms':>11s} {'vs peft':>8s} {'trainable':>11s} {'saved act MB':>13s} {'ops':>6s}")
    base_ms = reports["peft_lora"]["fwd_bwd_ms"]
    for arm, r in reports.items():
        saved = f"{r['saved_activation_bytes'] / 2**20:13.1f}" if "ops_per_step" in r else f"{'—':>13s}"
        print(f"{arm:24s} {r['fwd_bwd_ms']:11.2f} {r['fwd_bwd_ms'] / base_ms:8.3f} {r['trainable_params']:11,d} "
              f"{saved} {r.get('ops_per_step', '—'):>6}")
    summary = {
        "clorae_over_peft_lora": round(reports["clorae"]["fwd_bwd_ms"] / base_ms, 4),
        "clorae_without_mim_over_peft_lora": round(reports["clorae_without_mim"]["fwd_bwd_ms"] / base_ms, 4),
        "loop_over_clorae": round(reports["per_task_loop"]["fwd_bwd_ms"] / reports["clorae_without_mim"]["fwd_bwd_ms"], 4),
        "universal_only_over_peft_lora": round(reports["universal_only"]["fwd_bwd_ms"] / base_ms, 4),
        **{f"{arm}_over_peft_lora": round(reports[arm]["fwd_bwd_ms"] / base_ms, 4)
           for arm in ("clorae_unpadded", "clorae_unpadded_without_mim") if arm in reports},
        "clorae_unsorted_over_peft_lora": round(reports["clorae_unsorted_batch"]["fwd_bwd_ms"] / base_ms, 4),
        "clorae_over_peft_lora_ops": round(reports["clorae"]["ops_per_step"] / reports["peft_lora"]["ops_per_step"], 4),
        **({"compiled_clorae_over_compiled_peft_lora": round(reports["clorae_compiled"]["fwd_bwd_ms"]
                                                             / reports["peft_lora_compiled"]["fwd_bwd_ms"], 4)}
           if args.compiled else {}),
        "device": device_name, "dtype": str(dtype).replace("torch.", ""), "arms": reports,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
