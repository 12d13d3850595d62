"""SWiG situations (allenai/swig `SWiG_jsons/{train,dev,test}.json`), mapped to ACE events as M2E2 does.

Input: the SWiG JSON {"<image>.jpg": {"verb": "arresting", "frames": [{"agent": "n10287213", "place": "",
...}, ...], "bb": {...}, "height", "width"}}, with two files beside it: `ace_sr_mapping.txt` (M2E2's TSV:
imSitu verb, imSitu role, ACE event type with `||` between type and subtype and `|` for `-`, ACE role) and
`imsitu_space.json` (imSitu's noun glossary: {"nouns": {"n10287213": {"gloss": ["policeman", ...]}}}).
SWiG has no sentence. Each image whose verb maps to an ACE event yields a situation "sentence": the imSitu
verb (the visual trigger, as M2E2 grounds image events) followed by the glosses of its first frame's nouns in
role order, e.g. `arresting policeman man street`; then, as for text events, a trigger record (the event
type of the verb) and an argument record (roles → noun glosses), both carrying the image. Verbs outside the
mapping are skipped and counted. This text side is our construction: the paper gives none for SWiG."""
from __future__ import annotations

import json
import os
from typing import Iterator, Union

from ..record import Argument, Event, Record, RecordError, Span
from .events import event_records
from ..schema import ACE_ROLES

_ACE_TYPES = {name.casefold(): name for name in ACE_ROLES}


def read_mapping(path: str) -> dict[tuple[str, str], tuple[str, str]]:
    mapping = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4:
                raise RecordError(f"{path}:{number}: expected 4 tab-separated fields, got {len(fields)}")
            verb, role, event, ace_role = fields
            event = event.replace("||", ":").replace("|", "-")
            if event.casefold() not in _ACE_TYPES:
                raise RecordError(f"{path}:{number}: {event!r} is not an ACE event type")
            mapping[(verb, role)] = (_ACE_TYPES[event.casefold()], ace_role)  # the file writes Transfer-MONEY once
    return mapping


def read(dataset: str, path: str) -> Iterator[Union[Record, RecordError]]:
    directory = os.path.dirname(os.path.abspath(path))
    mapping_path, nouns_path = os.path.join(directory, "ace_sr_mapping.txt"), os.path.join(directory, "imsitu_space.json")
    for needed in (mapping_path, nouns_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"swig: {path} needs {os.path.basename(needed)} beside it ({needed})")
    mapping = read_mapping(mapping_path)
    verb_events = {verb: event for (verb, _), (event, _) in mapping.items()}
    try:
        with open(nouns_path, encoding="utf-8") as f:
            nouns = json.load(f)["nouns"]
        with open(path, encoding="utf-8") as f:
            images = json.load(f)
    except (json.JSONDecodeError, KeyError) as err:
        raise RecordError(f"{path}: cannot read the SWiG or noun JSON ({err})") from None
    for image, situation in sorted(images.items()):
        where = f"{path}[{image!r}]"
        try:
            verb = situation["verb"]
            if verb not in verb_events:
                yield RecordError(f"{where}: verb {verb!r} has no ACE event in the mapping")
                continue
            tokens, arguments = [verb], []
            for role, noun in sorted(situation["frames"][0].items()):
                if not noun:
                    continue
                words = nouns[noun]["gloss"][0].split()
                start = len(tokens)
                tokens += words
                if (verb, role) in mapping:
                    arguments.append(Argument(mapping[(verb, role)][1], start, len(tokens)))
            event = Event(verb_events[verb], Span(0, 1), tuple(arguments))
            records = event_records(dataset, os.path.splitext(image)[0], tuple(tokens), (event,), image, where)
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            yield RecordError(f"{where}: missing or malformed field {err}")
            continue
        except RecordError as err:
            yield RecordError(f"{where}: {err}")
            continue
        yield from records
