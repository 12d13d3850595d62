"""Trainable parameters and forward / forward+backward FLOPs per method — full fine-tuning, vanilla LoRA (rank
r), C-LoRAE (rank r, MIM on) and C-LoRAE without MIM (β 0, what MIM adds) — in the layout of the paper's
Table 5, counted by torch.utils.flop_counter on a batch of 1 (--batch) with an input of 256 tokens and a target
of 64 tokens, and a lower bound on what exact MIM can cost at those shapes on top of the layer's fused
up-projection (which never forms the universal and task outputs).

    python launchers/report_cost.py --model t5-base [--rank 128]     # shapes only: t5-base, t5-large, tiny
    python launchers/report_cost.py --model models/flan-t5-base      # a local T5 directory
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from clorae_ds.adapters import (CLoRAEConfig, apply_clorae, clorae_layers, collect_mim_loss, parameter_report,  # noqa: E402
                                task_routing)
from clorae_ds.data.record import TASKS  # noqa: E402
from clorae_ds.models import DEFAULT_TARGETS, MIEModel  # noqa: E402

SHAPES = {  # T5 v1.0 shapes (the paper's T5-base / T5-large rows); random weights: FLOPs do not depend on them
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=2000),
    "t5-base": dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12, vocab_size=32128),
    "t5-large": dict(d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_heads=16, vocab_size=32128),
}


def build(model, method: str, rank: int) -> MIEModel:
    """`model`: a SHAPES name, a dict of T5Config fields, or a local T5 directory. Build it inside
    `torch.device("meta")` to count a large shape's FLOPs without allocating it."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if isinstance(model, dict) or model in SHAPES:
        shape = model if isinstance(model, dict) else SHAPES[model]
        lm = T5ForConditionalGeneration(T5Config(**{"vocab_size": 32128, **shape}, dropout_rate=0.0, pad_token_id=0,
                                                 eos_token_id=1, decoder_start_token_id=0))
    elif os.path.isdir(model):
        lm = T5ForConditionalGeneration.from_pretrained(model, local_files_only=True)
    else:
        raise SystemExit(f"report_cost: --model {model!r} is neither a shape preset ({', '.join(SHAPES)}) nor a directory")
    wrapped = MIEModel(lm, "t5")
    if method == "full fine-tuning":
        return wrapped.requires_grad_(True)
    mode = "universal_only" if method == "LoRA" else "clorae"
    return apply_clorae(wrapped, CLoRAEConfig(rank=rank, alpha=2 * rank, dropout=0.0, mode=mode,
                                              mim_beta=0.0 if method == "C-LoRAE without MIM" else 0.01,
                                              target_modules=DEFAULT_TARGETS["t5"]))


def _accumulating_matmul_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    (m, k), n = a_shape, b_shape[1]
    return 2 * m * n * k


def _matrix_vector_flops(a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


# torch's counter knows the out-of-place matrix-matrix products only. The adapter accumulates its up-projection
# into the base output in place (addmm_), and its MIM term takes per-channel column sums as matrix-vector products.
UNCOUNTED_MATMULS = {torch.ops.aten.addmm_: _accumulating_matmul_flops, torch.ops.aten.mv: _matrix_vector_flops}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=UNCOUNTED_MATMULS)


def mim_floor_gflops(layer_calls: list) -> float:
    """A lower bound on exact per-channel MIM's fwd+bwd FLOPs over (tokens, d_out, r, r_t) layer calls on top of
    the fused up-projection y += (z ⊙ coef)·Bᵀ (which never forms U or D), whichever of its two routes a layer
    takes: every channel's Σ_t v_c² over K = r + r_t columns comes from the token
    outputs (T·d_out·K multiply-adds) or from the token Gram's quadratic forms (d_out·K²/2 with their symmetry),
    so at least d_out·K·min(T, K) FLOPs, the Gram itself not counted; the task columns' gradients (into z and
    into B) at least 2·2·d_out·r_t·min(T, K)."""
    return sum(d_out * (r + r_t) * min(t, r + r_t) + 4 * d_out * r_t * min(t, r + r_t)
               for t, d_out, r, r_t in layer_calls) / 1e9


def measure(model: MIEModel, input_len: int, target_len: int, batch: int = 1) -> dict:
    vocab, device = model.lm.config.vocab_size, next(model.parameters()).device
    ids = torch.randint(1, vocab, (batch, input_len), device=device)
    labels = torch.randint(1, vocab, (batch, target_len), device=device)
    task_ids = torch.arange(batch) * len(TASKS) // batch  # the tasks in equal shares, sorted as the collator sorts them

    def run():
        if device.type == "meta":  # transformers inspects masks on the host (.item()): none on meta, all tokens real
            with task_routing(model, task_ids):
                return model.lm(input_ids=ids, labels=labels)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, task_ids=task_ids)

    model.train()
    with flop_counter() as forward_counter:
        with torch.no_grad():
            run()
    collect_mim_loss(model)  # nothing recorded without grad; keeps the layers clean
    layer_calls = []  # (tokens, d_out, r, r_t) of every layer call with MIM in the training pass
    hooks = [layer.register_forward_hook(lambda layer, args, out: layer_calls.append(
        (out.numel() // layer.out_features, layer.out_features, layer.universal_rank, layer.task_rank)))
        for _, layer in clorae_layers(model) if layer.config.uses_mim]
    with flop_counter() as train_counter:
        loss = run().loss
        mim = collect_mim_loss(model)
        if mim is not None:
            loss = loss + 0.01 * mim
        loss.backward()
    for hook in hooks:
        hook.remove()
    report = parameter_report(model)
    return {"trainable_params": report["trainable_params"], "adapter_expert_params": report["expert_params"],
            "expert_params_formula": report["expert_params_formula"], "mim_params": report["mim_params"], "forward_gflops": forward_counter.get_total_flops() / 1e9,
            "forward_backward_gflops": train_counter.get_total_flops() / 1e9,
            "mim_floor_gflops": mim_floor_gflops(layer_calls)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t5-base", help="the shape to count (t5-base, t5-large, ...)")
    parser.add_argument("--rank", type=int, default=None, help="default: 128 for t5-base, 64 otherwise (the paper's)")
    parser.add_argument("--input-length", type=int, default=256, help="source tokens per sample")
    parser.add_argument("--target-length", type=int, default=64, help="target tokens per sample")
    parser.add_argument("--batch", type=int, default=1,
                        help="samples per step, the tasks in equal shares (MIM's d_out·K² terms are per step)")
    args = parser.parse_args(argv)
    rank = args.rank or (128 if args.model == "t5-base" else 64 if args.model != "tiny" else 8)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = {}
    for method in ("full fine-tuning", "LoRA", "C-LoRAE", "C-LoRAE without MIM"):
        rows[method] = measure(build(args.model, method, rank), args.input_length,
                               args.target_length, args.batch)
    print(f"{args.model}, rank {rank}, batch {args.batch}, input {args.input_length}, target {args.target_length} tokens "
          "(C-LoRAE's masked pass: every token through all r + N·r_t expert columns)")
    print("| method | trainable params | fwd GFLOPs | fwd+bwd GFLOPs |\n|---|---|---|---|")
    for method, r in rows.items():
        print(f"| {method} | {r['trainable_params'] / 1e6:.3g}M | {r['forward_gflops']:.3g} | "
              f"{r['forward_backward_gflops']:.3g} |")
    ratio = rows["C-LoRAE"]["trainable_params"] / rows["LoRA"]["trainable_params"]
    experts = rows["C-LoRAE"]["adapter_expert_params"] / rows["LoRA"]["adapter_expert_params"]
    print(f"C-LoRAE / LoRA trainable: {ratio:.3f} (experts and gates alone: {experts:.3f}; the MIM regressors, "
          f"{rows['C-LoRAE']['mim_params']:,} parameters, make the rest)")
    flops = rows["C-LoRAE"]["forward_backward_gflops"] / rows["LoRA"]["forward_backward_gflops"]
    without_mim = rows["C-LoRAE without MIM"]["forward_backward_gflops"] / rows["LoRA"]["forward_backward_gflops"]
    floor = (rows["C-LoRAE without MIM"]["forward_backward_gflops"] + rows["C-LoRAE"]["mim_floor_gflops"]) / \
        rows["LoRA"]["forward_backward_gflops"]
    print(f"C-LoRAE / LoRA fwd+bwd FLOPs: {flops:.3f} (without MIM: {without_mim:.3f}; without MIM plus exact MIM's "
          f"floor of {rows['C-LoRAE']['mim_floor_gflops']:.3g} GFLOPs: {floor:.3f})")
    print(json.dumps({"model": args.model, "rank": rank, "batch": args.batch,
                      "clorae_over_lora_flops": round(flops, 4),
                      "clorae_without_mim_over_lora_flops": round(without_mim, 4),
                      "clorae_floor_over_lora_flops": round(floor, 4),
                      "clorae_over_lora_trainable": round(ratio, 3),
                      "clorae_over_lora_expert_params": round(experts, 3), "methods": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
