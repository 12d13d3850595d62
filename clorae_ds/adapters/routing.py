"""Which task expert each sample of a batch uses.

A `TaskRouting` is built once per model call from the batch's task ids and shared by every adapted layer,
so the per-layer hot path does no host work beyond walking a short list of segments. Pass task ids that
live on the CPU (the collator's do): then building the plan never waits on the accelerator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class Segment:
    """Rows of one task in a flattened (tokens, features) activation: a slice when the task's samples
    are contiguous in the batch, else an index tensor of token rows."""

    task: int
    rows: Union[slice, torch.Tensor]
    num_rows: int


class RoutingError(ValueError):
    pass


class TaskRouting:
    def __init__(self, task_ids: torch.Tensor, num_tasks: int):
        task_ids = torch.as_tensor(task_ids)
        if task_ids.dim() != 1 or task_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise RoutingError(f"task_ids must be a 1-D integer tensor (batch,), got {tuple(task_ids.shape)} "
                               f"{task_ids.dtype}")
        self.task_ids_cpu = task_ids.detach().to("cpu", torch.int64)
        if len(self.task_ids_cpu) and (self.task_ids_cpu.min() < 0 or self.task_ids_cpu.max() >= num_tasks):
            raise RoutingError(f"task ids {sorted(set(self.task_ids_cpu.tolist()))} out of range for "
                               f"{num_tasks} tasks")
        self.num_tasks = num_tasks
        self._plans: dict[tuple, list[Segment]] = {}

    @property
    def batch_size(self) -> int:
        return len(self.task_ids_cpu)

    def segments(self, batch: int, tokens_per_sample: int, device: torch.device) -> list[Segment]:
        """Segments over `batch * tokens_per_sample` rows. `batch` may be a multiple of the routed batch
        size: generate() expands each sample in place (repeat_interleave) for beams."""
        key = (batch, tokens_per_sample, str(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._build(batch, tokens_per_sample, device)
        return plan

    def _build(self, batch: int, tokens_per_sample: int, device: torch.device) -> list[Segment]:
        base = self.batch_size
        if base == 0 or batch % base:
            raise RoutingError(f"layer input has batch {batch}, but task routing was set for {base} samples")
        ids = self.task_ids_cpu.repeat_interleave(batch // base)
        starts = [0] + [i for i in range(1, batch) if ids[i] != ids[i - 1]]
        ends = starts[1:] + [batch]
        runs = [(int(ids[s]), s, e) for s, e in zip(starts, ends)]
        if len(runs) == len({task for task, _, _ in runs}):
            # One contiguous run per task (the collator sorts batches by task): views, no copies.
            return [Segment(task, slice(s * tokens_per_sample, e * tokens_per_sample),
                            (e - s) * tokens_per_sample) for task, s, e in runs]
        token_offsets = torch.arange(tokens_per_sample)
        segments = []
        for task in sorted({task for task, _, _ in runs}):
            samples = torch.nonzero(ids == task).flatten()
            rows = (samples[:, None] * tokens_per_sample + token_offsets).flatten().to(device)
            segments.append(Segment(task, rows, len(rows)))
        return segments
