"""One rank of a real DeepSpeed job over a tiny T5 with C-LoRAE, where each rank's micro-batches hold
different tasks (rank 0: only mner; rank 1: mre and mee). Under ZeRO-3 a rank that touched other parameters
than its peer would hang here. Writes one JSON line per rank to OUT/rank{N}.json.

    torchrun --standalone --nproc_per_node 2 zero_adapter_worker.py TOKENIZER_DIR OUT STAGE fp32|bf16 EXPERT_PATH \
        [checkpointing]

With `checkpointing`, the model recomputes its blocks in backward (model.gradient_checkpointing).

With bf16, DeepSpeed's own bf16 mode: parameters in bf16, buffers kept fp32, fp32 master weights.
"""
import json
import os
import sys
from datetime import timedelta

import deepspeed
import torch

from clorae_ds.adapters import clorae_layers, collect_mim_loss
from clorae_ds.models import ModelConfig


def main():
    tokenizer_dir, out_dir, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
    bf16, checkpointing = sys.argv[4] == "bf16", sys.argv[5:] == ["checkpointing"]
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)  # identical initial weights on both ranks
    # r 16: R + the gate row = 32 rows, which the masked pass reads as they are (no pad on the CPU either), so
    # ZeRO-3's partitioned expert_A itself is what the layer's backward reads (as on a GPU, which pads nothing)
    built = ModelConfig(family="t5", preset="tiny", tokenizer=tokenizer_dir,
                        adapter={"rank": 16, "dropout": 0.0},
                        gradient_checkpointing=checkpointing).build()
    model, tokenizer = built.model, built.tokenizer
    layer_calls = []  # adapted layer calls per step: a recompute in backward calls them again
    for _, layer in clorae_layers(model):
        layer.register_forward_hook(lambda *_: layer_calls.__setitem__(-1, layer_calls[-1] + 1))
    before = {name: layer.expert_weights()["task_B"].clone() for name, layer in clorae_layers(model)}
    ds_config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 0.05, "torch_adam": True}},
        "zero_optimization": {"stage": stage}, "steps_per_print": 1000, "wall_clock_breakdown": False,
        "bf16": {"enabled": bf16},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    texts = [["Kyrie Irving plays", "Taylor Swift sings"], ["Obama met Merkel", "Police arrested two men"]][rank]
    targets = [["( ( person : Kyrie ) )", "( ( person : Taylor ) )"], ["( ( meet ) )", "( ( arrest ) )"]][rank]
    task_ids = torch.tensor([[0, 0], [1, 2]][rank])
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = tokenizer(targets, return_tensors="pt", padding=True)["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    losses = []
    for _ in range(4):
        layer_calls.append(0)
        loss = engine(enc["input_ids"], enc["attention_mask"], labels=labels, task_ids=task_ids).loss
        loss = loss + built.model.clorae_config.mim_beta * collect_mim_loss(engine.module)
        engine.backward(loss)
        engine.step()
        losses.append(loss.float().item())
    changed = {}
    for name, layer in clorae_layers(engine.module):
        with deepspeed.zero.GatheredParameters([layer.expert_A, layer.expert_B], enabled=stage == 3):
            after = layer.expert_weights()["task_B"]
            changed[name] = [bool((after[n] - before[name][n]).abs().max() > 0) for n in range(3)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "task_experts_changed": changed, "layer_calls": layer_calls,
                   "param_dtype": str(next(engine.module.parameters()).dtype)}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo teardown after ZeRO-3 can abort at exit (../shared/notes/deepspeed-cpu.md)


if __name__ == "__main__":
    main()
