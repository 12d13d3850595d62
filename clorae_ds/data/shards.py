"""Records → WebDataset tar shards `{dataset}-{split}-%06d.tar` + `{dataset}-{split}.index.json`.

Each sample is `<key>.json` (the record) plus `<key>.jpg|.png` (its image bytes, when an image directory is
given and holds the file) and `<key>.npy` (precomputed visual features, when given). Keys are the sample's
position (`%09d`): record ids may contain dots, which WebDataset reads as extension separators.
Output is deterministic (fixed tar metadata, input order) and atomic: shards are written into a temporary
directory and moved into place only when the whole set is complete; the index is written last.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .record import Record

INDEX_VERSION = 1


@dataclass
class ShardWriterConfig:
    samples_per_shard: int = 1000
    images: Optional[str] = None  # directory holding the datasets' image files by name
    require_images: bool = False  # drop samples whose image is missing (default: keep them text-only)
    features: Optional[str] = None  # directory of <image stem>.npy feature files
    progress: bool = True


@dataclass
class BuildStats:
    samples: int = 0
    images_found: int = 0
    images_missing: int = 0
    dropped_without_image: int = 0
    features_found: int = 0
    skipped_records: list = field(default_factory=list)


def label_set(records: Iterable[Record]) -> list[str]:
    labels = set()
    for r in records:
        labels.update(f"entity:{e.type}" for e in r.entities)
        if r.relation is not None and r.relation.label is not None:
            labels.add(f"relation:{r.relation.label}")
        for event in r.events:
            labels.add(f"event:{event.type}")
            labels.update(f"role:{a.role}" for a in event.arguments)
    return sorted(labels)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(payload), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(payload))


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_shards(records: list[Record], out_dir: str, dataset: str, split: str, sources: list[str],
                 config: ShardWriterConfig, stats: Optional[BuildStats] = None) -> dict:
    """Write the shard set and its index; returns the index. `sources` are the raw files (checksummed)."""
    stats = stats or BuildStats()
    if config.samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"output directory {out_dir!r} is not writable")
    prefix = f"{dataset}-{split}"
    tmp = tempfile.mkdtemp(prefix=f".{prefix}-", dir=out_dir)
    try:
        shards, tar, shard_samples = [], None, 0
        for position, record in enumerate(records):
            image_bytes = image_ext = feature_bytes = None
            if record.image and config.images:
                image_bytes = _read(os.path.join(config.images, record.image))
                if image_bytes is None:
                    stats.images_missing += 1
                else:
                    stats.images_found += 1
                    image_ext = os.path.splitext(record.image)[1].lower().lstrip(".") or "jpg"
            if config.require_images and image_bytes is None:
                stats.dropped_without_image += 1
                continue
            if record.image and config.features:
                feature_bytes = _read(os.path.join(config.features, os.path.splitext(record.image)[0] + ".npy"))
                stats.features_found += feature_bytes is not None
            if tar is None or shard_samples == config.samples_per_shard:
                if tar is not None:
                    tar.close()
                name = f"{prefix}-{len(shards):06d}.tar"
                shards.append({"name": name, "samples": 0})
                tar = tarfile.open(os.path.join(tmp, name), "w", format=tarfile.USTAR_FORMAT)
                shard_samples = 0
            key = f"{position:09d}"
            _add(tar, f"{key}.json", json.dumps(record.to_dict(), sort_keys=True, ensure_ascii=False).encode())
            if image_bytes is not None:
                _add(tar, f"{key}.{image_ext}", image_bytes)
            if feature_bytes is not None:
                _add(tar, f"{key}.npy", feature_bytes)
            shard_samples += 1
            shards[-1]["samples"] += 1
            stats.samples += 1
            if config.progress and stats.samples % 500 == 0:
                print(f"\r{prefix}: {stats.samples}/{len(records)} samples, {len(shards)} shards", end="",
                      file=sys.stderr, flush=True)
        if tar is not None:
            tar.close()
        if config.progress:
            print(f"\r{prefix}: {stats.samples}/{len(records)} samples, {len(shards)} shards", file=sys.stderr)
        for shard in shards:
            shard["sha256"] = sha256_file(os.path.join(tmp, shard["name"]))
        index = {
            "format_version": INDEX_VERSION, "dataset": dataset, "split": split, "samples": stats.samples,
            "shards": shards, "labels": label_set(records),
            "sources": [{"file": os.path.basename(s), "sha256": sha256_file(s)} for s in sources],
            "images": {"found": stats.images_found, "missing": stats.images_missing,
                       "dropped_without_image": stats.dropped_without_image},
            "features_found": stats.features_found, "skipped_records": len(stats.skipped_records),
        }
        # The complete set replaces any earlier one: old shards go first, the index comes last.
        for old in os.listdir(out_dir):
            if old.startswith(prefix + "-") and old.endswith(".tar"):
                os.remove(os.path.join(out_dir, old))
        for shard in shards:
            os.replace(os.path.join(tmp, shard["name"]), os.path.join(out_dir, shard["name"]))
        index_tmp = os.path.join(tmp, "index.json")
        with open(index_tmp, "w") as f:
            json.dump(index, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(index_tmp, os.path.join(out_dir, f"{prefix}.index.json"))
        return index
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def subsample(records: list, n, seed: int) -> list:
    """A seeded random subset of n records, in file order (all of them when n is None or not smaller)."""
    if n is None or n >= len(records):
        return records
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), n))]
