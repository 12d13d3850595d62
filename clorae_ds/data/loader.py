"""The streaming, rank-aware loader: WebDataset shards → tokenised, collated mixed-task batches.

Training: per dataset, an endless stream of resampled shards (seeded by rank, worker, epoch), a seeded shuffle
buffer, mixed across datasets by ratios (default: proportional to size), bucketed by length while keeping the
mix (DataConfig.length_group, length_weight). Every rank yields exactly
`batches_per_epoch` batches per epoch, so collectives in the training step never wait on a rank that ran dry.
Evaluation: exact. Sample p of a dataset goes to rank p % world; each rank's samples form batches in order,
and batch b is read by worker b % num_workers. Every rank yields the same number of batches: the ones past
its own samples are padding (flagged in `valid`), so a ZeRO-3 generate on every rank never hangs.

Bad data never crashes a worker: a corrupt tar, bad JSON, an invalid record or an undecodable image or
feature file is skipped with a warning naming the shard and key, and counted in the next batch's `skipped`.
"""
from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .record import TASKS, Record, RecordError
from .render import render

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


class LoaderError(ValueError):
    pass


class SampleError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Encoding:
    """How samples become model inputs (depends on the backbone, not on the data)."""

    max_input_length: int = 256
    max_target_length: int = 64
    causal: bool = False  # decoder-only (LLaVA): prompt + target in one sequence, loss on the target only
    drop_target_bos: bool = False  # BERT-style decoders: labels start after [CLS] (the decoder start token)
    image_size: int = 224
    image_tokens: int = 0  # causal models: image placeholder tokens per image
    image_token: str = "<image>"


class SampleEncoder:
    """Picklable: runs in the DataLoader workers."""

    def __init__(self, tokenizer, encoding: Encoding, tasks: list[str], datasets: list[str]):
        self.tokenizer, self.encoding, self.tasks, self.datasets = tokenizer, encoding, tasks, datasets

    def decode(self, sample: dict) -> tuple[Record, Optional[torch.Tensor], Optional[np.ndarray]]:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        if "json" not in sample:
            raise SampleError("missing_json", f"{where}: sample has no .json member")
        try:
            record = Record.from_dict(json.loads(sample["json"]))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SampleError("bad_json", f"{where}: bad JSON ({err})") from None
        except RecordError as err:
            raise SampleError("invalid_record", f"{where}: {err}") from None
        if record.task not in self.tasks or record.dataset not in self.datasets:
            raise SampleError("unknown_task", f"{where}: task {record.task!r} / dataset {record.dataset!r} "
                                              "is not in this run's configuration")
        image = features = None
        image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
        if image_key is not None:
            try:
                from PIL import Image

                with Image.open(io.BytesIO(sample[image_key])) as img:
                    size = self.encoding.image_size
                    array = np.asarray(img.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
                image = (torch.from_numpy(array).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) \
                    / torch.tensor(CLIP_STD)[:, None, None]
            except Exception as err:  # PIL raises many types for bad bytes
                raise SampleError("bad_image", f"{where}: undecodable image ({type(err).__name__}: {err})") from None
        if "npy" in sample:
            try:
                features = np.load(io.BytesIO(sample["npy"]), allow_pickle=False).astype(np.float32)
                if features.ndim != 2 or features.shape[1] <= 5:
                    raise ValueError(f"expected (tokens, feature_dim + 5), got {features.shape}")
            except Exception as err:
                raise SampleError("bad_features", f"{where}: bad .npy features ({err})") from None
        return record, image, features

    def encode(self, record: Record, image, features) -> dict:
        source, target = render(record)
        tok, enc = self.tokenizer, self.encoding
        item = {"id": record.id, "task_id": self.tasks.index(record.task),
                "dataset_id": self.datasets.index(record.dataset), "image": image, "features": features}
        target_ids = tok(target, truncation=True, max_length=enc.max_target_length)["input_ids"]
        if enc.drop_target_bos and target_ids and target_ids[0] == tok.cls_token_id:
            target_ids = target_ids[1:]
        if enc.causal:
            prompt = source + " Answer:"
            if image is not None:
                prompt = enc.image_token * enc.image_tokens + " " + prompt
            prompt_ids = tok(prompt, truncation=True, max_length=enc.max_input_length)["input_ids"]
            if prompt_ids and prompt_ids[-1] == tok.eos_token_id:
                prompt_ids = prompt_ids[:-1]
            item["input_ids"] = prompt_ids + target_ids
            item["labels"] = [-100] * len(prompt_ids) + target_ids
            item["prompt_ids"] = prompt_ids
        else:
            item["input_ids"] = tok(source, truncation=True, max_length=enc.max_input_length)["input_ids"]
            item["labels"] = target_ids
        return item

    def collate(self, items: list[dict], records: Optional[list[Record]] = None, valid=None) -> dict:
        pad = self.tokenizer.pad_token_id
        key = "prompt_ids" if records is not None and self.encoding.causal else "input_ids"
        inputs = [item[key] for item in items]
        width = max(len(ids) for ids in inputs)
        left = records is not None and self.encoding.causal  # decoder-only generation continues the prompt
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, ids in enumerate(inputs):
            where = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[i, where] = torch.tensor(ids)
            attention_mask[i, where] = 1
        label_width = max(len(item["labels"]) for item in items)
        labels = torch.full((len(items), label_width), -100, dtype=torch.long)
        for i, item in enumerate(items):
            labels[i, :len(item["labels"])] = torch.tensor(item["labels"], dtype=torch.long)
        targets = labels >= 0
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "task_ids": torch.tensor([it["task_id"] for it in items]),
                 "dataset_ids": torch.tensor([it["dataset_id"] for it in items]),
                 "ids": [it["id"] for it in items],
                 # counted here so that a training step reads no tensor on the host: real input + target tokens,
                 # and the target tokens the loss averages over (a decoder-only model predicts from position 1)
                 "tokens": int(attention_mask.sum()) + int(targets.sum()),
                 "target_tokens": int((targets[:, 1:] if self.encoding.causal else targets).sum())}
        images = [it["image"] for it in items]
        if any(image is not None for image in images):
            if self.encoding.causal:
                batch["pixel_values"] = torch.stack([image for image in images if image is not None])
            else:
                size = self.encoding.image_size
                batch["pixel_values"] = torch.stack([image if image is not None else torch.zeros(3, size, size)
                                                     for image in images])
                batch["image_present"] = torch.tensor([image is not None for image in images])
        features = [it["features"] for it in items]
        if any(f is not None for f in features):
            tokens = max(f.shape[0] for f in features if f is not None)
            dim = next(f.shape[1] for f in features if f is not None)
            packed = torch.zeros(len(items), tokens, dim)
            mask = torch.zeros(len(items), tokens, dtype=torch.bool)
            for i, f in enumerate(features):
                if f is not None:
                    if f.shape[1] != dim:
                        raise LoaderError(f"{items[i]['id']}: feature width {f.shape[1]} differs from {dim}")
                    packed[i, :f.shape[0]] = torch.from_numpy(f)
                    mask[i, :f.shape[0]] = True
            batch.update(visual_features=packed[..., :-5], visual_boxes=packed[..., -5:], visual_mask=mask)
        if records is not None:
            batch["records"] = records
            batch["valid"] = torch.tensor(valid if valid is not None else [True] * len(items))
        return batch


class _SkipCounter:
    """Counts and logs skipped samples inside a worker; the counts ride on the next batch."""

    def __init__(self):
        self.counts = Counter()
        self.failed_shards: set[str] = set()

    def tar_handler(self, err: Exception) -> bool:
        # webdataset reports one truncated shard twice: from the member read ("... @ <stream>") and again from
        # the shard's iteration (the stream and url appended to the arguments). Each shard counts once a pass.
        args = getattr(err, "args", ())
        shard = str(args[-2]) if len(args) >= 3 else str(args[0] if args else err).rpartition(" @ ")[2]
        if shard not in self.failed_shards:
            self.failed_shards.add(shard)
            self.counts["corrupt_shard"] += 1
        log.warning("skipping unreadable shard data: %s", err)
        return True

    def sample(self, err: SampleError) -> None:
        self.counts[err.reason] += 1
        log.warning("skipping sample: %s", err)

    def take(self) -> dict:
        counts, self.counts = dict(self.counts), Counter()
        return counts


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _TrainStream(IterableDataset):
    def __init__(self, urls: dict[str, list[str]], weights: dict[str, float], encoder: SampleEncoder,
                 batch_size: int, batches: int, shuffle_buffer: int, seed: int, rank: int, epoch: int,
                 length_group: int, length_weight: float):
        super().__init__()
        self.urls, self.weights, self.encoder = urls, weights, encoder
        self.batch_size, self.batches, self.shuffle_buffer = batch_size, batches, shuffle_buffer
        self.seed, self.rank, self.epoch = seed, rank, epoch
        self.length_group, self.length_weight = length_group, length_weight

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        quota = self.batches // workers + (1 if worker < self.batches % workers else 0)
        base = f"{self.seed}/{self.epoch}/{self.rank}/{worker}"
        skips = _SkipCounter()
        streams = {}
        for name, urls in self.urls.items():
            shard_seed = random.Random(f"{base}/{name}/shards").getrandbits(32)
            streams[name] = iter(wds.DataPipeline(
                wds.ResampledShards(urls, seed=shard_seed, worker_seed=lambda: 0, deterministic=True),
                wds.tarfile_to_samples(handler=skips.tar_handler),
                wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer),
                            rng=random.Random(f"{base}/{name}/shuffle"))))
        names = list(streams)
        weights = [self.weights[n] for n in names]
        mixer = random.Random(f"{base}/mix")
        batch_order = random.Random(f"{base}/batch_order")
        produced = 0
        while produced < quota:
            batches = min(self.length_group, quota - produced)
            items = []
            while len(items) < batches * self.batch_size:
                sample = next(streams[mixer.choices(names, weights)[0]])
                try:
                    items.append(self.encoder.encode(*self.encoder.decode(sample)))
                except SampleError as err:
                    skips.sample(err)
            if batches > 1:
                items = bucket_order(items, self.length_weight)
            groups = [items[i * self.batch_size:(i + 1) * self.batch_size] for i in range(batches)]
            batch_order.shuffle(groups)
            for group in groups:
                batch = self.encoder.collate(group)
                batch["skipped"] = skips.take()
                yield batch
            produced += batches


def bucket_order(items: list[dict], length_weight: float) -> list[dict]:
    """Samples ordered for cutting into micro-batches of similar lengths (DataConfig.length_weight): by
    length_weight × the sample's length rank among all + (1 − length_weight) × its rank within its dataset, ranks
    in [0, 1), length = input + target tokens, ties kept in draw order."""
    lengths = [len(item["input_ids"]) + len(item["labels"]) for item in items]

    def ranks(indices: list[int]) -> dict[int, float]:
        ordered = sorted(indices, key=lambda i: lengths[i])
        return {i: position / len(ordered) for position, i in enumerate(ordered)}

    overall = ranks(list(range(len(items))))
    within: dict[int, float] = {}
    for dataset in {item["dataset_id"] for item in items}:
        within.update(ranks([i for i, item in enumerate(items) if item["dataset_id"] == dataset]))
    key = [length_weight * overall[i] + (1 - length_weight) * within[i] for i in range(len(items))]
    return [items[i] for i in sorted(range(len(items)), key=lambda i: key[i])]


class _EvalStream(IterableDataset):
    def __init__(self, urls: list[str], samples: int, encoder: SampleEncoder, batch_size: int, rank: int,
                 world_size: int):
        super().__init__()
        self.urls, self.samples, self.encoder = urls, samples, encoder
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def batches_per_rank(self) -> int:
        return max(1, math.ceil(math.ceil(self.samples / self.world_size) / self.batch_size))

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        mine = [b for b in range(self.batches_per_rank()) if b % workers == worker]
        if not mine:
            return
        skips = _SkipCounter()
        pending: dict[int, list] = {b: [] for b in mine}
        filler = None
        stream = wds.DataPipeline(wds.SimpleShardList(self.urls), wds.tarfile_to_samples(handler=skips.tar_handler))
        for sample in stream:
            try:
                position = int(sample["__key__"])
            except (KeyError, ValueError):
                skips.sample(SampleError("bad_key", f"{sample.get('__url__')}: key {sample.get('__key__')!r} "
                                                    "is not a sample position"))
                continue
            local = position // self.world_size
            batch_index = local // self.batch_size
            wanted = position % self.world_size == self.rank and batch_index in pending
            if not wanted and filler is not None:
                continue
            try:
                decoded = self.encoder.decode(sample)
            except SampleError as err:
                if wanted:
                    skips.sample(err)
                continue
            if filler is None:
                filler = decoded
            if not wanted:
                continue
            pending[batch_index].append((local, decoded))
            if len(pending[batch_index]) == self.batch_size:
                yield self._batch(pending.pop(batch_index), filler, skips)
        for batch_index in sorted(pending):  # short last batch, samples lost to bad data, or padding
            yield self._batch(pending[batch_index], filler, skips)

    def _batch(self, entries, filler, skips) -> dict:
        entries.sort(key=lambda e: e[0])
        decoded = [d for _, d in entries]
        valid = [True] * len(decoded)
        if not decoded:
            if filler is None:
                raise LoaderError(f"no readable sample in {self.urls}: cannot even build a padding batch")
            decoded, valid = [filler], [False]
        items = [self.encoder.encode(*d) for d in decoded]
        batch = self.encoder.collate(items, records=[d[0] for d in decoded], valid=valid)
        batch["skipped"] = skips.take()
        return batch


def read_index(pattern: str) -> dict:
    """The `{dataset}-{split}.index.json` beside a shard pattern `DIR/{dataset}-{split}-{...}.tar`."""
    directory, name = os.path.split(pattern)
    prefix = name.rsplit("-", 1)[0]
    path = os.path.join(directory, f"{prefix}.index.json")
    if not os.path.isfile(path):
        raise LoaderError(f"no shard index {path!r} for {pattern!r} (build shards with launchers/build_shards.py)")
    with open(path) as f:
        return json.load(f)


def expand_shards(pattern: str) -> list[str]:
    urls = list(wds.shardlists.expand_urls(pattern))
    missing = [u for u in urls if not os.path.isfile(u)]
    if not urls or missing:
        raise LoaderError(f"shard pattern {pattern!r}: missing {missing[:3] or 'every shard'}")
    return urls


def _worker_context(tokenizer):
    """Where the DataLoader workers come from: a forkserver, a single-threaded process started once per process
    (fork + exec) that forks each worker. Forked from a training process instead, a worker can inherit a lock
    another thread held at that instant and never start: a 2-rank ZeRO-3 test run hung so, one rank's worker
    stuck in Python's after-fork cleanup (PyOS_AfterFork_Child waiting on the interpreter's thread-state lock,
    which a thread of the rank held as the fork came: an earlier loader's queue feeder exiting, the process
    group's), that rank waiting on its worker, the other in a collective. The server imports once the project's
    modules this process has imported and the tokenizer's, so that a worker starts in about 0.2 s (a forked one
    in 0.1) instead of importing them again each epoch. As with any spawned or forkserver worker, the main
    script runs again in each worker as `__mp_main__`: a script that builds loaders keeps its work under
    `if __name__ == "__main__":` (every launcher and benchmark here does)."""
    project = sorted(name for name in sys.modules if name.split(".")[0] == __name__.split(".")[0])
    context = multiprocessing.get_context("forkserver")
    # read when the server starts (the first loader with workers to start one)
    context.set_forkserver_preload(["__main__", *project, type(tokenizer).__module__])
    return context


@dataclass
class DataConfig:
    """The recipe's `data` section: which shards, how they mix and how they become micro-batches."""

    train: dict = field(default_factory=dict)  # dataset → shard pattern (brace notation)
    dev: dict = field(default_factory=dict)  # dataset → shard pattern, evaluated after each epoch
    mix: Optional[dict] = None  # dataset → sampling weight (default: proportional to size)
    micro_batch_size: int = 8  # samples per rank per forward (DeepSpeed's train_micro_batch_size_per_gpu)
    num_workers: int = 2  # loader worker processes per rank
    shuffle_buffer: int = 500  # samples shuffled together per dataset stream
    # Length bucketing: this many micro-batches' worth of samples (per loader worker) are drawn together from the
    # mix, ordered by length_weight, cut into micro-batches and yielded in random order (1: no bucketing).
    length_group: int = 256
    # The bucketing order, length_weight × a sample's length rank among all drawn + (1 − length_weight) × its rank
    # within its dataset: 0 keeps the mix (a batch takes every dataset's same length quantile), 1 sorts by length
    # alone (least padding, batches of one or two datasets); 0.6 keeps the mean mix distance ≤ 0.20 (bench_loader)
    length_weight: float = 0.6
    batches_per_epoch: Optional[int] = None  # micro-batches per rank per epoch (default: one pass over the data)
    max_input_length: Optional[int] = None  # tokens; None: the encoding's default (Encoding)
    max_target_length: Optional[int] = None  # tokens of the target structure
    image_size: int = 224  # pixels of the visual side's input images

    def build(self, tokenizer, encoding: Encoding, rank: int = 0, world_size: int = 1, tasks=TASKS,
              eval_batch_size: int = 16, seed: int = 0) -> "MIELoader":
        return MIELoader(self, tokenizer, encoding, rank, world_size, list(tasks), eval_batch_size, seed)


class MIELoader:
    def __init__(self, config: DataConfig, tokenizer, encoding: Encoding, rank: int, world_size: int,
                 tasks: list, eval_batch_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} outside world size {world_size}")
        if config.micro_batch_size < 1 or config.length_group < 1 or not 0 <= config.length_weight <= 1:
            raise LoaderError(f"data.micro_batch_size {config.micro_batch_size} and data.length_group "
                              f"{config.length_group} must be >= 1, data.length_weight {config.length_weight} in [0, 1]")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.eval_batch_size, self.seed = eval_batch_size, seed
        self.datasets = sorted(set(config.train) | set(config.dev))
        self.encoder = SampleEncoder(tokenizer, encoding, tasks, self.datasets)
        self.train_urls = {name: expand_shards(pattern) for name, pattern in sorted(config.train.items())}
        self.train_sizes = {name: read_index(pattern)["samples"] for name, pattern in sorted(config.train.items())}
        weights = config.mix or self.train_sizes
        unknown = sorted(set(weights) - set(self.train_urls))
        if unknown:
            raise LoaderError(f"mix names datasets without train shards: {unknown}")
        self.mix = {name: float(weights.get(name, 0.0)) for name in self.train_urls}
        if self.train_urls and (any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0):
            raise LoaderError(f"mix weights must be >= 0 and not all zero, got {self.mix}")
        total = sum(self.train_sizes.values())
        self.batches_per_epoch = config.batches_per_epoch or \
            max(1, math.ceil(total / (world_size * config.micro_batch_size)))
        self.worker_context = _worker_context(tokenizer) if config.num_workers else None

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        workers = self.config.num_workers
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG each time an
        # iterator starts, which would shift the training's dropout stream when a run resumes mid-epoch.
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                          multiprocessing_context=self.worker_context,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """Exactly batches_per_epoch - skip_batches batches (skip_batches resumes inside an epoch)."""
        if not self.train_urls:
            raise LoaderError("no train shards configured")
        config = self.config
        stream = _TrainStream(self.train_urls, self.mix, self.encoder, config.micro_batch_size, self.batches_per_epoch,
                              config.shuffle_buffer, self.seed, self.rank, epoch, config.length_group,
                              config.length_weight)
        for index, batch in enumerate(self._loader(stream)):
            if index >= skip_batches:
                yield batch

    def eval_batches(self, dataset: str) -> Iterator[dict]:
        if dataset not in self.config.dev:
            raise LoaderError(f"no dev shards configured for {dataset!r}")
        pattern = self.config.dev[dataset]
        stream = _EvalStream(expand_shards(pattern), read_index(pattern)["samples"], self.encoder,
                             self.eval_batch_size, self.rank, self.world_size)
        return iter(self._loader(stream))
