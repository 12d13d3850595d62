"""Convert one raw split file, or your own data as JSON lines, into WebDataset shards.

    python launchers/build_shards.py --dataset twitter2015 --input ../shared/data/raw/twitter2015/train.txt \
        --split train --out shards/ [--images DIR [--require-images]] [--features DIR] [--on-error skip]
    python launchers/build_shards.py --format jsonl --dataset my_ner --task mner --input train.jsonl \
        --split train --out shards/          # docs/data.md; then --split dev with the same --out

Your own data's label schema is --schema FILE, else the one an earlier split wrote to OUT/{dataset}.schema.json,
else the labels of this file (written there for the next split).

Writes {dataset}-{split}-%06d.tar and {dataset}-{split}.index.json (sample count, shards with checksums,
label set, source checksums), prints a progress line and ends with a one-line JSON summary. Bad input:
--on-error fail (default) stops with file:line and the reason, writing nothing; skip drops and counts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from clorae_ds.data import DATASETS, RecordError, load_jsonl, load_raw  # noqa: E402
from clorae_ds.data.shards import BuildStats, ShardWriterConfig, subsample, write_shards  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True,
                        help=f"one of {', '.join(DATASETS)}; with --format jsonl, any name of lower-case letters, "
                             "digits and '_'")
    parser.add_argument("--format", choices=["raw", "jsonl"], default="raw",
                        help="raw: the dataset's file as distributed; jsonl: the unified record, one per line")
    parser.add_argument("--task", choices=["mner", "mre", "mee"], default=None,
                        help="jsonl: the task of lines that name none")
    parser.add_argument("--schema", default=None,
                        help="jsonl: a JSON file {entity_types, relation_labels, event_roles} fixing the labels")
    parser.add_argument("--input", required=True, help="the split file")
    parser.add_argument("--split", required=True, help="split name used in the shard names (train, dev, test)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar (default 1000)")
    parser.add_argument("--sample", type=int, default=None,
                        help="keep a seeded random subset of N samples, in file order (sample shards)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--images", default=None, help="directory of the dataset's image files")
    parser.add_argument("--require-images", action="store_true", help="drop samples whose image is missing")
    parser.add_argument("--features", default=None, help="directory of <image stem>.npy visual features")
    parser.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                        help="a bad sample: stop naming file:line (fail), or drop and count it (skip)")
    parser.add_argument("--quiet", action="store_true", help="no progress line, only the JSON summary")
    args = parser.parse_args(argv)
    if args.require_images and not args.images:
        parser.error("--require-images needs --images DIR")
    if args.format == "raw" and args.dataset not in DATASETS:
        parser.error(f"--dataset {args.dataset!r} is not a built-in dataset ({', '.join(DATASETS)}): "
                     "for your own data give --format jsonl")
    if args.format == "raw" and (args.task or args.schema):
        parser.error("--task and --schema are for --format jsonl")

    stats = BuildStats()
    try:
        if args.format == "jsonl":
            records = load_own_data(args, stats)
        else:
            records = load_raw(args.dataset, args.input, on_error=args.on_error, skipped=stats.skipped_records)
    except (RecordError, FileNotFoundError, ValueError) as err:
        print(f"build_shards: {err}", file=sys.stderr)
        return 2
    records = subsample(records, args.sample, args.seed)
    for reason in stats.skipped_records[:20]:
        print(f"skipped: {reason}", file=sys.stderr)
    config = ShardWriterConfig(samples_per_shard=args.samples_per_shard, images=args.images,
                               require_images=args.require_images, features=args.features, progress=not args.quiet)
    index = write_shards(records, args.out, args.dataset, args.split, [args.input], config, stats)
    print(json.dumps({"dataset": args.dataset, "split": args.split, "samples": index["samples"],
                      "shards": len(index["shards"]), "skipped_records": len(stats.skipped_records),
                      "images": index["images"], "labels": len(index["labels"]),
                      "index": os.path.join(args.out, f"{args.dataset}-{args.split}.index.json")}))
    return 0


def load_own_data(args, stats: BuildStats) -> list:
    """JSON-lines records with one schema for every split of the dataset (kept in OUT/{dataset}.schema.json)."""
    kept = os.path.join(args.out, f"{args.dataset}.schema.json")
    path = args.schema or (kept if os.path.isfile(kept) else None)
    schema = None
    if path:
        try:
            with open(path) as f:
                schema = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--schema {path}: {err}") from None
        if not isinstance(schema, dict) or set(schema) - {"entity_types", "relation_labels", "event_roles"}:
            raise ValueError(f"{path}: expected an object with entity_types, relation_labels and/or event_roles")
    records = load_jsonl(args.dataset, args.input, args.task, schema, args.on_error, stats.skipped_records)
    if records:
        os.makedirs(args.out, exist_ok=True)
        with open(kept, "w") as f:
            json.dump(records[0].extra["schema"], f, indent=1)
    return records


if __name__ == "__main__":
    sys.exit(main())
