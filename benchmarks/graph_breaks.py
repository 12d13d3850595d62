"""torch.compile graph breaks of an adapted model's training and evaluation forward, beside peft LoRA's.

Per backbone (tiny T5, the default's bert2bert shape, tiny LLaVA) and adapter (peft LoRA and every C-LoRAE mode),
torch._dynamo.explain over one call of `step`: in training the forward with labels plus the MIM loss, in
evaluation the forward without grad (no dropout, no MIM), on a mixed-task batch of 4 with dropout 0.1. Counts do not depend on the machine.

    python benchmarks/graph_breaks.py            # one JSON line: {"event": "graph_breaks", "rows": [...]}
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from clorae_ds.adapters import collect_mim_loss  # noqa: E402
from clorae_ds.adapters.config import MODES  # noqa: E402
from clorae_ds.models import ModelConfig  # noqa: E402
from clorae_ds.models.builder import DEFAULT_TARGETS  # noqa: E402

FAMILIES = ("t5", "encoder_decoder", "llava")
CORPUS = ["Kyrie Irving plays for the Nets in New York", "( ( person : Kyrie Irving ) )",
          "Obama met Merkel in Berlin on Tuesday", "( ( Obama ( meet : Merkel ) ) )"] * 10


def tiny_model(family: str, adapter: str, tokenizer_dir: str):
    """(MIEModel, batch) with `adapter` "peft_lora" or a C-LoRAE mode, every default target linear adapted."""
    options = {"rank": 6, "dropout": 0.1, "target_modules": list(DEFAULT_TARGETS[family])}
    config = ModelConfig(family=family, preset="tiny", full_finetune=adapter == "peft_lora",
                         adapter={} if adapter == "peft_lora" else {**options, "mode": adapter})
    built = config.build(CORPUS, tokenizer_dir)
    model = built.model
    if adapter == "peft_lora":
        from peft import LoraConfig, get_peft_model

        targets = options["target_modules"]  # name suffixes, or one regex (LLaVA's), which peft takes as a string
        model.lm = get_peft_model(model.lm, LoraConfig(r=6, lora_alpha=12, lora_dropout=0.1,
                                                       target_modules=targets[0] if family == "llava" else targets))
    tokens = built.tokenizer(CORPUS[:4], return_tensors="pt", padding=True)
    labels = built.tokenizer(CORPUS[1:5], return_tensors="pt", padding=True).input_ids
    if family == "llava":  # a decoder-only model's labels are its input ids
        labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
    batch = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask, "labels": labels,
             "task_ids": torch.tensor([2, 0, 1, 0])}
    return model, batch


def step(model, batch, training: bool):
    if not training:  # teacher-forced, as a dev loss is: T5 needs the labels for its decoder input
        return model(**batch).logits
    loss = model(**batch).loss
    mim = collect_mim_loss(model)
    return loss if mim is None else loss + 0.01 * mim


def count_breaks(model, batch, training: bool) -> dict:
    torch._dynamo.reset()
    model.train(training)
    try:
        with torch.set_grad_enabled(training):
            explanation = torch._dynamo.explain(step)(model, batch, training)
    except Exception as err:  # dynamo failing outright is a result too (a row, not a crash of the whole table)
        return {"graphs": None, "breaks": None, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    reasons = sorted({str(r.reason).splitlines()[0][:120] for r in explanation.break_reasons})
    return {"graphs": explanation.graph_count, "breaks": explanation.graph_break_count, "reasons": reasons}


def main() -> int:
    torch._dynamo.config.capture_scalar_outputs = True  # LLaVA's peft baseline needs it (issue 37)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            for adapter in ("peft_lora",) + MODES:
                torch.manual_seed(0)
                model, batch = tiny_model(family, adapter, os.path.join(tmp, family))
                for training in (True, False):
                    rows.append({"family": family, "adapter": adapter, "training": training,
                                 **count_breaks(model, batch, training)})
                    row = rows[-1]
                    print(f"{family:16} {adapter:15} {'train' if training else 'eval ':5} graphs {row['graphs']} "
                          f"breaks {row['breaks']}  {row.get('reasons', [])[:2] or row.get('error', '')}", file=sys.stderr)
    print(json.dumps({"event": "graph_breaks", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
