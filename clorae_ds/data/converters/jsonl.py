"""Your own data (docs/data.md): one JSON object per line, the unified record.

    {"id": "p1", "task": "mner", "text": "Kyrie Irving plays in Boston", "image": "p1.jpg",
     "entities": [{"type": "PER", "start": 0, "end": 2}, {"type": "LOC", "start": 4, "end": 5}]}

`text` is split on whitespace (or give `tokens`); spans are token offsets [start, end). `task` is mner (entities),
mre (`relation`: {label or null, head: {start, end}, tail: {start, end}}) or mee (`events`: [{type, trigger:
{start, end}, arguments: [{role, start, end}]}], which yields a trigger record and one argument record per event).
A dataset has one task and one label schema; the schema travels in every record (extra.schema), so rendering and
parsing need no code for a new dataset."""
from __future__ import annotations

import json
from typing import Iterator, Optional, Union

from ..record import Argument, Entity, Event, Record, RecordError, Relation, Span
from ..schema import schema_dict
from . import numbered_lines
from .events import event_records

TASK_FIELDS = {"mner": "entities", "mre": "relation", "mee": "events"}


def _span(value, what: str) -> Span:
    if not isinstance(value, dict) or not {"start", "end"} <= set(value):
        raise RecordError(f"{what} must be {{\"start\": int, \"end\": int}}, got {value!r}")
    return Span(value["start"], value["end"])


def _records(dataset: str, number: int, where: str, sample: dict, task: Optional[str]) -> list[Record]:
    task = sample.get("task", task)
    if task not in TASK_FIELDS:
        raise RecordError(f"\"task\" must be one of {sorted(TASK_FIELDS)} (or give --task), got {task!r}")
    if "tokens" in sample:
        tokens = tuple(sample["tokens"])
    elif isinstance(sample.get("text"), str):
        tokens = tuple(sample["text"].split())
    else:
        raise RecordError("give \"text\" (a string) or \"tokens\" (a list of strings)")
    sample_id = str(sample.get("id", number))
    common = dict(dataset=dataset, task=task, tokens=tokens, image=sample.get("image"), extra={"source": where})
    if task == "mner":
        entities = tuple(Entity(e["type"], e["start"], e["end"]) for e in sample.get("entities", ()))
        return [Record(id=f"{dataset}-{sample_id}", subtask="entity", entities=entities, **common)]
    if task == "mre":
        relation = sample.get("relation")
        if not isinstance(relation, dict):
            raise RecordError("an mre sample needs \"relation\": {\"label\", \"head\", \"tail\"}")
        return [Record(id=f"{dataset}-{sample_id}", subtask="relation", relation=Relation(
            relation.get("label"), _span(relation.get("head"), "relation head"),
            _span(relation.get("tail"), "relation tail")), **common)]
    events = tuple(Event(e["type"], _span(e.get("trigger"), "event trigger"),
                         tuple(Argument(a["role"], a["start"], a["end"]) for a in e.get("arguments", ())))
                   for e in sample.get("events", ()))
    return event_records(dataset, sample_id, tokens, events, sample.get("image"), where)


def read(dataset: str, path: str, task: Optional[str] = None,
         schema: Optional[dict] = None) -> Iterator[Union[Record, RecordError]]:
    """Records with the dataset's schema in extra.schema: `schema` (entity_types / relation_labels / event_roles)
    when given, else the labels the file holds. Every record of a dataset has the same task."""
    records, errors, tasks = [], [], set()
    for number, where, line in numbered_lines(path):
        try:
            sample = json.loads(line)
            if not isinstance(sample, dict):
                raise RecordError(f"expected a JSON object, got {type(sample).__name__}")
            found = _records(dataset, number, where, sample, task)
        except json.JSONDecodeError as err:
            errors.append((len(records), RecordError(f"{where}: not valid JSON ({err.msg})")))
            continue
        except (RecordError, KeyError, TypeError, ValueError) as err:
            problem = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            errors.append((len(records), RecordError(f"{where}: {problem}")))
            continue
        tasks.add(found[0].task)
        records += found
    if len(tasks) > 1:
        raise RecordError(f"{path}: dataset {dataset!r} mixes tasks {sorted(tasks)}; a dataset has one task")
    schema = schema or schema_dict(records)
    for position, record in enumerate(records):
        while errors and errors[0][0] == position:
            yield errors.pop(0)[1]
        record.extra["schema"] = schema
        yield record
    yield from (error for _, error in errors)
