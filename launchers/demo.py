"""What the project can run end to end today: the embedded default backbone (the pretrained all-MiniLM-L6-v2
encoder-decoder) fitted with C-LoRAE, a few optimisation steps on a mixed-task batch of hand-written
samples, generation under task routing, and an adapter round trip through safetensors.

    python launchers/demo.py [--steps 20] [--output-dir runs/demo]

Training on the real datasets arrives with launchers/train.py (the training-engine issue); this demo does not
claim extraction quality: 20 steps on 6 samples only show that the adapter trains, saves and reloads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from clorae_ds.adapters import collect_mim_loss, load_adapter, parameter_report, routing_stats, save_adapter  # noqa: E402
from clorae_ds.models import ModelConfig  # noqa: E402

SAMPLES = [  # (task, input, target)
    ("mner", "Kyrie Irving scored 30 for the Nets in New York", "person : kyrie irving ; location : new york"),
    ("mner", "Taylor Swift announces tour dates in London", "person : taylor swift ; location : london"),
    ("mre", "Obama met Merkel in Berlin . head : obama tail : merkel", "meet"),
    ("mre", "Bill Gates founded Microsoft . head : bill gates tail : microsoft", "founder"),
    ("mee", "Police arrested two men after the attack in Paris", "arrest : arrested ; attack : attack"),
    ("mee", "Protesters marched through the capital on Sunday", "demonstrate : marched"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps on the six samples")
    parser.add_argument("--rank", type=int, default=16, help="the adapter's rank r")
    parser.add_argument("--output-dir", default="runs/demo", help="where the adapter is saved and reloaded from")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()  # the encoder-decoder's new cross-attention is expected
    torch.set_num_threads(min(2, torch.get_num_threads()))

    built = ModelConfig(family="encoder_decoder", pretrained="minilm",
                        adapter={"rank": args.rank, "alpha": 2 * args.rank}).build()
    model, tokenizer, adapter = built.model, built.tokenizer, built.model.clorae_config
    print(json.dumps({"parameters": parameter_report(model)}))

    order = list(range(len(SAMPLES)))  # a micro-batch mixing the three tasks
    task_ids = torch.tensor([adapter.task_id(SAMPLES[i][0]) for i in order])
    enc = tokenizer([SAMPLES[i][1] for i in order], return_tensors="pt", padding=True)
    labels = tokenizer([SAMPLES[i][2] for i in order], return_tensors="pt", padding=True)["input_ids"][:, 1:]
    labels = labels.masked_fill(labels == tokenizer.pad_token_id, -100).contiguous()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    model.train()
    start = time.time()
    for step in range(1, args.steps + 1):
        ce = model(enc["input_ids"], enc["attention_mask"], labels=labels, task_ids=task_ids).loss
        mim = collect_mim_loss(model)
        loss = ce + adapter.mim_beta * mim
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 5 == 0:
            print(json.dumps({"step": step, "ce_loss": round(ce.item(), 4), "mim_loss": round(mim.item(), 4)}))
    elapsed = time.time() - start

    model.eval()
    routing_stats(model)  # drop the training statistics; report the generation pass only
    generated = model.generate(enc["input_ids"], enc["attention_mask"], task_ids=task_ids, max_new_tokens=16)
    outputs = tokenizer.batch_decode(generated, skip_special_tokens=True)
    gate = torch.stack([v for v in routing_stats(model).values()]).nanmean(0)
    for i, text in zip(order, outputs):
        print(json.dumps({"task": SAMPLES[i][0], "target": SAMPLES[i][2], "generated": text}))

    directory = save_adapter(model, os.path.join(args.output_dir, "adapter"))
    reloaded = ModelConfig(family="encoder_decoder", pretrained="minilm",
                           adapter={"rank": args.rank, "alpha": 2 * args.rank}).build().model
    load_adapter(reloaded, directory)
    again = reloaded.eval().generate(enc["input_ids"], enc["attention_mask"], task_ids=task_ids, max_new_tokens=16)
    summary = {"steps": args.steps, "train_seconds": round(elapsed, 1), "final_ce_loss": round(ce.item(), 4),
               "mean_task_expert_gate": {t: round(g, 3) for t, g in zip(adapter.tasks, gate.tolist())},
               "adapter": directory, "reload_reproduces_generation": bool(torch.equal(generated, again))}
    print(json.dumps(summary))
    return 0 if summary["reload_reproduces_generation"] else 1


if __name__ == "__main__":
    sys.exit(main())
