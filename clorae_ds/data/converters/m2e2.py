"""M2E2 text event annotations (a JSON list of sentences with `words`, `golden-event-mentions`: trigger
{start, end}, event_type, arguments [{role, start, end}], and `image`: the article's images). Each sentence
yields a trigger record and one argument record per event mention (events.py)."""
from __future__ import annotations

import json
from typing import Iterator, Union

from ..record import Argument, Event, Record, RecordError, Span
from .events import event_records


def read(dataset: str, path: str) -> Iterator[Union[Record, RecordError]]:
    """Yields Records, or the RecordError of a sentence that cannot be read (the caller decides)."""
    try:
        with open(path, encoding="utf-8") as f:
            sentences = json.load(f)
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(sentences, list):
        raise RecordError(f"{path}: expected a JSON list of sentences")
    for index, sentence in enumerate(sentences):
        where = f"{path}[{index}]"
        try:
            words = tuple(sentence["words"])
            events = tuple(
                Event(mention["event_type"], Span(mention["trigger"]["start"], mention["trigger"]["end"]),
                      tuple(Argument(a["role"], a["start"], a["end"]) for a in mention.get("arguments", ())))
                for mention in sentence.get("golden-event-mentions", ()))
            images = sentence.get("image") or []
            sentence_id = sentence.get("sentence_id", index)
        except (KeyError, TypeError) as err:
            yield RecordError(f"{where}: missing or malformed field {err}")
            continue
        try:
            records = event_records(dataset, sentence_id, words, events, images[0] if images else None, where)
        except (RecordError, TypeError) as err:
            yield RecordError(f"{where}: {err}")
            continue
        yield from records
