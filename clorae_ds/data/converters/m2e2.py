"""M2E2 text event annotations (a JSON list of sentences with `words`, `golden-event-mentions`: trigger
{start, end}, event_type, arguments [{role, start, end}], and `image`: the article's images). Each sentence
yields a trigger record (every sentence: one without events teaches the model to answer empty) and one
argument record per event mention (its type and trigger are given in the instruction), as UMIE's two stages
do."""
from __future__ import annotations

import json
from typing import Iterator, Union

from ..record import Argument, Event, Record, RecordError, Span


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
        common = dict(dataset=dataset, task="mee", tokens=words, image=images[0] if images else None,
                      extra={"source": where})
        try:
            records = [Record(id=f"{dataset}-{sentence_id}-trigger", subtask="trigger",
                              events=tuple(Event(e.type, e.trigger) for e in events), **common)]
            records += [Record(id=f"{dataset}-{sentence_id}-argument-{k}", subtask="argument", events=(event,),
                               **common) for k, event in enumerate(events)]
        except (RecordError, TypeError) as err:
            yield RecordError(f"{where}: {err}")
            continue
        yield from records
