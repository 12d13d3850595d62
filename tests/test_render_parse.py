"""The renderer and the parser: real records round-trip, nasty model outputs never raise, and a property
test over generated records."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clorae_ds.data import Argument, Entity, Event, Record, Relation, Span, load_raw, render
from clorae_ds.data.render import text_of_input
from clorae_ds.data.schema import ACE_ROLES, MNRE_LABELS, verbalizer
from clorae_ds.eval import ParseStats, gold_tuples, normalize_span, parse

from .test_data_records import RAW, needs_raw

TOKENS = ("Kyrie", "Irving", "plays", "in", "New", "York", ";", ":", "O'Neil", "Zürich", "(", ")", "none", "person")


def tweet(*entities, tokens=TOKENS):
    return Record("t", "twitter2015", "mner", "entity", tokens, entities=tuple(Entity(*e) for e in entities))


@needs_raw
@pytest.mark.parametrize("dataset, path", [("twitter2015", "twitter2015/valid.txt"), ("twitter2017", "twitter2017/valid.txt"),
                                           ("mnre_v1", "mnre_v1/ours_val.txt"), ("mnre_v2", "mnre_v2/mnre_val.txt"),
                                           ("m2e2", "m2e2/text_event_dev.json")])
def test_real_records_round_trip(dataset, path):
    stats = ParseStats()
    for record in load_raw(dataset, os.path.join(RAW, path)):
        assert sorted(parse(render(record)[1], record, stats)) == sorted(gold_tuples(record)), record.id
    assert stats.unknown_labels == stats.malformed == 0


def test_render_formats():
    record = tweet(("PER", 0, 2), ("LOC", 4, 6))
    source, target = render(record)
    assert target == "person : Kyrie Irving ; location : New York"
    assert source.startswith("Give the text: Kyrie Irving plays") and source.endswith(
        "entity types: person, location, organization, miscellaneous")
    assert render(tweet())[1] == "none"
    assert render(tweet(("OTHER", 6, 8)))[1] == "miscellaneous : ； :"  # a ';' token never reads as a separator
    relation = Record("r", "mnre_v1", "mre", "relation", TOKENS,
                      relation=Relation("/per/loc/place_of_residence", Span(0, 2), Span(4, 6)))
    assert render(relation) == ("Give the text: " + " ".join(TOKENS) + " Please extract the relation between: "
                                "Kyrie Irving and New York", "place of residence")
    words = verbalizer(MNRE_LABELS)
    assert words["/org/org/alternate_names"] == "org org alternate names" != words["/per/per/alternate_names"]
    assert len(set(words.values())) == len(MNRE_LABELS)


@pytest.mark.parametrize("output, expected, counts", [
    ("person : Kyrie Irving", [("entity", "PER", "kyrie irving")], (1, 0, 0, 0)),
    ("  PERSON:kyrie   irving ;location : new york;", [("entity", "PER", "kyrie irving"),
                                                       ("entity", "LOC", "new york")], (2, 0, 0, 0)),
    ("person : o ' neil ; location : zurich", [("entity", "PER", "o ' neil"), ("entity", "LOC", "zurich")], (2, 0, 0, 0)),
    ("person : a : b", [("entity", "PER", "a : b")], (1, 0, 0, 0)),  # the format's own ':' inside a span
    ("person : (Kyrie", [("entity", "PER", "( kyrie")], (1, 0, 0, 0)),  # unbalanced bracket: just text
    ("animal : dog ; person : Kyrie", [("entity", "PER", "kyrie")], (1, 1, 0, 0)),  # unknown label dropped, counted
    ("person : Kyrie ; person :", [("entity", "PER", "kyrie")], (1, 0, 1, 0)),  # truncated
    ("person : Kyrie ; pers", [("entity", "PER", "kyrie")], (1, 0, 1, 0)),
    ("", [], (0, 0, 0, 0)),
    ("none", [], (0, 0, 0, 0)),
    ("NONE .", [], (0, 0, 0, 0)),
    (";;; : ;", [], (0, 0, 1, 0)),
    ("person : Kyrie ; person : Kyrie ; person : Kyrie", [("entity", "PER", "kyrie")], (1, 0, 0, 2)),  # repeats
    ("person : Bob ; person : Bob", [("entity", "PER", "bob")], (1, 0, 0, 1)),  # not in the input: once
    ("person : Kyrie ; location : Kyrie", [("entity", "PER", "kyrie"), ("entity", "LOC", "kyrie")], (2, 0, 0, 0)),
])
def test_parse_entities_robustly(output, expected, counts):
    stats = ParseStats()
    assert parse(output, tweet(), stats) == expected
    assert (stats.items, stats.unknown_labels, stats.malformed, stats.repeats) == counts


def test_an_item_counts_as_often_as_its_span_occurs_in_the_input():
    record = tweet(tokens=("Obama", "met", "Obama", "fans", "and", "Kyrie"))
    stats = ParseStats()
    output = "person : obama ; person : obama ; person : obama ; person : kyrie ; person : kyrie"
    assert parse(output, record, stats) == [("entity", "PER", "obama")] * 2 + [("entity", "PER", "kyrie")]
    assert stats.repeats == 2 and stats.items == 3


def test_parse_relations_events_and_arguments():
    relation = Record("r", "mnre_v2", "mre", "relation", ("Kyrie", "Irving", "in", "New", "York"),
                      relation=Relation("/per/loc/place_of_residence", Span(0, 2), Span(3, 5)))
    assert parse("place of residence", relation) == [("relation", "/per/loc/place_of_residence", "kyrie irving",
                                                      "new york")]
    assert parse("Place  Of Residence ; couple", relation)[0][1] == "/per/loc/place_of_residence"
    stats = ParseStats()
    assert parse("best friends", relation, stats) == [] and stats.unknown_labels == 1
    assert parse("none", relation) == [] and gold_tuples(relation)[0][2:] == ("kyrie irving", "new york")
    no_relation = Record("n", "mnre_v1", "mre", "relation", ("a", "b"), relation=Relation(None, Span(0, 1), Span(1, 2)))
    assert gold_tuples(no_relation) == [] and render(no_relation)[1] == "none"

    words = ("Police", "arrested", "two", "men", "after", "the", "air", "strike")
    trigger = Record("e", "m2e2", "mee", "trigger", words, events=(Event("Justice:Arrest-Jail", Span(1, 2)),
                                                                   Event("Conflict:Attack", Span(6, 8))))
    assert render(trigger)[1] == "arrest jail : arrested ; attack : air strike"
    assert parse("arrest jail : arrested ; attack : air strike ; marry : wed", trigger) == [
        ("trigger", "Justice:Arrest-Jail", "arrested"), ("trigger", "Conflict:Attack", "air strike")]
    argument = Record("a", "m2e2", "mee", "argument", words, events=(
        Event("Justice:Arrest-Jail", Span(1, 2), (Argument("Agent", 0, 1), Argument("Person", 2, 4))),))
    source, target = render(argument)
    assert target == "agent : Police ; person : two men"
    assert source.endswith("arguments of the arrest jail event triggered by: arrested with the roles: agent, instrument, "
                           "person, place")
    stats = ParseStats()
    # "victim" is a role of the schema but not of Arrest-Jail: dropped and counted.
    assert parse("agent : police ; victim : two men ; person : two men", argument, stats) == [
        ("argument", "Justice:Arrest-Jail", "Agent", "police"), ("argument", "Justice:Arrest-Jail", "Person", "two men")]
    assert stats.unknown_labels == 1


def test_normalize_span():
    assert normalize_span("O'Neil  in Zürich!") == "o ' neil in zurich !"
    assert normalize_span("；") == ";"


word = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=6)
words_with_separators = st.one_of(word, st.sampled_from([";", ":", "none", "person", "(", ")"]))


@st.composite
def records(draw):
    tokens = tuple(draw(st.lists(words_with_separators, min_size=1, max_size=12)))
    n = len(tokens)
    spans = st.tuples(st.integers(0, n - 1), st.integers(1, n)).map(lambda p: (min(p), max(p) + (p[0] == p[1])))
    spans = spans.filter(lambda p: p[1] <= n)
    kind = draw(st.sampled_from(["entity", "relation", "trigger", "argument"]))
    if kind == "entity":
        # gold items at distinct positions (as in the real data: the parser counts an item at most as often as its
        # span occurs in the input)
        entities = draw(st.lists(st.tuples(st.sampled_from(["PER", "LOC", "ORG", "MISC"]), spans), max_size=4,
                                 unique_by=lambda e: e[1]))
        return Record("h", "twitter2017", "mner", "entity", tokens, entities=tuple(Entity(t, *s) for t, s in entities))
    if kind == "relation":
        label = draw(st.one_of(st.none(), st.sampled_from(MNRE_LABELS)))
        return Record("h", "mnre_v2", "mre", "relation", tokens,
                      relation=Relation(label, Span(*draw(spans)), Span(*draw(spans))))
    event_type = draw(st.sampled_from(sorted(ACE_ROLES)))
    if kind == "trigger":
        events = draw(st.lists(st.tuples(st.sampled_from(sorted(ACE_ROLES)), spans), max_size=3,
                               unique_by=lambda e: e[1]))
        return Record("h", "ace05", "mee", "trigger", tokens, events=tuple(Event(t, Span(*s)) for t, s in events))
    arguments = draw(st.lists(st.tuples(st.sampled_from(ACE_ROLES[event_type]), spans), max_size=4,
                              unique_by=lambda a: a[1]))
    return Record("h", "ace05", "mee", "argument", tokens, events=(
        Event(event_type, Span(*draw(spans)), tuple(Argument(r, *s) for r, s in arguments)),))


@settings(max_examples=300, deadline=None)
@given(records())
def test_any_rendered_record_parses_back_to_its_gold_tuples(record):
    source, target = render(record)
    assert text_of_input(source) == " ".join(record.tokens)  # what rescoring saved predictions reads back
    stats = ParseStats()
    assert sorted(parse(target, record, stats)) == sorted(gold_tuples(record))
    assert stats.unknown_labels == stats.malformed == 0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_never_raises_on_arbitrary_output(text):
    for record in (tweet(), Record("r", "mnre_v1", "mre", "relation", ("a", "b"),
                                   relation=Relation("/per/per/peer", Span(0, 1), Span(1, 2)))):
        assert isinstance(parse(text, record), list)
