"""Record → (instruction input, target structure string). The parser (clorae_ds.eval.parse) reads targets back.

Targets are flat, one item per structure, items joined by " ; ", each "words : span":
- entity (mner):     `person : Kyrie Irving ; location : New York`
- relation (mre):    `place of residence`   (head and tail are named in the input)
- trigger (mee):     `attack : airstrike ; die : killed`
- argument (mee):    `attacker : coalition ; place : Iraq`   (one event per record, named in the input)
and `none` when there is nothing to extract. Labels appear as their words (schema.verbalizer). A ";" inside a
span is written as the full-width "；" (NFKC maps it back), so a span never reads as a separator; ":" inside
a span is safe (the parser matches the label first).
"""
from __future__ import annotations

from .record import Record
from .schema import schema_for, verbalizer

ITEM_SEPARATOR = " ; "
LABEL_SEPARATOR = " : "
EMPTY = "none"


INPUT_PREFIX, INPUT_TEXT_END = "Give the text: ", " Please extract"


def text_of_input(source: str) -> str:
    """The sample's text inside a rendered input (what `render` put between its prefix and the instruction)."""
    if not source.startswith(INPUT_PREFIX) or INPUT_TEXT_END not in source:
        raise ValueError(f"not a rendered input: {source[:80]!r}")
    return source[len(INPUT_PREFIX):source.rindex(INPUT_TEXT_END)]


def span_for_target(record: Record, start: int, end: int) -> str:
    return " ".join(record.tokens[start:end]).replace(";", "；")


def _items(pairs) -> str:
    return ITEM_SEPARATOR.join(f"{words}{LABEL_SEPARATOR}{span}" for words, span in pairs) or EMPTY


def render(record: Record) -> tuple[str, str]:
    schema = schema_for(record)
    text = " ".join(record.tokens)
    if record.subtask == "entity":
        words = verbalizer(schema.entity_types)
        types = ", ".join(dict.fromkeys(words[t] for t in schema.entity_types))
        target = _items((words.get(e.type, e.type.lower()), span_for_target(record, e.start, e.end))
                        for e in record.entities)
        return f"{INPUT_PREFIX}{text}{INPUT_TEXT_END} the following entity types: {types}", target
    if record.subtask == "relation":
        relation = record.relation
        words = verbalizer(schema.relation_labels)
        head = record.span_text(relation.head.start, relation.head.end)
        tail = record.span_text(relation.tail.start, relation.tail.end)
        target = EMPTY if relation.label is None else words.get(relation.label, relation.label)
        return f"{INPUT_PREFIX}{text}{INPUT_TEXT_END} the relation between: {head} and {tail}", target
    type_words = verbalizer(schema.event_types)
    if record.subtask == "trigger":
        types = ", ".join(type_words[t] for t in schema.event_types)
        target = _items((type_words.get(e.type, e.type.lower()), span_for_target(record, e.trigger.start, e.trigger.end))
                        for e in record.events)
        return f"{INPUT_PREFIX}{text}{INPUT_TEXT_END} the following event types: {types}", target
    if len(record.events) != 1:
        raise ValueError(f"record {record.id!r}: an argument record holds exactly one event, not {len(record.events)}")
    event = record.events[0]
    role_words = verbalizer(schema.all_roles)
    roles = ", ".join(role_words[r] for r in schema.roles(event.type)) or "any"
    trigger = record.span_text(event.trigger.start, event.trigger.end)
    target = _items((role_words.get(a.role, a.role.lower()), span_for_target(record, a.start, a.end))
                    for a in event.arguments)
    return (f"{INPUT_PREFIX}{text}{INPUT_TEXT_END} the arguments of the "
            f"{type_words.get(event.type, event.type.lower())} event triggered by: {trigger} with the roles: {roles}"), target
