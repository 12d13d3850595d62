"""ACE2005 in OneIE's JSON-lines format (one sentence per line, as OneIE's preprocessing writes it):
{"sent_id", "tokens": [...], "entity_mentions": [{"id", "start", "end", "entity_type", ...}],
 "event_mentions": [{"event_type": "Conflict:Attack", "trigger": {"start", "end", "text"},
                     "arguments": [{"entity_id", "role", "text"}]}]}
Argument spans come from the entity mention each argument names. Records as for M2E2 (events.py). Time roles (Time-*) are dropped, as OneIE's ACE setting does."""
from __future__ import annotations

import json
from typing import Iterator, Union

from ..record import Argument, Event, Record, RecordError, Span
from . import numbered_lines
from .events import event_records


def read(dataset: str, path: str) -> Iterator[Union[Record, RecordError]]:
    for number, where, line in numbered_lines(path):
        try:
            sentence = json.loads(line)
            tokens = tuple(sentence["tokens"])
            spans = {m["id"]: (m["start"], m["end"]) for m in sentence.get("entity_mentions", ())}
            events = []
            for mention in sentence.get("event_mentions", ()):
                arguments = []
                for argument in mention.get("arguments", ()):
                    if argument["role"].startswith("Time"):
                        continue
                    if argument["entity_id"] not in spans:
                        raise KeyError(f"argument entity {argument['entity_id']!r}")
                    arguments.append(Argument(argument["role"], *spans[argument["entity_id"]]))
                trigger = mention["trigger"]
                events.append(Event(mention["event_type"], Span(trigger["start"], trigger["end"]), tuple(arguments)))
            sent_id = sentence.get("sent_id", str(number))
        except json.JSONDecodeError as err:
            yield RecordError(f"{where}: not valid JSON ({err.msg})")
            continue
        except (KeyError, TypeError) as err:
            yield RecordError(f"{where}: missing or malformed field {err}")
            continue
        try:
            records = event_records(dataset, sent_id, tokens, tuple(events), None, where)
        except (RecordError, TypeError) as err:
            yield RecordError(f"{where}: {err}")
            continue
        yield from records
