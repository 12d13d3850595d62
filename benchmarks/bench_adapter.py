"""What the C-LoRAE layer costs a training step beside peft LoRA, side by side in one run.

    python benchmarks/bench_adapter.py [--device cuda --dtype bf16] [--rounds 20] [--compiled]

A randomly initialised T5 encoder (d_model 512, d_ff 2048, 6 layers by default; all six projections q, k, v, o, wi,
wo adapted), rank 64, 3 tasks, a mixed batch of 8 x 128 tokens. Each arm runs forward + backward of the same loss
(C-LoRAE's with β·MIM); the arms take turns round by round and each one's median is kept (harness). Beside its time,
an arm's host ops per step (views left out: about one kernel each on a GPU, where the small shape is launch-bound),
the bytes it saves for backward and its trainable parameters. `--compiled` adds C-LoRAE and peft LoRA through
torch.compile. Where the layer pads its rank-space widths (KernelPolicy.rank_alignment: CPU, CUDA), two more arms run
C-LoRAE with them unpadded, to measure that choice. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch._inductor.config
from torch import nn
from transformers import T5Config, T5EncoderModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import count_host_work, emit, force_kernel_policy, interleaved_seconds, markdown_table, saved_bytes  # noqa: E402

from clorae_ds.adapters import KERNEL_POLICIES, CLoRAEConfig, KernelPolicy, apply_clorae, collect_mim_loss, task_routing  # noqa: E402

TARGETS = ["q", "k", "v", "o", "wi", "wo"]


def build_arm(kind: str, t5_config, rank: int, dropout: float, device, dtype, **adapter_options):
    """peft LoRA, or C-LoRAE with `adapter_options`, on the same seeded encoder, B non-zero so every path computes."""
    torch.manual_seed(0)
    model = T5EncoderModel(t5_config)
    if kind == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                 target_modules=TARGETS))
    else:
        apply_clorae(model, CLoRAEConfig(rank=rank, alpha=2 * rank, dropout=dropout, target_modules=TARGETS,
                                         **adapter_options))
    for name, param in model.named_parameters():
        if param.requires_grad and ("_B" in name or "lora_B" in name):
            nn.init.normal_(param, std=0.02)
    return model.to(device=device, dtype=dtype).train()


def make_step(kind: str, model, input_ids, task_ids, compiled: bool):
    """step(): the loss (+ β·MIM for C-LoRAE), backward; `compiled`: the loss through torch.compile (static shapes)."""
    def loss_of():
        if kind == "peft_lora":
            return model(input_ids=input_ids).last_hidden_state.float().pow(2).mean()
        with task_routing(model, task_ids):
            loss = model(input_ids=input_ids).last_hidden_state.float().pow(2).mean()
            mim = collect_mim_loss(model)
        return loss if mim is None else loss + model.clorae_config.mim_beta * mim

    if compiled:
        torch._inductor.config.cpp.enable_kernel_profile = True  # generated CPU kernels appear in the op count
    forward = torch.compile(loss_of, dynamic=False) if compiled else loss_of

    def step():
        forward().backward()
        model.zero_grad(set_to_none=True)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compiled", action="store_true", help="also C-LoRAE and peft LoRA through torch.compile")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    t5_config = T5Config(d_model=args.d_model, d_ff=args.d_ff, num_layers=args.layers, num_heads=8,
                         d_kv=args.d_model // 8, vocab_size=32128, dropout_rate=0.0)
    input_ids = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(args.device)
    task_ids = torch.arange(args.batch) * 3 // args.batch  # a mixed batch of the 3 tasks
    device_type = torch.device(args.device).type
    # arm: (implementation, adapter options, compiled); "clorae" is the training-time cost (MIM on, β 0.01)
    arms = {"peft_lora": ("peft_lora", {}, False), "clorae": ("clorae", {}, False),
            "clorae_without_mim": ("clorae", {"mim_beta": 0.0}, False),
            "universal_only": ("clorae", {"mode": "universal_only"}, False)}
    padded = KERNEL_POLICIES.get(device_type, KernelPolicy()).rank_alignment > 1
    if padded:
        arms.update(clorae_unpadded=("clorae", {}, False), clorae_unpadded_without_mim=("clorae", {"mim_beta": 0.0}, False))
    if args.compiled:
        arms.update(peft_lora_compiled=("peft_lora", {}, True), clorae_compiled=("clorae", {}, True))
    steps, reports = {}, {}
    for arm, (kind, options, compiled) in arms.items():
        model = build_arm(kind, t5_config, args.rank, args.dropout, args.device, dtype, **options)
        if arm.startswith("clorae_unpadded"):
            force_kernel_policy(model, device_type, rank_alignment=1)
        step = steps[arm] = make_step(kind, model, input_ids, task_ids, compiled)
        for _ in range(3):  # warm-up (and the compile) before anything is counted
            step()
        reports[arm] = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                        "ops_per_step": count_host_work(step)["ops_per_step"]}
        if not compiled:  # saved-tensor hooks would run a compiled step eagerly
            reports[arm]["saved_activation_bytes"] = saved_bytes(step, model.parameters())
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = interleaved_seconds({arm: (lambda _round, s=step: s()) for arm, step in steps.items()}, args.rounds,
                                sync=sync)
    for arm, seconds in times.items():
        reports[arm]["fwd_bwd_ms"] = 1000 * statistics.median(seconds)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            steps[arm]()
            reports[arm]["peak_memory_bytes"] = torch.cuda.max_memory_allocated()

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    base = reports["peft_lora"]["fwd_bwd_ms"]

    def over(arm: str, baseline: str = "peft_lora") -> float:
        return round(reports[arm]["fwd_bwd_ms"] / reports[baseline]["fwd_bwd_ms"], 4)

    rows = [[arm, r["fwd_bwd_ms"], r["fwd_bwd_ms"] / base, f"{r['trainable_params']:,}",
             f"{r['saved_activation_bytes'] / 2**20:.1f}" if "saved_activation_bytes" in r else "—", r["ops_per_step"]]
            for arm, r in reports.items()]
    summary = {"clorae_over_peft_lora": over("clorae"), "clorae_without_mim_over_peft_lora": over("clorae_without_mim"),
               "universal_only_over_peft_lora": over("universal_only"),
               **{f"{arm}_over_peft_lora": over(arm) for arm in ("clorae_unpadded", "clorae_unpadded_without_mim")
                  if arm in reports},
               "clorae_over_peft_lora_ops": round(reports["clorae"]["ops_per_step"] / reports["peft_lora"]["ops_per_step"], 4),
               **({"compiled_clorae_over_compiled_peft_lora": over("clorae_compiled", "peft_lora_compiled")}
                  if args.compiled else {}),
               "device": device_name, "dtype": str(dtype).replace("torch.", ""), "arms": reports}
    emit(summary, f"{device_name}, {dtype}, T5 encoder d_model {args.d_model} d_ff {args.d_ff} x {args.layers} layers, "
         f"r {args.rank}, batch {args.batch} x {args.seq}, median of {args.rounds} rounds",
         markdown_table(["arm", "fwd+bwd ms", "vs peft", "trainable", "saved MB", "ops"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
