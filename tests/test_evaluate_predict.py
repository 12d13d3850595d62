"""Scorer arithmetic, launchers/evaluate.py on 2 ranks, launchers/predict.py with and without an image, and the
cost report."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clorae_ds.eval import dataset_f1, score

from .test_train import ENV, ROOT, recipe, train

LAUNCHERS = os.path.join(ROOT, "launchers")


def test_scorer_arithmetic_by_hand():
    predictions = [[("entity", "PER", "a"), ("entity", "LOC", "b")], [("entity", "PER", "c"), ("entity", "PER", "c")],
                   [], [("relation", "peer", "x", "y")], [("trigger", "Life:Die", "died")]]
    golds = [[("entity", "PER", "a")], [("entity", "PER", "c")], [("entity", "ORG", "d")],
             [("relation", "peer", "x", "y")], [("trigger", "Life:Die", "died"), ("trigger", "Conflict:Attack", "hit")]]
    keys = ["twitter2015", "twitter2015", "twitter2015", "mnre_v1", "m2e2_trigger"]
    report = score(predictions, golds, keys)
    tw = report["twitter2015"]
    # tp 2 (a, one of the two c's: a prediction consumes at most one gold), predicted 4, gold 3
    assert (tw["tp"], tw["predicted"], tw["gold"]) == (2, 4, 3)
    assert tw["precision"] == pytest.approx(0.5) and tw["recall"] == pytest.approx(2 / 3)
    assert tw["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert report["mnre_v1"]["f1"] == 1.0 and report["m2e2_trigger"]["f1"] == pytest.approx(2 / 3)
    assert report["All"] == pytest.approx(100 * (tw["f1"] + 1.0 + 2 / 3))
    assert dataset_f1({**report, "m2e2_argument": {"f1": 0.0}})["m2e2"] == pytest.approx(1 / 3)
    assert score([[]], [[]], ["mnre_v2"])["mnre_v2"]["f1"] == 0.0  # nothing to find, nothing found: no credit


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("trained")
    config = recipe(tmp, tokenizer_dir, schedule={"epochs": 1},
                    model={"family": "t5", "preset": "tiny", "tokenizer": tokenizer_dir,
                           "adapter": {"rank": 8, "alpha": 16, "dropout": 0.0},
                           "visual": {"vision_tower": "tiny", "feature_dim": 16}})
    summary = next(e for e in train("single", "zero0.json", config) if e["event"] == "summary")
    return tmp, summary["adapter"]


@pytest.mark.slow
def test_evaluate_on_two_ranks_scores_every_sample_once(trained):
    tmp, adapter = trained
    out = tmp / "eval"
    shards = [str(tmp / "shards" / "twitter2015-dev-000000.tar"), str(tmp / "shards" / "mnre_v1-dev-000000.tar")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(LAUNCHERS, "evaluate.py"), "--adapter", adapter, "--shards", *shards,
                           "--output", str(out), "--batch-size", "3", "--max-new-tokens", "8"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0's progress line: 16 samples per dataset, 2 ranks of batches of 3 (not a terminal: one line each)
    assert "evaluate twitter2015: 6/16 samples" in proc.stderr and "evaluate mnre_v1: 16/16 samples" in proc.stderr
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert sorted(r["id"] for r in rows) == sorted([f"t{i}" for i in range(16)] + [f"r{i}" for i in range(16)])
    assert {"id", "input", "output", "predicted", "gold"} <= set(rows[0])
    report = json.load(open(out / "report.json"))
    assert report["samples"] == 32 and set(report["scores"]) == {"twitter2015", "mnre_v1", "All"}
    table = open(out / "report.md").read()
    assert "| metric | Twitter-15 | MRE-V1 | All |" in table
    routing = json.load(open(out / "routing.json"))
    assert set(routing["layer_groups"]) == {"encoder.bottom", "encoder.top", "decoder.bottom", "decoder.top"}  # 2 blocks
    for per_task in routing["layer_groups"].values():
        assert set(per_task) <= {"mner", "mre"} and all(0 < v < 1 for v in per_task.values())


def test_evaluate_refuses_a_dataset_it_was_trained_on(trained):
    tmp, adapter = trained
    proc = subprocess.run([sys.executable, os.path.join(LAUNCHERS, "evaluate.py"), "--adapter", adapter, "--shards",
                           str(tmp / "shards" / "mnre_v1-dev-000000.tar"), "--exclude-datasets", "mnre_v1"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "trained on them" in proc.stderr


def predict(adapter, *args):
    return subprocess.run([sys.executable, os.path.join(LAUNCHERS, "predict.py"), "--adapter", adapter, *args],
                          env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_predict_with_and_without_an_image(trained, tmp_path):
    from PIL import Image

    _, adapter = trained
    text = predict(adapter, "--task", "mner", "--text", "Kyrie said hello 3")
    assert text.returncode == 0, text.stderr[-2000:]
    result = json.loads(text.stdout.strip().splitlines()[-1])
    assert result["task"] == "mner" and isinstance(result["entities"], list)
    image = tmp_path / "post.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(image)
    with_image = predict(adapter, "--task", "mre", "--text", "Obama met Merkel 7", "--head", "Obama", "--tail", "Merkel",
                         "--image", str(image))
    assert with_image.returncode == 0, with_image.stderr[-2000:]
    assert json.loads(with_image.stdout.strip().splitlines()[-1])["head"] == "Obama"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    bad = predict(adapter, "--task", "mner", "--text", "Kyrie said hello", "--image", str(broken))
    assert bad.returncode == 2 and "undecodable image" in bad.stderr
    missing = predict(str(tmp_path / "nowhere"), "--task", "mner", "--text", "x")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unknown = predict(adapter, "--task", "ner", "--text", "x")
    assert unknown.returncode == 2 and "unknown task 'ner'" in unknown.stderr
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"task": "mner", "text": "Merkel said hello"}) + "\n" +
                        json.dumps({"task": "mre", "text": "a b"}) + "\n")
    batch = predict(adapter, "--jsonl", str(requests))
    lines = [json.loads(line) for line in batch.stdout.strip().splitlines() if line.startswith("{")]
    assert batch.returncode == 1 and "entities" in lines[0] and "requests.jsonl:2" in lines[1]["error"]


def test_cost_report_on_the_tiny_shape():
    proc = subprocess.run([sys.executable, os.path.join(LAUNCHERS, "report_cost.py"), "--model", "tiny", "--rank", "6"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    methods = result["methods"]
    # (r + N·r_t)(d_in + d_out) + 2·d_in versus r(d_in + d_out): with r 6, N 3, r_t 2 → 12/6 plus the gates
    assert 2.0 < result["clorae_over_lora_expert_params"] < 2.2
    for method in ("LoRA", "C-LoRAE"):
        assert methods[method]["adapter_expert_params"] == methods[method]["expert_params_formula"]
    assert result["clorae_over_lora_trainable"] > result["clorae_over_lora_expert_params"]  # + MIM regressors
    assert methods["full fine-tuning"]["trainable_params"] > methods["C-LoRAE"]["trainable_params"]
    assert methods["C-LoRAE"]["forward_backward_gflops"] > methods["LoRA"]["forward_backward_gflops"] > 0
    # MIM costs FLOPs, at least its stated lower bound
    assert result["clorae_without_mim_over_lora_flops"] < result["clorae_floor_over_lora_flops"] \
        <= result["clorae_over_lora_flops"]
    assert methods["LoRA"]["forward_gflops"] > 0


def prediction_rows(outcomes: dict) -> list[dict]:
    """{key: [True/False per sample]} → rows with one gold tuple each, predicted right or wrong."""
    return [{"id": f"{key}-{i}", "key": key, "gold": [("entity", "person", f"x{i}")],
             "predicted": [("entity", "person", f"x{i}" if right else "wrong")]}
            for key, samples in outcomes.items() for i, right in enumerate(samples)]


def test_paired_bootstrap():
    from clorae_ds.eval.bootstrap import paired_bootstrap

    reference = prediction_rows({"a": [True] * 10 + [False] * 10, "b": [False] * 20})
    same = paired_bootstrap([reference], [reference])
    assert same["difference"] == same["low"] == same["high"] == 0.0

    perfect = prediction_rows({"a": [True] * 20, "b": [True] * 20})
    versus = paired_bootstrap([perfect], [reference])  # every resample: 200 − 100 × F1(a) of the reference
    assert versus["difference"] == pytest.approx(150.0) and versus["share_above_zero"] == 1.0
    assert versus["low"] < 150.0 < versus["high"]

    slightly = prediction_rows({"a": [True] * 11 + [False] * 9, "b": [False] * 20})  # one sample better
    observed = score([r["predicted"] for r in slightly], [r["gold"] for r in slightly], [r["key"] for r in slightly])
    result = paired_bootstrap([slightly], [reference], resamples=2000)
    assert result["difference"] == pytest.approx(observed["All"] - 50.0)
    assert result["low"] <= 0.0 < result["high"]  # one sample of twenty is within dev-sampling noise
    two_seeds = paired_bootstrap([slightly, reference], [reference, reference])
    assert two_seeds["difference"] == pytest.approx(result["difference"] / 2)

    with pytest.raises(ValueError, match="different dev samples"):
        paired_bootstrap([reference[:-1]], [reference])

    # Rows as a predictions.jsonl gives them back (JSON lists, not tuples) score the same.
    as_json = json.loads(json.dumps(slightly))
    assert paired_bootstrap([as_json], [reference], resamples=2000) == result


def test_predictions_round_trip(tmp_path):
    from clorae_ds.eval.generate import read_predictions, write_predictions

    rows = prediction_rows({"twitter2015": [True, False]})
    write_predictions(str(tmp_path / "p.jsonl"), rows, step=7)
    back = read_predictions(str(tmp_path / "p.jsonl"))
    assert [r["predicted"] for r in back] == [r["predicted"] for r in rows] and {r["step"] for r in back} == {7}
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a prediction row"):
        read_predictions(str(tmp_path / "bad.jsonl"))
