"""Which task expert each token of a batch uses.

A `TaskRouting` is built once per model call from the batch's task ids and shared by every adapted layer. It turns
the ids into per-token tensors on the layers' device (a one-hot task matrix, an expert-column mask and the masked
pass's column weights, the real-token mask of the MIM loss) once per shape, with tensor operations only: no host
work on tensor values and no host-device synchronisation, so that the model compiles as one graph.
"""
from __future__ import annotations

from typing import Optional

import torch


class RoutingError(ValueError):
    pass


def check_task_ids(task_ids: torch.Tensor, num_tasks: int) -> None:
    """A clear RoutingError for ids that are not a 1-D integer tensor of known tasks. TaskRouting calls it for ids on
    the CPU only, outside torch.compile: reading values on a GPU would stall it, and a compiled graph cannot branch
    on a tensor's values. The collator's ids come from task names (CLoRAEConfig.task_id refuses unknown ones)."""
    if task_ids.dim() != 1 or task_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise RoutingError(f"task_ids must be a 1-D integer tensor (batch,), got {tuple(task_ids.shape)} "
                           f"{task_ids.dtype}")
    if len(task_ids) and (task_ids.min() < 0 or task_ids.max() >= num_tasks):
        raise RoutingError(f"task ids {sorted(set(task_ids.tolist()))} out of range for {num_tasks} tasks")


class TaskRouting:
    def __init__(self, task_ids: torch.Tensor, num_tasks: int, record_stats: bool = False,
                 token_masks: Optional[list[torch.Tensor]] = None):
        task_ids = torch.as_tensor(task_ids)
        if task_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            check_task_ids(task_ids, num_tasks)
        self.task_ids = task_ids.to(torch.int64)
        self.num_tasks = num_tasks
        self.record_stats = record_stats  # accumulate per-task gate statistics (a few extra kernels per layer)
        self._cache: dict[tuple, object] = {}
        # (batch, length) masks of real tokens, told apart by their length: a layer input of that length
        # gets that mask (MIEModel keeps its sequences' lengths distinct); other inputs count every token.
        self.token_masks = {}
        for mask in token_masks or []:
            if mask.dim() != 2 or mask.shape[0] != self.batch_size:
                raise RoutingError(f"token mask of shape {tuple(mask.shape)} does not fit a batch of "
                                   f"{self.batch_size}")
            if mask.shape[1] in self.token_masks:
                raise RoutingError(f"two token masks of length {mask.shape[1]}: a layer could not tell them apart")
            self.token_masks[mask.shape[1]] = mask

    @property
    def batch_size(self) -> int:
        return len(self.task_ids)

    def token_tasks(self, batch: int, tokens_per_sample: int, device) -> torch.Tensor:
        """Task id of every token row, on `device`. `batch` may be a multiple of the routed batch: generate()
        expands each sample in place (repeat_interleave) for beams."""
        base = self.batch_size
        if base == 0 or batch % base:
            raise RoutingError(f"layer input has batch {batch}, but task routing was set for {base} samples")
        return self.task_ids.to(device).repeat_interleave(batch // base * tokens_per_sample)

    def _one_hot(self, batch: int, tokens_per_sample: int, device) -> torch.Tensor:
        """(tokens, N) bool: a comparison, not F.one_hot, which checks the ids' range with a host sync on a GPU."""
        tasks = self.token_tasks(batch, tokens_per_sample, device)
        return tasks[:, None] == torch.arange(self.num_tasks, device=device)

    def one_hot(self, batch: int, tokens_per_sample: int, device, dtype) -> torch.Tensor:
        """(tokens, N) one-hot task matrix."""
        key = ("one_hot", batch, tokens_per_sample, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._one_hot(batch, tokens_per_sample, device).to(dtype)
        return self._cache[key]

    def column_mask(self, batch: int, tokens_per_sample: int, universal_rank: int, task_rank: int, device,
                    dtype) -> torch.Tensor:
        """(tokens, r + N·r_t): 1 on the universal expert's columns and on the columns of the token's own
        task expert, 0 on every other task's columns."""
        key = ("columns", batch, tokens_per_sample, universal_rank, task_rank, str(device), dtype)
        if key not in self._cache:
            task_columns = self._one_hot(batch, tokens_per_sample, device).to(dtype).repeat_interleave(task_rank, dim=1)
            self._cache[key] = torch.cat([task_columns.new_ones(len(task_columns), universal_rank), task_columns], 1)
        return self._cache[key]

    def column_coefficients(self, batch: int, tokens_per_sample: int, universal_rank: int, task_rank: int,
                            scaling: float, gate: Optional[str], width: int, device,
                            dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(base, slope), each (tokens, width), such that the masked path's per-token column weights are
        base + s·slope, with s the gate's value: α/r·g1 = α/r·(1 − g2) on the universal columns, α/r·g2 on the
        token's own task columns, 0 on every other task's columns and on the columns past r + N·r_t (the layer's
        gate column and pad). `gate` "softmax": s = g2; "tanh": s = tanh(l) = 2·g2 − 1 (so base is α/2r on all
        the token's columns, slope ∓α/2r). Without a gate (None), (α/r on the token's columns, None)."""
        key = ("coefficients", batch, tokens_per_sample, universal_rank, task_rank, scaling, gate, width, str(device),
               dtype)
        if key not in self._cache:
            mask = self.column_mask(batch, tokens_per_sample, universal_rank, task_rank, device, torch.float32)
            mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
            if gate is not None:
                universal = torch.arange(mask.shape[1], device=device) < universal_rank
                if gate == "tanh":  # α/r·g2 = α/2r·(1 + s), α/r·g1 = α/2r·(1 − s)
                    base, step = mask * (scaling / 2), scaling / 2
                else:
                    base, step = mask * (universal * scaling), scaling
                slope = mask * torch.where(universal, -step, step)
                self._cache[key] = (base.to(dtype), slope.to(dtype))
            else:
                self._cache[key] = ((mask * scaling).to(dtype), None)
        return self._cache[key]

    def token_mask(self, batch: int, tokens_per_sample: int, device, dtype) -> Optional[torch.Tensor]:
        """(tokens, 1) mask of real tokens for a layer input of this shape, or None (every token real)."""
        mask = self.token_masks.get(tokens_per_sample)
        if mask is None or batch != self.batch_size:
            return None
        key = ("token_mask", tokens_per_sample, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = mask.reshape(-1, 1).to(device=device, dtype=dtype)
        return self._cache[key]

    def mim_signs(self, batch: int, tokens_per_sample: int, universal_rank: int, task_rank: int, width: int,
                  device) -> torch.Tensor:
        """(tokens, max(width, R + 1)) fp32 signs of the masked path's MIM (R = r + N·r_t), all zero on padding
        rows: −1 on the universal columns (the residual is mu(D) − U), 1 on the token's own task columns and on
        column R, MIM's constant (the first column past the experts': the layer's gate column or pad, whose z MIM
        does not read, so that MIM's tensors stay `width` wide where a column is free), 0 on the other tasks'
        columns and past R."""
        key = ("mim_signs", batch, tokens_per_sample, universal_rank, task_rank, width, str(device))
        if key not in self._cache:
            columns = self.column_mask(batch, tokens_per_sample, universal_rank, task_rank, device, torch.float32)
            rank = columns.shape[1]
            signs = torch.cat([-columns[:, :universal_rank], columns[:, universal_rank:],
                               columns.new_ones(len(columns), 1),
                               columns.new_zeros(len(columns), max(width, rank + 1) - rank - 1)], 1)
            real = self.token_mask(batch, tokens_per_sample, device, torch.float32)
            self._cache[key] = signs if real is None else signs * real
        return self._cache[key]

    def real_token_count(self, batch: int, tokens_per_sample: int, device) -> torch.Tensor:
        """How many token rows are real (not padding), as an fp32 scalar, at least 1."""
        key = ("real_tokens", batch, tokens_per_sample, str(device))
        if key not in self._cache:
            real = self.token_mask(batch, tokens_per_sample, device, torch.float32)
            count = real.sum().clamp(min=1) if real is not None else torch.tensor(float(batch * tokens_per_sample))
            self._cache[key] = count.to(device=device, dtype=torch.float32)
        return self._cache[key]
