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
        # A list compared by length, not a dict keyed by it: under torch.compile a size used as a key is
        # specialized (a recompile for every length).
        self.token_masks = list(token_masks or [])
        for i, mask in enumerate(self.token_masks):
            if mask.dim() != 2 or mask.shape[0] != self.batch_size:
                raise RoutingError(f"token mask of shape {tuple(mask.shape)} does not fit a batch of "
                                   f"{self.batch_size}")
            if any(mask.shape[1] == other.shape[1] for other in self.token_masks[:i]):
                raise RoutingError(f"two token masks of length {mask.shape[1]}: a layer could not tell them apart")

    def _cached(self, key: tuple, compute):
        """compute() once per routing in eager; inline under torch.compile, where a cache keyed by sizes would
        specialize every dynamic size, and the graph fuses these small elementwise ops into their consumers."""
        if torch.compiler.is_compiling():
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

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
        return self._cached(("one_hot", batch, tokens_per_sample, str(device), dtype),
                            lambda: self._one_hot(batch, tokens_per_sample, device).to(dtype))

    def column_mask(self, batch: int, tokens_per_sample: int, universal_rank: int, task_rank: int, device,
                    dtype) -> torch.Tensor:
        """(tokens, r + N·r_t): 1 on the universal expert's columns and on the columns of the token's own
        task expert, 0 on every other task's columns."""
        def compute():
            task_columns = self._one_hot(batch, tokens_per_sample, device).to(dtype).repeat_interleave(task_rank, dim=1)
            return torch.cat([task_columns.new_ones(len(task_columns), universal_rank), task_columns], 1)
        return self._cached(("columns", batch, tokens_per_sample, universal_rank, task_rank, str(device), dtype),
                            compute)

    def column_coefficients(self, batch: int, tokens_per_sample: int, universal_rank: int, task_rank: int,
                            scaling: float, gate: Optional[str], width: int, device,
                            dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(base, slope), each (tokens, width), such that the masked path's per-token column weights are
        base + s·slope, with s the gate's value: α/r·g1 = α/r·(1 − g2) on the universal columns, α/r·g2 on the
        token's own task columns, 0 on every other task's columns and on the columns past r + N·r_t (the layer's
        gate column and pad). `gate` "softmax": s = g2; "tanh": s = tanh(l) = 2·g2 − 1 (so base is α/2r on all
        the token's columns, slope ∓α/2r). Without a gate (None), (α/r on the token's columns, None)."""
        def compute():
            mask = self.column_mask(batch, tokens_per_sample, universal_rank, task_rank, device, torch.float32)
            mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
            if gate is None:
                return (mask * scaling).to(dtype), None
            universal = torch.arange(mask.shape[1], device=device) < universal_rank
            if gate == "tanh":  # α/r·g2 = α/2r·(1 + s), α/r·g1 = α/2r·(1 − s)
                base, step = mask * (scaling / 2), scaling / 2
            else:
                base, step = mask * (universal * scaling), scaling
            slope = mask * torch.where(universal, -step, step)
            return base.to(dtype), slope.to(dtype)
        return self._cached(("coefficients", batch, tokens_per_sample, universal_rank, task_rank, scaling, gate, width,
                             str(device), dtype), compute)

    def token_mask(self, batch: int, tokens_per_sample: int, device, dtype) -> Optional[torch.Tensor]:
        """(tokens, 1) mask of real tokens for a layer input of this shape, or None (every token real)."""
        if batch != self.batch_size:
            return None
        for mask in self.token_masks:
            if mask.shape[1] == tokens_per_sample:
                break
        else:
            return None
        return self._cached(("token_mask", tokens_per_sample, str(device), dtype),
                            lambda: mask.reshape(-1, 1).to(device=device, dtype=dtype))

    def mim_signs(self, batch: int, tokens_per_sample: int, universal_rank: int, task_rank: int, width: int,
                  device) -> torch.Tensor:
        """(tokens, max(width, R + 1)) fp32 signs of the masked path's MIM (R = r + N·r_t), all zero on padding
        rows: −1 on the universal columns (the residual is mu(D) − U), 1 on the token's own task columns and on
        column R, MIM's constant (the first column past the experts': the layer's gate column or pad, whose z MIM
        does not read, so that MIM's tensors stay `width` wide where a column is free), 0 on the other tasks'
        columns and past R."""
        def compute():
            columns = self.column_mask(batch, tokens_per_sample, universal_rank, task_rank, device, torch.float32)
            rank = columns.shape[1]
            signs = torch.cat([-columns[:, :universal_rank], columns[:, universal_rank:],
                               columns.new_ones(len(columns), 1),
                               columns.new_zeros(len(columns), max(width, rank + 1) - rank - 1)], 1)
            real = self.token_mask(batch, tokens_per_sample, device, torch.float32)
            return signs if real is None else signs * real
        return self._cached(("mim_signs", batch, tokens_per_sample, universal_rank, task_rank, width, str(device)),
                            compute)

    def real_token_count(self, batch: int, tokens_per_sample: int, device) -> torch.Tensor:
        """How many token rows are real (not padding), as an fp32 scalar, at least 1."""
        def compute():
            real = self.token_mask(batch, tokens_per_sample, device, torch.float32)
            if real is None:  # a size, not float(size), which would specialize a dynamic one under torch.compile
                return torch.scalar_tensor(batch * tokens_per_sample, dtype=torch.float32, device=device)
            return real.sum().clamp(min=1)
        return self._cached(("real_tokens", batch, tokens_per_sample, str(device)), compute)
