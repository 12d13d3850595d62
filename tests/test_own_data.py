"""Your own data: JSON lines written here → build_shards.py --format jsonl → a few training steps → evaluation,
with a dataset name and labels the project has never seen."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from clorae_ds.data import RecordError, load_jsonl, render
from clorae_ds.eval.parse import gold_tuples, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["Kyrie", "Obama", "Merkel", "Taylor", "Boston", "Paris"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def ner_rows(n, offset):
    return [{"id": f"s{i}", "text": f"{NAMES[i % 6]} visited the lab {i + offset}",
             "entities": [{"type": "VISITOR", "start": 0, "end": 1}]} for i in range(n)]


def build(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "build_shards.py"), "--format", "jsonl",
                           "--quiet", *args], capture_output=True, text=True, timeout=120)


def test_every_task_of_your_own_data_renders_and_parses_back_with_its_own_labels(tmp_path):
    rows = [{"task": "mee", "tokens": ["Rebels", "stormed", "the", "fort"],
             "events": [{"type": "Siege", "trigger": {"start": 1, "end": 2},
                         "arguments": [{"role": "Besieger", "start": 0, "end": 1},
                                       {"role": "Target", "start": 3, "end": 4}]}]},
            {"task": "mee", "text": "Nothing happened"}]
    records = load_jsonl("my_events", write_jsonl(tmp_path / "events.jsonl", rows))
    assert [r.subtask for r in records] == ["trigger", "argument", "trigger"]
    assert records[0].extra["schema"] == {"entity_types": [], "relation_labels": [],
                                          "event_roles": [["Siege", ["Besieger", "Target"]]]}
    relations = [{"task": "mre", "text": "Ada met Bob", "relation": {"label": "colleague_of", "head": {"start": 0, "end": 1},
                                                                   "tail": {"start": 2, "end": 3}}}]
    records += load_jsonl("my_relations", write_jsonl(tmp_path / "rel.jsonl", relations))
    records += load_jsonl("my_ner", write_jsonl(tmp_path / "ner.jsonl", ner_rows(2, 0)), task="mner")
    for record in records:
        source, target = render(record)
        assert parse(target, record) == gold_tuples(record), (source, target)
    assert "the following event types: siege" in render(records[0])[0]
    assert render(records[3])[1] == "colleague of"


def test_bad_lines_are_named_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ner_rows(1, 0))
    with open(path, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"text": "x y", "entities": [{"type": "A", "start": 1, "end": 5}]}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: not valid JSON"):
        load_jsonl("mine", path, task="mner")
    skipped = []
    assert len(load_jsonl("mine", path, task="mner", on_error="skip", skipped=skipped)) == 1
    assert len(skipped) == 2 and "bad.jsonl:3" in skipped[1] and "outside the 2 tokens" in skipped[1]
    with pytest.raises(RecordError, match="bad.jsonl:1: \"task\" must be one of"):
        load_jsonl("mine", path)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"task": "mner", "text": "a"},
                                                   {"task": "mee", "text": "b"}])
    with pytest.raises(RecordError, match="mixes tasks"):
        load_jsonl("mine", mixed)
    proc = build("--dataset", "Bad-Name", "--input", path, "--split", "train", "--out", str(tmp_path / "s"))
    assert proc.returncode == 2 and "dataset name 'Bad-Name'" in proc.stderr


def test_a_jsonl_dataset_builds_trains_and_is_evaluated(tmp_path, tokenizer_dir):
    shards = tmp_path / "shards"
    train = write_jsonl(tmp_path / "train.jsonl", ner_rows(48, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", ner_rows(12, 100)[:-1] + [{"text": "Nobody came", "entities": []}])
    for split, path in (("train", train), ("dev", dev)):
        proc = build("--dataset", "lab_visits", "--task", "mner", "--input", path, "--split", split, "--out",
                     str(shards))
        assert proc.returncode == 0, proc.stderr
    schema = json.loads((shards / "lab_visits.schema.json").read_text())
    assert schema["entity_types"] == ["VISITOR"]  # from train; the dev split reused it
    recipe = {
        "model": {"family": "t5", "preset": "tiny", "tokenizer": tokenizer_dir, "adapter": {"rank": 6}},
        "data": {"train": {"lab_visits": str(shards / "lab_visits-train-000000.tar")},
                 "dev": {"lab_visits": str(shards / "lab_visits-dev-000000.tar")},
                 "num_workers": 0, "batches_per_epoch": 4, "max_input_length": 48, "max_target_length": 16},
        "schedule": {"epochs": 1, "log_every": 2}, "eval": {"max_new_tokens": 8, "batch_size": 8},
        "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--config",
                           str(tmp_path / "recipe.yaml")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event"')]
    evaluation = next(e for e in events if e["event"] == "eval")
    assert evaluation["samples"] == 12 and set(evaluation["f1"]) == {"lab_visits"}
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["global_step"] == 4 and set(summary["task_weights"]) == {"lab_visits"}
