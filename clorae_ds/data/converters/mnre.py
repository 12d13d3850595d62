"""MNRE v1 / v2: one Python dict literal per line with `token`, `h` / `t` ({name, pos: [start, end)}),
`relation` and `img_id`; `none` (v1) / `None` (v2) mean no relation. Read with ast.literal_eval, never eval."""
from __future__ import annotations

import ast
from typing import Iterator, Union

from ..record import Record, RecordError, Relation, Span
from . import numbered_lines

NO_RELATION = {"none", "None"}


def read(dataset: str, path: str) -> Iterator[Union[Record, RecordError]]:
    """Yields a Record per line, or the RecordError of a line that cannot be read (the caller decides)."""
    for number, where, line in numbered_lines(path):
        try:
            sample = ast.literal_eval(line)
            tokens = tuple(sample["token"])
            head, tail = sample["h"]["pos"], sample["t"]["pos"]
            label = sample["relation"]
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            yield RecordError(f"{where}: not a Python dict literal ({type(err).__name__})")
            continue
        except (KeyError, TypeError) as err:
            yield RecordError(f"{where}: missing or malformed field {err}")
            continue
        try:
            yield Record(id=f"{dataset}-{number}", dataset=dataset, task="mre", subtask="relation",
                         tokens=tokens,
                         relation=Relation(None if label in NO_RELATION else label, Span(*head), Span(*tail)),
                         image=sample.get("img_id"), extra={"source": where})
        except (RecordError, TypeError) as err:
            yield RecordError(f"{where}: {err}")
