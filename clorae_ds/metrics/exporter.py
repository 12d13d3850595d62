"""Per-rank Prometheus exporter: each rank serves /metrics from its own registry on base_port + local_rank,
bound to 127.0.0.1 unless configured otherwise; rank 0 writes a file_sd targets file listing every rank.

Updating never adds a host-device synchronisation: counters and timings are host values the loop already
has; losses, task weights and gate routing are set at the logging interval from values already on the host.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class MetricsError(RuntimeError):
    pass


@dataclass
class MetricsConfig:
    port: int = 0  # base port; rank r serves base + local rank. 0: no exporter
    bind: str = "127.0.0.1"  # listen address (0.0.0.0 for a cluster Prometheus)
    port_search: int = 0  # when the port is taken: try this many following ports (logged), else fail at start
    job: str = "clorae"  # the job label of the targets file
    # file_sd targets file written by rank 0 (default OUTPUT_DIR/metrics_targets.json); for a Prometheus that
    # watches many runs, point every run into one directory, e.g. runs/metrics_targets/RUN.json
    targets_file: Optional[str] = None
    linger_seconds: float = 0.0  # keep serving after training ends, so the final values get scraped


class MetricsExporter:
    def __init__(self, config: MetricsConfig, rank: int, local_rank: int):
        self.config, self.rank = config, str(rank)
        self.registry = CollectorRegistry()
        r = self.registry
        self.samples = Counter("clorae_train_samples", "Training samples processed", ["rank"], registry=r)
        self.tokens = Counter("clorae_train_tokens", "Training tokens (input + target, no padding)", ["rank"],
                              registry=r)
        self.steps = Counter("clorae_train_steps", "Optimiser steps", ["rank"], registry=r)
        self.step_seconds = Histogram("clorae_train_step_seconds", "Wall time of one training step (data wait "
                                      "excluded)", ["rank"], buckets=STEP_BUCKETS, registry=r)
        self.data_wait = Histogram("clorae_data_wait_seconds", "Time the step waited for its batch", ["rank"],
                                   buckets=WAIT_BUCKETS, registry=r)
        self.loss = Gauge("clorae_train_loss", "Token cross-entropy per dataset (last logged micro-batch)",
                          ["rank", "dataset"], registry=r)
        self.mim = Gauge("clorae_mim_loss", "MIM loss: the sum over adapted layer calls of each call's mean over "
                         "real tokens and channels", ["rank"], registry=r)
        self.task_weight = Gauge("clorae_task_weight", "Achievement-based task weight", ["rank", "dataset"], registry=r)
        self.eval_f1 = Gauge("clorae_eval_f1", "Dev F1 per score key", ["rank", "dataset"], registry=r)
        self.eval_all = Gauge("clorae_eval_all", "Dev 'All': sum of F1 x 100", ["rank"], registry=r)
        self.gate = Gauge("clorae_gate_task_expert_ratio", "Mean gate weight on the task expert",
                          ["rank", "task", "layer_group"], registry=r)
        self.skipped = Counter("clorae_skipped_samples", "Samples skipped for bad data", ["rank", "reason"], registry=r)
        self.epoch = Gauge("clorae_epoch", "Current epoch", ["rank"], registry=r)
        self.lr = Gauge("clorae_learning_rate", "Learning rate of the adapter experts", ["rank"], registry=r)
        self.memory = Gauge("clorae_memory_bytes", "Memory in use", ["rank", "kind"], registry=r)
        self.last_step = Gauge("clorae_last_step_timestamp_seconds", "Unix time of the last optimiser step", ["rank"],
                               registry=r)
        self.server = None
        self.port = None
        if config.port:
            self._serve(config.port + local_rank)

    def _serve(self, port: int) -> None:
        last_error = None
        for candidate in range(port, port + self.config.port_search + 1):
            try:
                self.server, _ = start_http_server(candidate, addr=self.config.bind, registry=self.registry)
                self.port = candidate
                if candidate != port:
                    log.warning("metrics port %d was taken; rank %s serves on %d", port, self.rank, candidate)
                return
            except OSError as err:
                last_error = err
        raise MetricsError(f"rank {self.rank}: cannot serve metrics on {self.config.bind}:{port}"
                           f"{f'-{port + self.config.port_search}' if self.config.port_search else ''}: {last_error} "
                           "(set metrics.port to a free port, or metrics.port_search)")

    @property
    def address(self) -> Optional[str]:
        if self.port is None:
            return None
        host = self.config.bind if self.config.bind not in ("0.0.0.0", "::") else socket.gethostname()
        return f"{host}:{self.port}"

    def write_targets(self, path: str, addresses: list) -> None:
        """Prometheus file_sd: one target per rank, labelled job and rank (written atomically)."""
        targets = [{"targets": [a], "labels": {"job": self.config.job, "rank": str(rank)}}
                   for rank, a in enumerate(addresses) if a]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(targets, f, indent=1)
        os.replace(tmp, path)

    # --- updates (host values only) ---------------------------------------------------------------
    def on_step(self, samples: int, tokens: int, step_seconds: float, wait_seconds: float, skipped: dict) -> None:
        r = self.rank
        self.samples.labels(r).inc(samples)
        self.tokens.labels(r).inc(tokens)
        self.steps.labels(r).inc()
        self.step_seconds.labels(r).observe(step_seconds)
        self.data_wait.labels(r).observe(wait_seconds)
        for reason, count in skipped.items():
            self.skipped.labels(r, reason).inc(count)
        self.last_step.labels(r).set(time.time())

    def on_log(self, dataset_loss: dict, mim: Optional[float], learning_rate: float, epoch: int,
               gate_groups: dict) -> None:
        r = self.rank
        for dataset, value in dataset_loss.items():
            self.loss.labels(r, dataset).set(value)
        if mim is not None:
            self.mim.labels(r).set(mim)
        self.lr.labels(r).set(learning_rate)
        self.epoch.labels(r).set(epoch)
        for group, per_task in gate_groups.items():
            for task, value in per_task.items():
                self.gate.labels(r, task, group).set(value)
        self.memory.labels(r, "rss").set(_rss_bytes())
        try:
            import torch

            if torch.cuda.is_available():
                self.memory.labels(r, "accelerator").set(torch.cuda.memory_allocated())
        except ImportError:
            pass

    def on_weights(self, datasets: list, weights: list) -> None:
        for dataset, weight in zip(datasets, weights):
            self.task_weight.labels(self.rank, dataset).set(weight)

    def on_eval(self, report: dict) -> None:
        for key, value in report.items():
            if key != "All":
                self.eval_f1.labels(self.rank, key).set(value["f1"])
        self.eval_all.labels(self.rank).set(report["All"])

    def close(self) -> None:
        if self.server is not None:
            if self.config.linger_seconds > 0:
                time.sleep(self.config.linger_seconds)
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
