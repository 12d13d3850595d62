"""The train-set lookup baseline for MNER (an arm below it has not learnt the task): every phrase tagged as an
entity in the training set, with its most common type, matched longest-first in each dev sentence."""
from __future__ import annotations

from collections import Counter, defaultdict

from ..data.record import Record
from .parse import gold_tuples, normalize_span
from .score import score, score_key


def lookup_baseline(train: list[Record], dev: list[Record], min_entity_share: float = 0.0) -> dict:
    """`min_entity_share`: keep a phrase only if at least this share of its train occurrences are entities
    (0: any phrase ever tagged; 0.5 gives the stronger variant of ../shared/notes/cpu-training-facts.md)."""
    types = defaultdict(Counter)
    for record in train:
        for e in record.entities:
            types[tuple(record.tokens[e.start:e.end])][e.type] += 1
    if min_entity_share > 0:
        occurrences = Counter()
        lengths = {len(p) for p in types}
        for record in train:
            for n in lengths:
                for i in range(len(record.tokens) - n + 1):
                    phrase = tuple(record.tokens[i:i + n])
                    if phrase in types:
                        occurrences[phrase] += 1
        types = {p: c for p, c in types.items() if sum(c.values()) >= min_entity_share * occurrences[p]}
    longest = max((len(p) for p in types), default=0)
    predictions = []
    for record in dev:
        found, i = [], 0
        while i < len(record.tokens):
            for n in range(min(longest, len(record.tokens) - i), 0, -1):
                phrase = tuple(record.tokens[i:i + n])
                if phrase in types:
                    found.append(("entity", types[phrase].most_common(1)[0][0], normalize_span(" ".join(phrase))))
                    i += n
                    break
            else:
                i += 1
        predictions.append(found)
    return score(predictions, [gold_tuples(r) for r in dev], [score_key(r) for r in dev])
