"""Data: the unified record and its rendering, raw-format converters (`load_raw`); the shard writer
(`shards`) and the streaming loader (`loader`) are submodules."""
from __future__ import annotations

import os
from typing import Optional

from .converters import ace05, conll, jsonl, m2e2, mnre, swig
from .record import DATASET_NAME, DATASETS, TASKS, Argument, Entity, Event, Record, RecordError, Relation, Span
from .render import render

READERS = {"twitter2015": conll.read, "twitter2017": conll.read, "snap": conll.read, "mnre_v1": mnre.read,
           "mnre_v2": mnre.read, "m2e2": m2e2.read, "ace05": ace05.read, "swig": swig.read}


def load_raw(dataset: str, path: str, on_error: str = "fail", skipped: Optional[list] = None) -> list[Record]:
    """Read one raw split file as distributed. A bad sample raises RecordError naming file:line and the
    problem; with `on_error="skip"` it is dropped and its reason appended to `skipped` (a file that cannot be
    parsed at all still raises)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return _collect(READERS[dataset](dataset, path), dataset, path, on_error, skipped)


def load_jsonl(dataset: str, path: str, task: Optional[str] = None, schema: Optional[dict] = None,
               on_error: str = "fail", skipped: Optional[list] = None) -> list[Record]:
    """Your own data as JSON lines (converters/jsonl, docs/data.md), with load_raw's error handling."""
    if not DATASET_NAME.fullmatch(dataset):
        raise ValueError(f"dataset name {dataset!r}: use lower-case letters, digits and '_', starting with a letter")
    return _collect(jsonl.read(dataset, path, task, schema), dataset, path, on_error, skipped)


def _collect(items, dataset: str, path: str, on_error: str, skipped: Optional[list]) -> list[Record]:
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: no such file {path!r}")
    records = []
    for item in items:
        if isinstance(item, RecordError):
            if on_error == "fail":
                raise item
            if skipped is not None:
                skipped.append(str(item))
        else:
            records.append(item)
    return records


__all__ = ["DATASET_NAME", "DATASETS", "TASKS", "Argument", "Entity", "Event", "Record", "RecordError", "Relation",
           "Span", "load_jsonl", "load_raw", "render"]
