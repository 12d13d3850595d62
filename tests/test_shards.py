"""launchers/build_shards.py: raw split → WebDataset tars + index, read back with webdataset itself."""
import json
import os
import sys


from clorae_ds.data import Record, load_raw

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launchers"))
import build_shards  # noqa: E402

from .test_data_records import RAW, needs_raw, write  # noqa: E402

TWEETS = "".join(f"IMGID:{i}\nKyrie\tB-PER\nIrving\tI-PER\nplays\tO\nin\tO\nBoston\tB-LOC\n\n" for i in range(7))


def read_back(out_dir, prefix):
    import webdataset as wds

    index = json.load(open(os.path.join(out_dir, f"{prefix}.index.json")))
    urls = [os.path.join(out_dir, s["name"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    return index, samples


def test_build_then_read_back_equals_the_records(tmp_path, capsys):
    source = write(tmp_path, "t.txt", TWEETS)
    out = str(tmp_path / "shards")
    assert build_shards.main(["--dataset", "twitter2017", "--input", source, "--split", "train", "--out", out,
                              "--samples-per-shard", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 7 and summary["shards"] == 3
    index, samples = read_back(out, "twitter2017-train")
    assert [s["samples"] for s in index["shards"]] == [3, 3, 1]
    assert index["labels"] == ["entity:LOC", "entity:PER"] and index["sources"][0]["file"] == "t.txt"
    assert [Record.from_dict(json.loads(s["json"])) for s in samples] == load_raw("twitter2017", source)
    assert sorted(os.listdir(out)) == ["twitter2017-train-000000.tar", "twitter2017-train-000001.tar",
                                       "twitter2017-train-000002.tar", "twitter2017-train.index.json"]


def test_builds_are_byte_identical(tmp_path):
    source = write(tmp_path, "t.txt", TWEETS)
    digests = []
    for name in ("a", "b"):
        build_shards.main(["--dataset", "twitter2015", "--input", source, "--split", "dev", "--out",
                           str(tmp_path / name), "--quiet"])
        digests.append(json.load(open(tmp_path / name / "twitter2015-dev.index.json"))["shards"])
    assert digests[0] == digests[1]


def test_images_are_carried_missing_ones_counted_or_dropped(tmp_path):
    source = write(tmp_path, "t.txt", TWEETS)
    images = tmp_path / "images"
    images.mkdir()
    for i in (0, 2, 4):
        (images / f"{i}.jpg").write_bytes(bytes([0xFF, 0xD8, i, 0xFF, 0xD9]))
    out = str(tmp_path / "kept")
    build_shards.main(["--dataset", "twitter2015", "--input", source, "--split", "train", "--out", out,
                       "--images", str(images), "--quiet"])
    index, samples = read_back(out, "twitter2015-train")
    assert index["images"] == {"found": 3, "missing": 4, "dropped_without_image": 0}
    assert [s["jpg"][2] for s in samples if "jpg" in s] == [0, 2, 4] and len(samples) == 7
    out = str(tmp_path / "required")
    build_shards.main(["--dataset", "twitter2015", "--input", source, "--split", "train", "--out", out,
                       "--images", str(images), "--require-images", "--quiet"])
    index, samples = read_back(out, "twitter2015-train")
    assert index["samples"] == 3 and index["images"]["dropped_without_image"] == 4


def test_bad_input_fails_with_file_line_and_writes_nothing(tmp_path, capsys):
    source = write(tmp_path, "t.txt", TWEETS + "IMGID:99\nbroken line\n\n")
    out = tmp_path / "out"
    assert build_shards.main(["--dataset", "twitter2015", "--input", source, "--split", "train",
                              "--out", str(out)]) == 2
    assert "t.txt:51: expected 'token<TAB>tag'" in capsys.readouterr().err
    assert not out.exists() or not os.listdir(out)
    assert build_shards.main(["--dataset", "twitter2015", "--input", source, "--split", "train", "--out", str(out),
                              "--on-error", "skip", "--quiet"]) == 0
    index = json.load(open(out / "twitter2015-train.index.json"))
    assert index["samples"] == 7 and index["skipped_records"] == 1


def test_rebuild_replaces_the_previous_set(tmp_path):
    out = str(tmp_path / "out")
    big = write(tmp_path, "big.txt", TWEETS)
    small = write(tmp_path, "small.txt", TWEETS.split("\n\n")[0] + "\n\n")
    build_shards.main(["--dataset", "snap", "--input", big, "--split", "x", "--out", out, "--samples-per-shard", "2",
                       "--quiet"])
    build_shards.main(["--dataset", "snap", "--input", small, "--split", "x", "--out", out, "--quiet"])
    assert sorted(os.listdir(out)) == ["snap-x-000000.tar", "snap-x.index.json"]


@needs_raw
def test_real_split_builds(tmp_path):
    out = str(tmp_path / "out")
    assert build_shards.main(["--dataset", "m2e2", "--input", os.path.join(RAW, "m2e2/text_event_dev.json"),
                              "--split", "dev", "--out", out, "--quiet"]) == 0
    index, samples = read_back(out, "m2e2-dev")
    assert index["samples"] == len(samples) == 440
    assert "event:Conflict:Attack" in index["labels"] and "role:Attacker" in index["labels"]
