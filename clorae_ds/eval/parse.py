"""Gold tuples of a record and the parser of generated text (the format of clorae_ds.data.render).

Tuples: ("entity", type, span), ("relation", label, head, tail), ("trigger", event_type, span),
("argument", event_type, role, span), labels as in the source data. Spans are normalised the same way on
both sides — NFKC, accents stripped, case-folded, words and punctuation split by single spaces — because an
uncased WordPiece decoder returns "o ' neil" for the token "O'Neil" and "zurich" for "Zürich".
`parse` never raises on model output: unknown labels and malformed items are dropped and counted, and so are
repeats (an item listed more often than its span occurs in the input).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from ..data.record import Record
from ..data.render import EMPTY
from ..data.schema import schema_for, verbalizer


@dataclass
class ParseStats:
    items: int = 0  # items kept
    unknown_labels: int = 0  # "words : span" whose words name no label of the schema
    malformed: int = 0  # items without a label, or with an empty span
    repeats: int = 0  # items dropped as repeats: an item listed more often than its span occurs in the input


def normalize_span(text: str) -> str:
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    folded = "".join(c for c in folded if not unicodedata.combining(c)).casefold()
    # Characters that normalise to nothing (a lone macron, a combining mark) keep their own form.
    return " ".join(re.findall(r"\w+|[^\w\s]", folded)) or " ".join(text.casefold().split())


def gold_tuples(record: Record) -> list[tuple]:
    span = lambda start, end: normalize_span(record.span_text(start, end))  # noqa: E731
    if record.subtask == "entity":
        return [("entity", e.type, span(e.start, e.end)) for e in record.entities]
    if record.subtask == "relation":
        r = record.relation
        return [] if r.label is None else [("relation", r.label, span(r.head.start, r.head.end),
                                            span(r.tail.start, r.tail.end))]
    if record.subtask == "trigger":
        return [("trigger", e.type, span(e.trigger.start, e.trigger.end)) for e in record.events]
    return [("argument", e.type, a.role, span(a.start, a.end)) for e in record.events for a in e.arguments]


@lru_cache(maxsize=None)
def _reader(labels: tuple[str, ...]):
    """words → label, and a regex matching "<words> : <span>" for these labels (longest words first)."""
    words = {w: label for label, w in verbalizer(labels).items()}
    alternation = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return words, re.compile(rf"({alternation})\s*:\s*(.*)", re.DOTALL) if words else None


def _item_labels(record: Record) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(labels of the schema, labels valid for this record) for an item-list subtask."""
    schema = schema_for(record)
    if record.subtask == "entity":
        return schema.entity_types, schema.entity_types
    if record.subtask == "trigger":
        return schema.event_types, schema.event_types
    return schema.all_roles, schema.roles(record.events[0].type) if record.events else ()


def parse(text: str, record: Record, stats: ParseStats | None = None) -> list[tuple]:
    stats = stats if stats is not None else ParseStats()
    flat = " ".join(str(text).split()).casefold()
    if flat.strip(" ;.") in ("", EMPTY):
        return []
    if record.subtask == "relation":
        words, _ = _reader(schema_for(record).relation_labels)
        first = flat.split(";")[0].strip(" .")
        if first not in words:
            stats.unknown_labels += 1
            return []
        r = record.relation
        stats.items += 1
        return [("relation", words[first], normalize_span(record.span_text(r.head.start, r.head.end)),
                 normalize_span(record.span_text(r.tail.start, r.tail.end)))]
    all_labels, valid = _item_labels(record)
    words, pattern = _reader(all_labels)
    event_type = record.events[0].type if record.subtask == "argument" and record.events else None
    tuples = []
    for segment in flat.split(";"):
        segment = segment.strip()
        if not segment:
            continue
        match = pattern.fullmatch(segment) if pattern else None
        span = normalize_span(match.group(2)) if match else ""
        if match is None or not span:
            if match is None and ":" in segment and segment.split(":")[0].strip():
                stats.unknown_labels += 1
            else:
                stats.malformed += 1
            continue
        label = words[match.group(1)]
        if label not in valid:
            stats.unknown_labels += 1
            continue
        if record.subtask == "entity":
            tuples.append(("entity", label, span))
        elif record.subtask == "trigger":
            tuples.append(("trigger", label, span))
        else:
            tuples.append(("argument", event_type, label, span))
    kept = cap_repeats(tuples, " ".join(record.tokens), stats)
    stats.items += len(kept)
    return kept


def cap_repeats(items: list, text: str, stats: ParseStats | None = None) -> list:
    """Greedy decoding repeats items ("person : obama ; person : obama"): each item is kept at most as often as
    its span occurs in the input `text` (at least once), so a repeat is not a false positive of its own.
    Relations (one per sample, spans from the input) pass unchanged."""
    words = normalize_span(text)
    occurrences, kept, out = {}, Counter(), []
    for item in items:
        item = tuple(item)
        span = item[-1]
        if item[0] != "relation":
            if span not in occurrences:  # word-aligned, overlapping ("0" occurs twice in "0 0")
                occurrences[span] = len(re.findall(rf"(?<![^ ])(?={re.escape(span)}(?![^ ]))", words))
            if kept[item] >= max(1, occurrences[span]):
                if stats is not None:
                    stats.repeats += 1
                continue
        kept[item] += 1
        out.append(item)
    return out
