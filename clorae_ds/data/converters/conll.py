"""Twitter-2015 / Twitter-2017 / Twitter-SNAP: CoNLL with an `IMGID:<id>` line opening each tweet, then one
`token<TAB>IOB-tag` line per token; tweets are separated by blank lines."""
from __future__ import annotations

from typing import Iterator, Union

from ..record import Entity, Record, RecordError


def iob_entities(tags: list[str], where: str) -> list[Entity]:
    """IOB2 spans; a stray I-X (after O or another type) opens a new entity, as the CoNLL scorer reads it."""
    entities, start, kind = [], None, None
    for i, tag in enumerate(tags + ["O"]):
        if tag == "O" or tag.startswith("B-") or (tag.startswith("I-") and tag[2:] != kind):
            if kind is not None:
                entities.append(Entity(kind, start, i))
            start, kind = (i, tag[2:]) if tag != "O" else (None, None)
        elif not tag.startswith("I-"):
            raise RecordError(f"{where}: tag {tag!r} is not O, B-TYPE or I-TYPE")
    return entities


def _tweet(dataset: str, path: str, index: int, first_line: int, image, lines) -> Record:
    where = f"{path}:{first_line}"
    tokens, tags = [], []
    for number, line in lines:
        token, sep, tag = line.rpartition("\t")
        if not sep or not token or not tag.strip():
            raise RecordError(f"{path}:{number}: expected 'token<TAB>tag', got {line!r}")
        tokens.append(token)
        tags.append(tag.strip())
    if not tokens:
        raise RecordError(f"{where}: tweet {image!r} has no tokens")
    try:
        return Record(id=f"{dataset}-{index}", dataset=dataset, task="mner", subtask="entity", tokens=tuple(tokens),
                      entities=tuple(iob_entities(tags, where)), image=f"{image}.jpg" if image else None,
                      extra={"source": where})
    except RecordError as err:
        raise RecordError(f"{where}: {err}") from None


def read(dataset: str, path: str) -> Iterator[Union[Record, RecordError]]:
    """Yields a Record per tweet, or the RecordError of a tweet that cannot be read (the caller decides)."""
    block, image, first_line, index = [], None, None, 0

    def flush():
        nonlocal block, image, first_line, index
        if first_line is not None:
            try:
                yield _tweet(dataset, path, index, first_line, image, block)
            except RecordError as err:
                yield err
            index += 1
        block, image, first_line = [], None, None

    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if line.startswith("IMGID:"):
                yield from flush()
                image, first_line = line[len("IMGID:"):].strip(), number
            elif not line.strip():
                yield from flush()
            else:
                if first_line is None:
                    first_line = number
                block.append((number, line))
    yield from flush()
