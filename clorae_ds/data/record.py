"""The unified MIE record: one sample of one (sub)task, JSON-serialisable, validated on read and write.

Spans are token offsets [start, end) into `tokens`. A record holds the gold structure of its subtask:
entities (mner), one relation (mre; label None = no relation, which is never scored as a tuple), or events
(mee: `trigger` records carry the triggers, `argument` records the same events with their arguments).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

DATASETS = ("twitter2015", "twitter2017", "snap", "mnre_v1", "mnre_v2", "m2e2", "ace05", "swig")
SUBTASKS = {"mner": ("entity",), "mre": ("relation",), "mee": ("trigger", "argument")}
TASKS = tuple(SUBTASKS)  # the task experts' default order
DATASET_NAME = re.compile(r"[a-z][a-z0-9_]*")  # the built-in DATASETS, or your own (converters/jsonl)


class RecordError(ValueError):
    """A record that breaks the schema; the message names the record and the problem."""


@dataclass(frozen=True)
class Span:
    start: int
    end: int


@dataclass(frozen=True)
class Entity:
    type: str
    start: int
    end: int


@dataclass(frozen=True)
class Relation:
    label: Optional[str]  # None: the pair is annotated with no relation
    head: Span
    tail: Span


@dataclass(frozen=True)
class Argument:
    role: str
    start: int
    end: int


@dataclass(frozen=True)
class Event:
    type: str
    trigger: Span
    arguments: tuple[Argument, ...] = ()


@dataclass(frozen=True)
class Record:
    id: str
    dataset: str
    task: str
    subtask: str
    tokens: tuple[str, ...]
    entities: tuple[Entity, ...] = ()
    relation: Optional[Relation] = None
    events: tuple[Event, ...] = ()
    image: Optional[str] = None  # the image file name as the dataset gives it (no image content here)
    features: Optional[str] = None  # path of precomputed visual features (.npy), when attached
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        validate(self)

    def span_text(self, start: int, end: int) -> str:
        return " ".join(self.tokens[start:end])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["tokens"] = list(self.tokens)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        try:
            relation = data.get("relation")
            return cls(
                id=str(data["id"]), dataset=data["dataset"], task=data["task"], subtask=data["subtask"],
                tokens=tuple(data["tokens"]),
                entities=tuple(Entity(e["type"], e["start"], e["end"]) for e in data.get("entities", ())),
                relation=None if relation is None else Relation(
                    relation["label"], Span(**relation["head"]), Span(**relation["tail"])),
                events=tuple(Event(ev["type"], Span(**ev["trigger"]),
                                   tuple(Argument(a["role"], a["start"], a["end"]) for a in ev.get("arguments", ())))
                             for ev in data.get("events", ())),
                image=data.get("image"), features=data.get("features"), extra=dict(data.get("extra") or {}))
        except (KeyError, TypeError) as err:
            raise RecordError(f"record {data.get('id', '?') if isinstance(data, dict) else '?'}: malformed "
                              f"({type(err).__name__}: {err})") from None


def validate(record: Record) -> None:
    def fail(problem: str):
        raise RecordError(f"record {record.id!r} ({record.dataset}): {problem}")

    if not isinstance(record.dataset, str) or not DATASET_NAME.fullmatch(record.dataset):
        fail(f"dataset name {record.dataset!r} is not lower-case letters, digits and '_' (starting with a letter)")
    if record.subtask not in SUBTASKS.get(record.task, ()):
        fail(f"subtask {record.subtask!r} does not belong to task {record.task!r}")
    if not record.tokens or not all(isinstance(t, str) and t for t in record.tokens):
        fail("tokens must be a non-empty list of non-empty strings")
    n = len(record.tokens)

    def check_span(start, end, what):
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n):
            fail(f"{what} span [{start}, {end}) is outside the {n} tokens")

    for entity in record.entities:
        if not entity.type:
            fail("entity with an empty type")
        check_span(entity.start, entity.end, f"entity {entity.type!r}")
    if record.task == "mre":
        if record.relation is None:
            fail("an mre record needs a relation (label None for no relation)")
        check_span(record.relation.head.start, record.relation.head.end, "relation head")
        check_span(record.relation.tail.start, record.relation.tail.end, "relation tail")
    elif record.relation is not None:
        fail(f"a {record.task} record has a relation")
    if record.task != "mee" and record.events:
        fail(f"a {record.task} record has events")
    for event in record.events:
        if not event.type:
            fail("event with an empty type")
        check_span(event.trigger.start, event.trigger.end, f"trigger of {event.type!r}")
        for argument in event.arguments:
            if not argument.role:
                fail(f"argument of {event.type!r} with an empty role")
            check_span(argument.start, argument.end, f"argument {argument.role!r}")
