"""What every event source yields for one sentence, as UMIE's two stages: a trigger record (also for a
sentence without events, which teaches the model to answer empty) and one argument record per event, whose
type and trigger the instruction names."""
from __future__ import annotations

from typing import Optional

from ..record import Event, Record


def event_records(dataset: str, sentence_id: str, tokens: tuple, events: tuple, image: Optional[str],
                  where: str) -> list[Record]:
    common = dict(dataset=dataset, task="mee", tokens=tokens, image=image, extra={"source": where})
    records = [Record(id=f"{dataset}-{sentence_id}-trigger", subtask="trigger",
                      events=tuple(Event(e.type, e.trigger) for e in events), **common)]
    records += [Record(id=f"{dataset}-{sentence_id}-argument-{k}", subtask="argument", events=(event,), **common)
                for k, event in enumerate(events)]
    return records
