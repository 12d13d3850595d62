"""One rank of a real 2-rank DeepSpeed job (bf16, the project's DeepSpeedRunner) over a tiny T5 with C-LoRAE, in
which rank 1's gradient of one adapter tensor turns NaN at the second of three steps while every loss stays finite:
the engine's gradient overflow check (engine.grads_nonfinite in DeepSpeed's place) must flag it on every rank, so
that DeepSpeed skips that step everywhere, and the next step trains again. Writes OUT/rank{N}.json.

    torchrun --standalone --nproc_per_node 2 overflow_worker.py TOKENIZER_DIR OUT STAGE [DEEPSPEED_VERSION]

With DEEPSPEED_VERSION (one the engine's patches were not written for), DeepSpeed's own checks must do the same.
"""
import json
import os
import sys

import torch

from clorae_ds.adapters import collect_mim_loss
from clorae_ds.adapters.model import parameter_groups
from clorae_ds.models import ModelConfig
from clorae_ds.train.engine import DeepSpeedRunner, init_distributed


def main():
    tokenizer_dir, out_dir, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ctx = init_distributed(60)
    if len(sys.argv) > 4:
        import deepspeed

        deepspeed.__version__ = sys.argv[4]
    torch.manual_seed(0)  # identical initial weights on both ranks
    built = ModelConfig(family="t5", preset="tiny", tokenizer=tokenizer_dir,
                        adapter={"rank": 8, "dropout": 0.0}).build()
    model, tokenizer = built.model, built.tokenizer
    ds_config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
                 "steps_per_print": 10 ** 6, "zero_allow_untested_optimizer": True}
    runner = DeepSpeedRunner(model, ds_config, parameter_groups(model, 1e-2, 1e-2, 0.0), (0.9, 0.999), 0, 10,
                             "constant", ctx)
    trainable = [p for p in runner.module.parameters() if p.requires_grad]
    texts = [["Kyrie Irving plays", "Taylor Swift sings"], ["Obama met Merkel", "Police arrested two men"]][ctx.rank]
    targets = [["( ( person : Kyrie ) )", "( ( person : Taylor ) )"], ["( ( meet ) )", "( ( arrest ) )"]][ctx.rank]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = tokenizer(targets, return_tensors="pt", padding=True)["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    optimizer = runner.engine.optimizer
    steps = []
    for step in range(3):
        hook = None
        if step == 1 and ctx.rank == 1:
            hook = trainable[-1].register_hook(lambda grad: torch.full_like(grad, float("nan")))
        before = [p.detach().float().clone() for p in trainable]
        loss = runner.forward(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels,
                              task_ids=torch.tensor([0, 1])).loss
        loss = loss + 0.01 * collect_mim_loss(runner.module)
        runner.backward(loss)
        # the check DeepSpeed's step runs, asked directly (a collective at ZeRO-2: both ranks call it)
        flagged = bool(optimizer.has_overflow() if stage else optimizer.overflow_checker.check())
        runner.step()
        if hook is not None:
            hook.remove()
        after = [p.detach().float() for p in trainable]
        steps.append({"loss_finite": bool(torch.isfinite(loss)), "flagged": flagged,
                      "changed": any(bool((a - b).abs().max() > 0) for a, b in zip(after, before)),
                      "finite": all(bool(torch.isfinite(a).all()) for a in after),
                      "checksum": float(sum(a.double().sum() for a in after))})
    with open(os.path.join(out_dir, f"rank{ctx.rank}.json"), "w") as f:
        json.dump({"steps": steps, "fused": runner.fused_overflow_checks,
                   "skipped_steps": runner.engine.skipped_steps}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
