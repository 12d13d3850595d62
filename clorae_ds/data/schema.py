"""Label sets per dataset, and their verbalisation in instructions and targets.

Targets use words rather than codes ("person" for PER, "place of residence" for /per/loc/place_of_residence,
"arrest jail" for Justice:Arrest-Jail): pretrained backbones know the words. A label's words are its last
component (after the last '/' or ':'), lower-cased, with '_' and '-' as spaces; where two labels of one
dataset would share words, both use their whole path instead. The parser maps words back to source labels.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

ENTITY_WORDS = {"PER": "person", "LOC": "location", "ORG": "organization", "OTHER": "miscellaneous",
                "MISC": "miscellaneous"}

MNRE_LABELS = (
    "/loc/loc/administration_divisions", "/loc/loc/capital", "/loc/loc/contain", "/misc/loc/held_on",
    "/misc/misc/part_of", "/org/loc/locate_at", "/org/org/alternate_names", "/org/org/subsidiary",
    "/per/loc/place_of_birth", "/per/loc/place_of_death", "/per/loc/place_of_residence", "/per/misc/awarded",
    "/per/misc/creat", "/per/misc/nationality", "/per/misc/present_in", "/per/misc/race", "/per/misc/religion",
    "/per/org/founder_of", "/per/org/leader", "/per/org/member_of", "/per/per/alternate_names", "/per/per/alumi",
    "/per/per/charges", "/per/per/classmate", "/per/per/colleague", "/per/per/couple", "/per/per/neighbor",
    "/per/per/parent", "/per/per/peer", "/per/per/siblings",
)

# ACE2005 event types and the argument roles each takes (time roles excluded, as in OneIE).
ACE_ROLES = {
    "Business:Declare-Bankruptcy": ("Org", "Place"), "Business:End-Org": ("Org", "Place"),
    "Business:Merge-Org": ("Org",), "Business:Start-Org": ("Agent", "Org", "Place"),
    "Conflict:Attack": ("Attacker", "Instrument", "Place", "Target", "Victim"),
    "Conflict:Demonstrate": ("Entity", "Place"), "Contact:Meet": ("Entity", "Place"),
    "Contact:Phone-Write": ("Entity", "Place"), "Justice:Acquit": ("Adjudicator", "Defendant", "Place"),
    "Justice:Appeal": ("Adjudicator", "Place", "Plaintiff"),
    "Justice:Arrest-Jail": ("Agent", "Person", "Place"),
    "Justice:Charge-Indict": ("Adjudicator", "Defendant", "Place", "Prosecutor"),
    "Justice:Convict": ("Adjudicator", "Defendant", "Place"), "Justice:Execute": ("Agent", "Person", "Place"),
    "Justice:Extradite": ("Agent", "Destination", "Origin", "Person"),
    "Justice:Fine": ("Adjudicator", "Entity", "Place"), "Justice:Pardon": ("Adjudicator", "Defendant", "Place"),
    "Justice:Release-Parole": ("Entity", "Person", "Place"),
    "Justice:Sentence": ("Adjudicator", "Defendant", "Place"),
    "Justice:Sue": ("Adjudicator", "Defendant", "Place", "Plaintiff"),
    "Justice:Trial-Hearing": ("Adjudicator", "Defendant", "Place", "Prosecutor"),
    "Life:Be-Born": ("Person", "Place"), "Life:Die": ("Agent", "Instrument", "Place", "Victim"),
    "Life:Divorce": ("Person", "Place"), "Life:Injure": ("Agent", "Instrument", "Place", "Victim"),
    "Life:Marry": ("Person", "Place"),
    "Movement:Transport": ("Agent", "Artifact", "Destination", "Origin", "Vehicle"),
    "Personnel:Elect": ("Entity", "Person", "Place"), "Personnel:End-Position": ("Entity", "Person", "Place"),
    "Personnel:Nominate": ("Agent", "Person"), "Personnel:Start-Position": ("Entity", "Person", "Place"),
    "Transaction:Transfer-Money": ("Beneficiary", "Giver", "Place", "Recipient"),
    "Transaction:Transfer-Ownership": ("Artifact", "Beneficiary", "Buyer", "Place", "Seller"),
}
M2E2_TYPES = ("Conflict:Attack", "Conflict:Demonstrate", "Contact:Meet", "Contact:Phone-Write",
              "Justice:Arrest-Jail", "Life:Die", "Movement:Transport", "Transaction:Transfer-Money")
# M2E2's multimedia ontology adds roles that images show (its SWiG mapping uses them).
M2E2_EXTRA_ROLES = {"Contact:Phone-Write": ("Instrument",), "Justice:Arrest-Jail": ("Instrument",),
                    "Movement:Transport": ("Place",), "Transaction:Transfer-Money": ("Instrument",)}
M2E2_ROLES = tuple((t, tuple(sorted(set(ACE_ROLES[t]) | set(M2E2_EXTRA_ROLES.get(t, ()))))) for t in M2E2_TYPES)


@dataclass(frozen=True)
class Schema:
    entity_types: tuple[str, ...] = ()
    relation_labels: tuple[str, ...] = ()
    event_roles: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (event type, its roles)

    @property
    def event_types(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.event_roles)

    def roles(self, event_type: str) -> tuple[str, ...]:
        return dict(self.event_roles).get(event_type, ())

    @property
    def all_roles(self) -> tuple[str, ...]:
        return tuple(sorted({r for _, roles in self.event_roles for r in roles}))


SCHEMAS = {
    "twitter2015": Schema(entity_types=("PER", "LOC", "ORG", "OTHER")),
    "twitter2017": Schema(entity_types=("PER", "LOC", "ORG", "MISC")),
    "snap": Schema(entity_types=("PER", "LOC", "ORG", "MISC")),
    "mnre_v1": Schema(relation_labels=MNRE_LABELS),
    "mnre_v2": Schema(relation_labels=MNRE_LABELS),
    "m2e2": Schema(event_roles=M2E2_ROLES),
    "ace05": Schema(event_roles=tuple(ACE_ROLES.items())),
    "swig": Schema(event_roles=M2E2_ROLES),
}


def _words(label: str, whole: bool) -> str:
    if label in ENTITY_WORDS:
        return ENTITY_WORDS[label]
    text = label if whole else re.split(r"[/:]", label.strip("/"))[-1]
    return " ".join(re.sub(r"[/:_\-|]+", " ", text).lower().split())


@lru_cache(maxsize=None)
def verbalizer(labels: tuple[str, ...]) -> dict[str, str]:
    """label → words, unique within `labels` (labels sharing words fall back to their whole path). Labels
    that verbalise to the same words on purpose (OTHER and MISC) never share a dataset."""
    short = {label: _words(label, whole=False) for label in labels}
    counts: dict[str, int] = {}
    for words in short.values():
        counts[words] = counts.get(words, 0) + 1
    return {label: words if counts[words] == 1 else _words(label, whole=True) for label, words in short.items()}


def schema_for(record) -> Schema:
    """A built-in dataset's schema, or the one a record of your own data carries (extra.schema, converters/jsonl)."""
    if record.dataset in SCHEMAS:
        return SCHEMAS[record.dataset]
    carried = record.extra.get("schema")
    if carried is None:
        raise ValueError(f"no label schema for dataset {record.dataset!r}: not a built-in dataset, and its record "
                         f"{record.id!r} carries none (build its shards with build_shards.py --format jsonl)")
    return _carried_schema(json.dumps(carried, sort_keys=True))


@lru_cache(maxsize=None)
def _carried_schema(text: str) -> Schema:
    data = json.loads(text)
    return Schema(entity_types=tuple(data.get("entity_types", ())), relation_labels=tuple(data.get("relation_labels", ())),
                  event_roles=tuple((t, tuple(roles)) for t, roles in data.get("event_roles", ())))


def schema_dict(records) -> dict:
    """The label schema of your own data's records, as JSON: every label they hold, sorted."""
    entity_types = sorted({e.type for r in records for e in r.entities})
    relation_labels = sorted({r.relation.label for r in records if r.relation and r.relation.label is not None})
    roles: dict = {}
    for record in records:
        for event in record.events:
            roles.setdefault(event.type, set()).update(a.role for a in event.arguments)
    return {"entity_types": entity_types, "relation_labels": relation_labels,
            "event_roles": [[t, sorted(r)] for t, r in sorted(roles.items())]}
