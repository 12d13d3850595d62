"""The unified record and the raw-format converters, on real lines from ../shared and hand-written cases."""
import json
import os

import pytest

from clorae_ds.data import Entity, Record, RecordError, Relation, Span, load_raw

RAW = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "raw")
needs_raw = pytest.mark.skipif(not os.path.isdir(RAW), reason="../shared/data/raw is not beside the checkout")


@needs_raw
@pytest.mark.parametrize("dataset, path, samples, tuples", [
    ("twitter2015", "twitter2015/valid.txt", 1000, 1594),  # 1594 dev entity mentions (cpu-training-facts.md)
    ("twitter2017", "twitter2017/valid.txt", 723, None),
    ("mnre_v1", "mnre_v1/ours_val.txt", 975, None),
    ("mnre_v2", "mnre_v2/mnre_val.txt", 1624, None),
    ("m2e2", "m2e2/text_event_dev.json", 357 + 83, 83),  # SOURCES.md: 357 sentences, 83 events
])
def test_real_dev_files_convert_completely(dataset, path, samples, tuples):
    skipped = []
    records = load_raw(dataset, os.path.join(RAW, path), on_error="skip", skipped=skipped)
    assert skipped == [] and len(records) == samples
    assert len({r.id for r in records}) == samples
    if dataset.startswith("twitter"):
        assert all(r.image and r.image.endswith(".jpg") for r in records)
        if tuples:
            assert sum(len(r.entities) for r in records) == tuples
    if dataset == "m2e2":
        assert sum(len(r.events) for r in records if r.subtask == "trigger") == tuples
        assert sum(r.subtask == "argument" for r in records) == 83
    for record in records:
        assert Record.from_dict(json.loads(json.dumps(record.to_dict()))) == record


@needs_raw
def test_real_twitter_lines_decode_iob():
    record = load_raw("twitter2015", os.path.join(RAW, "twitter2015/train.txt"))[0]
    assert record.image == "1015799.jpg" and record.tokens[:3] == ("RT", "@JayKenMinaj", "_")
    assert [(e.type, record.span_text(e.start, e.end)) for e in record.entities][0] == ("PER", "George Zimmerman")


@needs_raw
def test_real_mnre_no_relation_labels_become_none():
    v1 = load_raw("mnre_v1", os.path.join(RAW, "mnre_v1/ours_val.txt"))
    v2 = load_raw("mnre_v2", os.path.join(RAW, "mnre_v2/mnre_val.txt"))
    for records in (v1, v2):
        labels = {r.relation.label for r in records}
        assert None in labels and "none" not in labels and "None" not in labels
        assert all(label is None or label.startswith("/") for label in labels)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_conll_edge_cases(tmp_path):
    path = write(tmp_path, "t.txt", "IMGID:1\nKyrie\tB-PER\nIrving\tI-PER\nin\tO\nNew\tB-LOC\nYork\tI-LOC\n\n"
                 "IMGID:2\nnaïve\tO\ncafé\tB-ORG\n😀\tI-MISC\n\n\n"
                 "IMGID:3\nstray\tI-OTHER\nend\tB-LOC\n")
    first, second, third = load_raw("twitter2017", path)
    assert [(e.type, e.start, e.end) for e in first.entities] == [("PER", 0, 2), ("LOC", 3, 5)]
    assert [(e.type, e.start, e.end) for e in second.entities] == [("ORG", 1, 2), ("MISC", 2, 3)]
    assert [(e.type, e.start, e.end) for e in third.entities] == [("OTHER", 0, 1), ("LOC", 1, 2)]  # entity at end


@pytest.mark.parametrize("text, problem", [
    ("IMGID:1\n\nIMGID:2\nok\tO\n", "t.txt:1: tweet '1' has no tokens"),
    ("IMGID:1\nno tab here\n\nIMGID:2\nok\tO\n", "t.txt:2: expected 'token<TAB>tag'"),
    ("IMGID:1\nword\tX-PER\n\nIMGID:2\nok\tO\n", "tag 'X-PER' is not O"),
])
def test_conll_bad_tweets_fail_with_file_line_or_are_skipped(tmp_path, text, problem):
    path = write(tmp_path, "t.txt", text)
    with pytest.raises(RecordError, match=problem):
        load_raw("twitter2015", path)
    skipped = []
    records = load_raw("twitter2015", path, on_error="skip", skipped=skipped)
    assert [r.tokens for r in records] == [("ok",)] and len(skipped) == 1 and problem.split(": ")[-1] in skipped[0]


def test_mnre_edge_cases(tmp_path):
    good = {"token": ["He", 'said', '"hi"', "to", "O'Neil", "in", "Zürich"], "h": {"name": "He", "pos": [0, 1]},
            "t": {"name": "O'Neil", "pos": [4, 5]}, "img_id": "a.jpg", "relation": "/per/per/peer"}
    none = dict(good, relation="none")
    out_of_range = dict(good, t={"name": "x", "pos": [6, 9]})
    path = write(tmp_path, "m.txt", "\n".join([repr(good), repr(none), "{'token': [", repr(out_of_range),
                                               "__import__('os').system('echo pwned')"]) + "\n")
    skipped = []
    records = load_raw("mnre_v1", path, on_error="skip", skipped=skipped)
    assert [r.relation.label for r in records] == ["/per/per/peer", None]
    assert records[0].tokens[2] == '"hi"' and records[0].image == "a.jpg"
    assert len(skipped) == 3
    assert "m.txt:3: not a Python dict literal" in skipped[0]
    assert "m.txt:4" in skipped[1] and "relation tail span [6, 9) is outside the 7 tokens" in skipped[1]
    assert "m.txt:5: not a Python dict literal" in skipped[2]  # literal_eval never runs code
    with pytest.raises(RecordError, match="m.txt:3"):
        load_raw("mnre_v1", path)


def test_m2e2_edge_cases(tmp_path):
    sentences = [
        {"sentence_id": "s1", "words": ["Police", "arrested", "two", "men"], "image": ["a.jpg", "b.jpg"],
         "golden-event-mentions": [{"trigger": {"start": 1, "end": 2}, "event_type": "Justice:Arrest-Jail",
                                    "arguments": [{"role": "Agent", "start": 0, "end": 1},
                                                  {"role": "Person", "start": 2, "end": 4}]}]},
        {"sentence_id": "s2", "words": ["Nothing", "happened"], "golden-event-mentions": []},
        {"sentence_id": "s3", "words": ["Bad"], "golden-event-mentions": [
            {"trigger": {"start": 0, "end": 2}, "event_type": "Life:Die", "arguments": []}]},
    ]
    path = write(tmp_path, "e.json", json.dumps(sentences))
    skipped = []
    records = load_raw("m2e2", path, on_error="skip", skipped=skipped)
    assert [(r.id, r.subtask) for r in records] == [("m2e2-s1-trigger", "trigger"),
                                                    ("m2e2-s1-argument-0", "argument"), ("m2e2-s2-trigger", "trigger")]
    assert records[0].events[0].arguments == () and len(records[1].events[0].arguments) == 2
    assert records[0].image == "a.jpg" and records[2].events == ()
    assert len(skipped) == 1 and "e.json[2]" in skipped[0]
    with pytest.raises(RecordError, match=r"bad.json:1: not valid JSON"):
        load_raw("m2e2", write(tmp_path, "bad.json", "[{"))


def test_record_validation_names_the_record():
    with pytest.raises(RecordError, match="record 'x' \\(twitter2015\\): entity 'PER' span \\[1, 3\\) is outside"):
        Record("x", "twitter2015", "mner", "entity", ("a", "b"), entities=(Entity("PER", 1, 3),))
    with pytest.raises(RecordError, match="subtask 'relation' does not belong to task 'mner'"):
        Record("x", "twitter2015", "mner", "relation", ("a",))
    with pytest.raises(RecordError, match="dataset name 'CoNLL-03' is not lower-case"):
        Record("x", "CoNLL-03", "mner", "entity", ("a",))
    Record("x", "conll03", "mner", "entity", ("a",))  # a dataset of your own (its schema travels in the record)
    with pytest.raises(RecordError, match="needs a relation"):
        Record("x", "mnre_v1", "mre", "relation", ("a",))
    with pytest.raises(RecordError, match="malformed"):
        Record.from_dict({"id": "y", "dataset": "mnre_v1"})
    ok = Record("x", "mnre_v2", "mre", "relation", ("a", "b"), relation=Relation(None, Span(0, 1), Span(1, 2)))
    assert Record.from_dict(ok.to_dict()) == ok


def test_load_raw_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_raw("conll03", "x")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_raw("twitter2015", str(tmp_path / "missing.txt"))



ACE_LINES = [
    {"doc_id": "d1", "sent_id": "d1-0", "tokens": ["Rebels", "attacked", "Kabul", "on", "Monday", ";", "two", "died"],
     "entity_mentions": [{"id": "e1", "start": 0, "end": 1, "entity_type": "PER"},
                         {"id": "e2", "start": 2, "end": 3, "entity_type": "GPE"},
                         {"id": "e3", "start": 4, "end": 5, "entity_type": "TIME"},
                         {"id": "e4", "start": 6, "end": 7, "entity_type": "PER"}],
     "event_mentions": [{"event_type": "Conflict:Attack", "trigger": {"start": 1, "end": 2, "text": "attacked"},
                         "arguments": [{"entity_id": "e1", "role": "Attacker", "text": "Rebels"},
                                       {"entity_id": "e2", "role": "Place", "text": "Kabul"},
                                       {"entity_id": "e3", "role": "Time-Within", "text": "Monday"}]},
                        {"event_type": "Life:Die", "trigger": {"start": 7, "end": 8, "text": "died"},
                         "arguments": [{"entity_id": "e4", "role": "Victim", "text": "two"}]}]},
    {"doc_id": "d1", "sent_id": "d1-1", "tokens": ["Quiet", "day"], "entity_mentions": [], "event_mentions": []},
    {"doc_id": "d1", "sent_id": "d1-2", "tokens": ["x"], "entity_mentions": [],
     "event_mentions": [{"event_type": "Life:Die", "trigger": {"start": 0, "end": 1},
                         "arguments": [{"entity_id": "missing", "role": "Victim"}]}]},
]


def test_ace05_oneie_fixture(tmp_path):
    path = write(tmp_path, "dev.oneie.json", "\n".join(json.dumps(line) for line in ACE_LINES) + "\n")
    skipped = []
    records = load_raw("ace05", path, on_error="skip", skipped=skipped)
    assert [r.id for r in records] == ["ace05-d1-0-trigger", "ace05-d1-0-argument-0", "ace05-d1-0-argument-1",
                                       "ace05-d1-1-trigger"]
    trigger, attack, die, quiet = records
    assert [(e.type, e.trigger) for e in trigger.events] == [("Conflict:Attack", Span(1, 2)), ("Life:Die", Span(7, 8))]
    assert [(a.role, a.start, a.end) for a in attack.events[0].arguments] == [("Attacker", 0, 1), ("Place", 2, 3)]
    assert die.events[0].arguments[0].role == "Victim" and quiet.events == ()
    assert len(skipped) == 1 and "dev.oneie.json:3" in skipped[0] and "missing" in skipped[0]


def test_swig_fixture(tmp_path):
    write(tmp_path, "ace_sr_mapping.txt", "arresting\tagent\tJustice||Arrest|Jail\tAgent\n"
                                         "arresting\tsuspect\tJustice||Arrest|Jail\tPerson\n"
                                         "arresting\tplace\tJustice||Arrest|Jail\tPlace\n")
    write(tmp_path, "imsitu_space.json", json.dumps({"nouns": {
        "n1": {"gloss": ["police officer", "policeman"]}, "n2": {"gloss": ["man"]}}}))
    path = write(tmp_path, "dev.json", json.dumps({
        "arresting_1.jpg": {"verb": "arresting", "frames": [{"agent": "n1", "suspect": "n2", "place": ""}],
                            "bb": {}, "height": 10, "width": 10},
        "jumping_2.jpg": {"verb": "jumping", "frames": [{"agent": "n2"}]}}))
    skipped = []
    trigger, argument = load_raw("swig", path, on_error="skip", skipped=skipped)
    assert trigger.tokens == ("arresting", "police", "officer", "man") and trigger.image == "arresting_1.jpg"
    assert trigger.events[0].type == "Justice:Arrest-Jail" and trigger.events[0].trigger == Span(0, 1)
    assert [(a.role, argument.span_text(a.start, a.end)) for a in argument.events[0].arguments] == [
        ("Agent", "police officer"), ("Person", "man")]
    assert len(skipped) == 1 and "'jumping' has no ACE event" in skipped[0]
    os.remove(tmp_path / "imsitu_space.json")
    with pytest.raises(FileNotFoundError, match="needs imsitu_space.json beside it"):
        load_raw("swig", path)


@needs_raw
def test_swig_reads_the_real_m2e2_mapping():
    from clorae_ds.data.converters.swig import read_mapping

    mapping = read_mapping(os.path.join(RAW, "swig", "ace_sr_mapping.txt"))
    assert mapping[("arresting", "agent")] == ("Justice:Arrest-Jail", "Agent")
    from clorae_ds.data.schema import SCHEMAS

    swig = SCHEMAS["swig"]
    assert all(role in swig.roles(event) for event, role in mapping.values())


def test_the_default_adapter_has_an_expert_for_every_task_a_record_can_carry():
    from clorae_ds.adapters import CLoRAEConfig
    from clorae_ds.data.record import TASKS

    assert CLoRAEConfig().tasks == list(TASKS)  # the same tasks, in the experts' order
