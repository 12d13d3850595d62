"""The streaming loader on real webdataset tars: rank/worker splits, equal batch counts, exact evaluation,
mixing, images and features, bad data, determinism; and a real 2-rank run."""
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from clorae_ds.data import Entity, Record, Relation, Span
from clorae_ds.data.loader import DataConfig, Encoding, LoaderError, bucket_order
from clorae_ds.data.shards import ShardWriterConfig, write_shards
from clorae_ds.models import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tweets(n, dataset="twitter2015"):
    return [Record(f"{dataset}-{i}", dataset, "mner", "entity", ("Kyrie", "Irving", "scored", str(i)),
                   entities=(Entity("PER", 0, 2),), image=f"{i}.png") for i in range(n)]


def relations(n):
    return [Record(f"mnre_v1-{i}", "mnre_v1", "mre", "relation", ("Obama", "met", "Merkel", str(i)),
                   relation=Relation("/per/per/peer", Span(0, 1), Span(2, 3))) for i in range(n)]


def shards(tmp_path, records, dataset, split, per_shard=4, **options):
    out = str(tmp_path / "shards")
    index = write_shards(records, out, dataset, split, [], ShardWriterConfig(samples_per_shard=per_shard,
                                                                               progress=False, **options))
    return f"{out}/{dataset}-{split}-{{000000..{len(index['shards']) - 1:06d}}}.tar"


@pytest.fixture
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def config(tmp_path, train_sizes=(10, 6), dev_size=11, **options):
    train = {"twitter2015": shards(tmp_path, tweets(train_sizes[0]), "twitter2015", "train"),
             "mnre_v1": shards(tmp_path, relations(train_sizes[1]), "mnre_v1", "train")}
    dev = {"twitter2015": shards(tmp_path, tweets(dev_size), "twitter2015", "dev", per_shard=3)}
    return DataConfig(train=train, dev=dev, micro_batch_size=3, num_workers=2, **options)


@pytest.mark.slow
def test_two_ranks_two_workers_equal_train_batches_and_exact_eval(tmp_path, tokenizer):
    cfg = config(tmp_path)
    seen, counts = [], []
    for rank in range(2):
        loader = cfg.build(tokenizer, Encoding(), rank=rank, world_size=2, eval_batch_size=2)
        assert loader.batches_per_epoch == 3  # ceil(16 samples / (2 ranks x 3))
        train = list(loader.train_epoch(0))
        counts.append(len(train))
        for batch in train:
            assert batch["input_ids"].shape[0] == 3 and batch["labels"].shape[0] == 3
            assert set(batch["task_ids"].tolist()) <= {0, 1}
        evaluated = list(loader.eval_batches("twitter2015"))
        assert len(evaluated) == 3  # ceil(ceil(11 / 2) / 2) on every rank, padding where needed
        for batch in evaluated:
            seen += [r.id for r, valid in zip(batch["records"], batch["valid"].tolist()) if valid]
    assert counts == [3, 3]
    assert sorted(seen) == sorted(f"twitter2015-{i}" for i in range(11))  # every dev sample exactly once


def test_more_ranks_than_samples_pads_instead_of_hanging(tmp_path, tokenizer):
    cfg = config(tmp_path, dev_size=2)
    per_rank = []
    for rank in range(4):
        batches = list(cfg.build(tokenizer, Encoding(), rank=rank, world_size=4, eval_batch_size=2)
                       .eval_batches("twitter2015"))
        per_rank.append((len(batches), sum(int(b["valid"].sum()) for b in batches)))
    assert per_rank == [(1, 1), (1, 1), (1, 0), (1, 0)]


def test_training_is_deterministic_and_mixes_by_ratio(tmp_path, tokenizer):
    cfg = config(tmp_path, batches_per_epoch=40)
    loader = cfg.build(tokenizer, Encoding())
    first = [batch["ids"] for batch in loader.train_epoch(0)]
    assert first == [batch["ids"] for batch in loader.train_epoch(0)]
    assert first != [batch["ids"] for batch in loader.train_epoch(1)]  # a new epoch reshuffles
    assert [b["ids"] for b in loader.train_epoch(0, skip_batches=5)] == first[5:]  # resume inside an epoch
    datasets = Counter(i.split("-")[0] for ids in first for i in ids)
    assert 0.45 < datasets["twitter2015"] / 120 < 0.80  # proportional to size: 10 / 16 = 0.625
    only_relations = DataConfig(**{**cfg.__dict__, "mix": {"mnre_v1": 1.0}}).build(tokenizer, Encoding())
    assert all(i.startswith("mnre_v1") for b in only_relations.train_epoch(0) for i in b["ids"])


def varied_tweets(n):
    return [Record(f"twitter2015-{i}", "twitter2015", "mner", "entity",
                   ("Kyrie", "Irving") + tuple(f"w{j}" for j in range(i % 13)), entities=(Entity("PER", 0, 2),))
            for i in range(n)]


def test_length_grouping_cuts_padding_keeps_samples_mix_and_resume(tmp_path, tokenizer):
    train = {"twitter2015": shards(tmp_path, varied_tweets(40), "twitter2015", "train"),
             "mnre_v1": shards(tmp_path, relations(20), "mnre_v1", "train")}
    plain = DataConfig(train=train, micro_batch_size=4, num_workers=2, batches_per_epoch=30, length_group=1)
    grouped = DataConfig(**{**plain.__dict__, "length_group": 6, "length_weight": 1.0})

    def padding(batches):
        masks = [b["attention_mask"] for b in batches]
        return sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)

    loader, grouped_loader = plain.build(tokenizer, Encoding()), grouped.build(tokenizer, Encoding())
    before, after = list(loader.train_epoch(0)), list(grouped_loader.train_epoch(0))
    assert len(before) == len(after) == 30 and all(len(b["ids"]) == 4 for b in after)
    assert all(b["tokens"] == int(b["attention_mask"].sum() + (b["labels"] >= 0).sum()) for b in before + after)
    assert padding(after) < 0.5 * padding(before)
    # the same draws from the mix, only regrouped: every worker's pool of 6 batches holds the same samples
    assert Counter(i for b in before for i in b["ids"]) == Counter(i for b in after for i in b["ids"])
    first = [b["ids"] for b in after]
    assert first == [b["ids"] for b in grouped_loader.train_epoch(0)]
    assert [b["ids"] for b in grouped_loader.train_epoch(0, skip_batches=7)] == first[7:]


def test_bucket_order_keeps_the_mix_at_weight_0_and_sorts_by_length_at_1():
    # dataset 0 is long, dataset 1 short: by length alone the two never share a batch of 4
    items = [{"dataset_id": i % 2, "input_ids": [0] * (40 + i if i % 2 == 0 else 10 + i), "labels": [0]}
             for i in range(16)]
    batches = lambda order: [[item["dataset_id"] for item in order[b * 4:(b + 1) * 4]] for b in range(4)]
    by_length = bucket_order(items, 1.0)
    assert [len(i["input_ids"]) for i in by_length] == sorted(len(i["input_ids"]) for i in items)
    assert [sorted(set(b)) for b in batches(by_length)] == [[1], [1], [0], [0]]
    keeping = bucket_order(items, 0.0)
    assert all(sorted(b) == [0, 0, 1, 1] for b in batches(keeping))  # every batch keeps the 1:1 mix ...
    for dataset in (0, 1):  # ... and takes each dataset's samples in length order
        lengths = [len(i["input_ids"]) for i in keeping if i["dataset_id"] == dataset]
        assert lengths == sorted(lengths)
    assert sorted(map(id, keeping)) == sorted(map(id, items))  # a reordering, nothing lost


def test_labels_inputs_and_causal_encoding(tmp_path, tokenizer):
    loader = config(tmp_path).build(tokenizer, Encoding())
    batch = next(iter(loader.eval_batches("twitter2015")))
    target = batch["labels"][0][batch["labels"][0] >= 0]
    assert tokenizer.decode(target, skip_special_tokens=True) == "person : Kyrie Irving"
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).startswith("Give the text: Kyrie Irving")
    causal = config(tmp_path).build(tokenizer, Encoding(causal=True))
    batch = next(iter(causal.train_epoch(0)))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels[labels >= 0]
        assert torch.equal(ids[(labels >= 0).nonzero().flatten()], kept)  # loss only on the target tokens
    evaluation = next(iter(causal.eval_batches("twitter2015")))
    assert (evaluation["attention_mask"][:, -1] == 1).all()  # left-padded prompts for generation


def png(seed):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_images_and_features_become_tensors(tmp_path, tokenizer):
    images, features = tmp_path / "images", tmp_path / "features"
    images.mkdir(), features.mkdir()
    for i in (0, 2):
        (images / f"{i}.png").write_bytes(png(i))
        np.save(features / f"{i}.npy", np.random.rand(3, 7 + 5).astype(np.float32))
    pattern = shards(tmp_path, tweets(4), "twitter2015", "dev", images=str(images), features=str(features))
    loader = DataConfig(dev={"twitter2015": pattern}, num_workers=0).build(tokenizer, Encoding(image_size=16),
                                                                             eval_batch_size=4)
    batch = next(iter(loader.eval_batches("twitter2015")))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["image_present"].tolist() == [True, False, True, False]
    assert batch["pixel_values"][1].abs().sum() == 0
    assert batch["visual_features"].shape == (4, 3, 7) and batch["visual_boxes"].shape == (4, 3, 5)
    assert batch["visual_mask"].tolist() == [[True] * 3, [False] * 3, [True] * 3, [False] * 3]


def test_bad_data_is_skipped_counted_and_named(tmp_path, tokenizer, caplog):
    pattern = shards(tmp_path, tweets(6), "twitter2015", "dev", per_shard=3)
    first = pattern.split("{")[0] + "000000.tar"
    with tarfile.open(first, "a") as tar:  # append a bad JSON and an undecodable image
        for name, payload in (("000000099.json", b"{not json"), ("000000098.json",
                              json.dumps(tweets(1)[0].to_dict()).encode()), ("000000098.png", b"not an image")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    second = pattern.split("{")[0] + "000001.tar"
    with open(second, "r+b") as f:  # truncate the second shard mid-member
        f.truncate(700)
    loader = DataConfig(dev={"twitter2015": pattern}, num_workers=0).build(tokenizer, Encoding(), eval_batch_size=2)
    batches = list(loader.eval_batches("twitter2015"))
    skipped = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    valid = [r.id for b in batches for r, v in zip(b["records"], b["valid"].tolist()) if v]
    assert valid[:3] == ["twitter2015-0", "twitter2015-1", "twitter2015-2"] and len(batches) == 3
    assert skipped["corrupt_shard"] == 1, skipped
    text = caplog.text
    assert "twitter2015-dev-000001.tar" in text  # the warning names the corrupt shard
    train = DataConfig(train={"twitter2015": pattern}, micro_batch_size=2, num_workers=0,
                       batches_per_epoch=6).build(tokenizer, Encoding())
    reasons = Counter()
    for batch in train.train_epoch(0):
        reasons.update(batch["skipped"])
    assert reasons["bad_json"] >= 1 and reasons["bad_image"] >= 1
    assert "000000099" in caplog.text and "undecodable image" in caplog.text


def test_configuration_errors(tmp_path, tokenizer):
    with pytest.raises(LoaderError, match="missing"):
        DataConfig(train={"twitter2015": str(tmp_path / "x-{000000..000001}.tar")}).build(tokenizer, Encoding())
    pattern = shards(tmp_path, tweets(3), "twitter2015", "train")
    with pytest.raises(LoaderError, match="mix names datasets without train shards"):
        DataConfig(train={"twitter2015": pattern}, mix={"snap": 1}).build(tokenizer, Encoding())
    with pytest.raises(LoaderError, match="no dev shards configured"):
        DataConfig(train={"twitter2015": pattern}).build(tokenizer, Encoding()).eval_batches("twitter2015")
    os.remove(os.path.join(os.path.dirname(pattern), "twitter2015-train.index.json"))
    with pytest.raises(LoaderError, match="no shard index"):
        DataConfig(train={"twitter2015": pattern}).build(tokenizer, Encoding())


@pytest.mark.slow
def test_real_two_rank_run_sees_every_dev_sample_once(tmp_path, tokenizer_dir):
    cfg = config(tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"train": cfg.train, "dev": cfg.dev, "tokenizer": tokenizer_dir}))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(spec), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "result.json"))
    assert result["train_batches"] == [3, 3]
    assert sorted(result["dev_ids"]) == sorted(f"twitter2015-{i}" for i in range(11))


WORKER = """
import json, sys
from datetime import timedelta
import torch.distributed as dist
from clorae_ds.data.loader import DataConfig, Encoding
from clorae_ds.models import load_tokenizer



def main():  # under the guard: each loader worker runs this script again as __mp_main__
    spec, out = json.load(open(sys.argv[1])), sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = DataConfig(train=spec["train"], dev=spec["dev"], micro_batch_size=3, num_workers=2).build(
        load_tokenizer(spec["tokenizer"]), Encoding(), rank, world, eval_batch_size=2)
    train_batches = sum(1 for _ in loader.train_epoch(0))
    ids = [r.id for b in loader.eval_batches("twitter2015") for r, v in zip(b["records"], b["valid"].tolist()) if v]
    gathered, counts = [None] * world, [None] * world
    dist.all_gather_object(gathered, ids)
    dist.all_gather_object(counts, train_batches)
    if rank == 0:
        json.dump({"train_batches": counts, "dev_ids": [i for part in gathered for i in part]},
                  open(out + "/result.json", "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
"""
