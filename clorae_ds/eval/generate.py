"""Generation over exact evaluation batches → scored rows. Shared by the in-training evaluator and
launchers/evaluate.py."""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Optional

import torch

from ..data.render import render
from .parse import ParseStats, gold_tuples, parse
from .score import score_key

GENERATE_INPUTS = ("input_ids", "attention_mask", "task_ids", "pixel_values", "image_present", "visual_features",
                   "visual_boxes", "visual_mask")


@torch.no_grad()
def generate_rows(model, tokenizer, batches: Iterable[dict], device, max_new_tokens: int, num_beams: int = 1,
                  synced_gpus: bool = False, limit_batches: Optional[int] = None,
                  stats: Optional[ParseStats] = None, progress: Optional[Callable[[int], None]] = None) -> list[dict]:
    """One row per valid sample: id, score key, input, generated text, predicted and gold tuples, and the record
    itself. Every rank must call this with the same number of batches when `synced_gpus` (ZeRO-3): the loader
    guarantees it. `progress` is called after each batch with the number of samples generated so far."""
    rows = []
    for index, batch in enumerate(batches):
        if limit_batches is not None and index >= limit_batches:
            break
        inputs = {k: v.to(device) for k, v in batch.items() if k in GENERATE_INPUTS}
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                   synced_gpus=synced_gpus)
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for record, text, valid in zip(batch["records"], texts, batch["valid"].tolist()):
            if valid:
                rows.append({"id": record.id, "key": score_key(record), "input": render(record)[0],
                             "output": text, "predicted": parse(text, record, stats), "gold": gold_tuples(record),
                             "record": record})
        if progress is not None:
            progress(len(rows))
    return rows


def write_predictions(path: str, rows: list[dict], **fields) -> None:
    """Scored rows as JSON lines (id, key, input, output, predicted, gold and `fields`), written atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for row in sorted(rows, key=lambda r: (r["key"], r["id"])):
            f.write(json.dumps({**{k: v for k, v in row.items() if k != "record"}, **fields,
                                "predicted": [list(t) for t in row["predicted"]],
                                "gold": [list(t) for t in row["gold"]]}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_predictions(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                row["predicted"] = [tuple(t) for t in row["predicted"]]
                row["gold"] = [tuple(t) for t in row["gold"]]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a prediction row ({err})") from None
            rows.append(row)
    return rows
