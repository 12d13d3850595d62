"""The C-LoRAE linear layer: y = W0·x + (α/r)·(g1·U(x) + g2·D_n(x))  (method.md eq. 3-8).

The low-rank part runs in one autograd Function with a hand-written backward. Why: a mixed-task batch
splits the task experts into per-task row segments, and plain autograd on slices or masks would add
full-width copies (slice backward allocates a zero tensor of the whole input per task; masks compute every
expert for every token). Here each task expert touches only its own rows, the gates are folded into the
rank-r activations, and the delta is accumulated into the output in place.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLoRAEConfig
from .routing import RoutingError, Segment, TaskRouting

MIM_EPS = 1e-5
MIM_INITIAL_VARIANCE = 5.0


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _rows(t: torch.Tensor, seg: Segment) -> torch.Tensor:
    return t[seg.rows] if isinstance(seg.rows, slice) else t.index_select(0, seg.rows)


def _store_rows(dst: torch.Tensor, seg: Segment, value: torch.Tensor) -> None:
    if isinstance(seg.rows, slice):
        dst[seg.rows] = value
    else:
        dst.index_copy_(0, seg.rows, value)


def _mm_into_rows(dst: torch.Tensor, seg: Segment, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dst[rows] = a @ b, written in place for a slice (no temporary of the segment's full width)."""
    if isinstance(seg.rows, slice):
        return torch.mm(a, b, out=dst[seg.rows])
    value = a @ b
    dst.index_copy_(0, seg.rows, value)
    return value


def _segment_weights(universal_A, universal_B, task_A, task_B, task: int):
    """The experts one segment uses, stacked: A (k, d_in), B (d_out, k) with k = r + r_t. One matmul per
    segment and direction then serves both experts (the weights are small; the activations are not)."""
    if task_A is None:
        return universal_A, universal_B
    if universal_A is None:
        return task_A[task], task_B[task]
    return torch.cat([universal_A, task_A[task]]), torch.cat([universal_B, task_B[task]], dim=1)


def _segment_coef(gates: Optional[torch.Tensor], seg: Segment, r_universal: int, r_task: int, scaling: float):
    """Per-column output scale of the stacked activations: α/r times the gate of each column's expert."""
    if gates is None:
        return scaling
    g = _rows(gates, seg) * scaling
    return torch.cat([g[:, :1].expand(-1, r_universal), g[:, 1:].expand(-1, r_task)], dim=1)


class _CLoRAEDelta(torch.autograd.Function):
    """Adds the gated expert outputs into `base_out` (in place: the frozen base linear's backward never
    reads its output). Returns (y, z, gates): z (tokens, r + r_t) holds the ungated universal | task
    activations for the MIM loss; gates (tokens, 2) are for routing statistics (not differentiable)."""

    @staticmethod
    def forward(ctx, base_out, x, universal_A, universal_B, task_A, task_B, gate, segments, scaling, dropout):
        ctx.set_materialize_grads(False)
        keep = None
        xd = x
        if dropout > 0:
            # A float mask, pre-scaled, as F.dropout builds it: CPU kernels multiply by a bool mask on a
            # slow scalar path.
            keep = torch.empty_like(x).bernoulli_(1.0 - dropout).div_(1.0 - dropout)
            xd = x * keep
        r_universal = universal_A.shape[0] if universal_A is not None else 0
        r_task = task_A.shape[1] if task_A is not None else 0
        gates = None
        if gate is not None:
            gates = torch.softmax(_at_least_fp32(F.linear(x, gate)), dim=-1).to(x.dtype)
        z = x.new_empty(x.shape[0], r_universal + r_task)
        for seg in segments:
            A, B = _segment_weights(universal_A, universal_B, task_A, task_B, seg.task)
            z_seg = _mm_into_rows(z, seg, _rows(xd, seg), A.t())
            scaled = z_seg * _segment_coef(gates, seg, r_universal, r_task, scaling)
            if isinstance(seg.rows, slice):
                base_out[seg.rows].addmm_(scaled, B.t())
            else:
                base_out.index_add_(0, seg.rows, scaled @ B.t())
        ctx.mark_dirty(base_out)
        if gates is not None:
            ctx.mark_non_differentiable(gates)
        ctx.segments, ctx.scaling, ctx.ranks = segments, scaling, (r_universal, r_task)
        ctx.save_for_backward(x, xd if keep is not None else None, keep, universal_A, universal_B, task_A,
                              task_B, gate, gates, z)
        return base_out, z, gates

    @staticmethod
    def backward(ctx, grad_y, grad_z_extra, _grad_gates):
        x, xd, keep, universal_A, universal_B, task_A, task_B, gate, gates, z = ctx.saved_tensors
        segments, scaling, (r_universal, r_task) = ctx.segments, ctx.scaling, ctx.ranks
        if xd is None:
            xd = x
        if grad_y is None:
            grad_y = x.new_zeros(x.shape[0], (universal_B if universal_B is not None else task_B).shape[-2])
        needs_x = ctx.needs_input_grad[1]
        grad_uA = torch.zeros_like(universal_A) if universal_A is not None else None
        grad_uB = torch.zeros_like(universal_B) if universal_B is not None else None
        grad_tA = torch.zeros_like(task_A) if task_A is not None else None
        grad_tB = torch.zeros_like(task_B) if task_B is not None else None
        grad_xd = torch.empty_like(x) if needs_x else None  # every row belongs to exactly one segment
        grad_logits = x.new_empty(x.shape[0], 2) if gates is not None else None
        for seg in segments:
            A, B = _segment_weights(universal_A, universal_B, task_A, task_B, seg.task)
            coef = _segment_coef(gates, seg, r_universal, r_task, scaling)
            grad_y_seg, z_seg = _rows(grad_y, seg), _rows(z, seg)
            grad_scaled = grad_y_seg @ B
            grad_B = ((z_seg * coef).t() @ grad_y_seg).t()  # zᵀ·grad then transpose: faster than gradᵀ·z
            if gates is not None:
                per_column = grad_scaled * z_seg
                grad_g = torch.stack([per_column[:, :r_universal].sum(-1), per_column[:, r_universal:].sum(-1)],
                                     dim=-1) * scaling
                g, grad_g = _at_least_fp32(_rows(gates, seg)), _at_least_fp32(grad_g)
                _store_rows(grad_logits, seg, (g * (grad_g - (g * grad_g).sum(-1, keepdim=True))).to(x.dtype))
            grad_z = grad_scaled * coef
            if grad_z_extra is not None:
                grad_z = grad_z + _rows(grad_z_extra, seg)
            grad_A = grad_z.t() @ _rows(xd, seg)
            if grad_uA is not None:
                grad_uA += grad_A[:r_universal]
                grad_uB += grad_B[:, :r_universal]
            if grad_tA is not None:
                grad_tA[seg.task] += grad_A[r_universal:]
                grad_tB[seg.task] += grad_B[:, r_universal:]
            if needs_x:
                _mm_into_rows(grad_xd, seg, grad_z, A)
        grad_x = grad_gate = None
        if needs_x:
            grad_x = grad_xd.mul_(keep) if keep is not None else grad_xd
        if gates is not None:
            grad_gate = grad_logits.t() @ x
            if needs_x:
                grad_x.addmm_(grad_logits, gate)
        return grad_y, grad_x, grad_uA, grad_uB, grad_tA, grad_tB, grad_gate, None, None, None


class CLoRAELinear(nn.Module):
    """A frozen nn.Linear plus a universal LoRA expert, N task experts and a per-token 2-way gate."""

    def __init__(self, base: nn.Linear, config: CLoRAEConfig):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"CLoRAELinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.config = config
        self.in_features, self.out_features = base.in_features, base.out_features
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        r, r_t, n, d_in, d_out = config.rank, config.expert_task_rank, config.num_tasks, base.in_features, base.out_features
        self.universal_A = self.universal_B = self.task_A = self.task_B = self.gate = None
        if config.uses_universal:
            self.universal_A = nn.Parameter(torch.empty(r, d_in, **factory))
            self.universal_B = nn.Parameter(torch.zeros(d_out, r, **factory))
        if config.uses_task_experts:
            # One tensor for all tasks: every rank touches the same parameters every step, whatever tasks
            # its micro-batch holds (ZeRO-3 gathers and reduces per parameter; ranks that differ hang).
            self.task_A = nn.Parameter(torch.empty(n, r_t, d_in, **factory))
            self.task_B = nn.Parameter(torch.zeros(n, d_out, r_t, **factory))
        if config.uses_gate:
            # Zero gate: both experts start with weight 0.5.
            self.gate = nn.Parameter(torch.zeros(2, d_in, **factory))
        if config.uses_mim:
            # VID regressor mu(D) = mim_scale * D + mim_shift and per-channel variance softplus(mim_var) + eps.
            self.mim_scale = nn.Parameter(torch.ones(d_out, **factory))
            self.mim_shift = nn.Parameter(torch.zeros(d_out, **factory))
            init = math.log(math.expm1(MIM_INITIAL_VARIANCE - MIM_EPS))
            self.mim_var = nn.Parameter(torch.full((d_out,), init, **factory))
        self.reset_expert_A()
        self.routing: Optional[TaskRouting] = None
        self._mim_terms: list[torch.Tensor] = []
        self.register_buffer("gate_task_sum", torch.zeros(n, dtype=torch.float32, device=base.weight.device),
                             persistent=False)
        self.register_buffer("gate_token_count", torch.zeros(n, dtype=torch.float32, device=base.weight.device),
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight: HF models read `.weight` of their linears (e.g. for dtype)."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def reset_expert_A(self) -> None:
        """LoRA init: A kaiming-uniform (as nn.Linear), B zero, so the adapted model equals the base."""
        if self.universal_A is not None:
            nn.init.kaiming_uniform_(self.universal_A, a=math.sqrt(5))
        if self.task_A is not None:
            for a in self.task_A.data:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def expert_weights(self) -> dict[str, torch.Tensor]:
        named = {"universal_A": self.universal_A, "universal_B": self.universal_B, "task_A": self.task_A,
                 "task_B": self.task_B, "gate": self.gate}
        return {k: v.detach() for k, v in named.items() if v is not None}

    def forward(self, x: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        base_out = self.base(x2)
        if base_out._base is not None:  # a view (e.g. from a hook): the delta is added in place below
            base_out = base_out.clone()
        routing = TaskRouting(task_ids, self.config.num_tasks) if task_ids is not None else self.routing
        segments = [Segment(0, slice(0, x2.shape[0]), x2.shape[0])]
        if self.task_A is not None:
            if routing is None:
                raise RoutingError("this C-LoRAE layer needs task ids: call it with task_ids= or inside "
                                   "clorae_ds.adapters.task_routing(model, task_ids)")
            segments = routing.segments(x.shape[0], x2.shape[0] // x.shape[0], x.device)
        dropout = self.config.dropout if self.training else 0.0
        y, z, gates = _CLoRAEDelta.apply(
            base_out, x2, self.universal_A, self.universal_B, self.task_A, self.task_B, self.gate, segments,
            self.config.scaling, dropout)
        if gates is not None:
            self._record_gates(gates, segments)
        if self.config.uses_mim and self.training and torch.is_grad_enabled():
            r = self.config.rank
            self._mim_terms.append(self._mim_loss(z[:, :r], z[:, r:], segments))
        return y.view(*x.shape[:-1], self.out_features)

    def _record_gates(self, gates: torch.Tensor, segments: list[Segment]) -> None:
        for seg in segments:
            self.gate_task_sum[seg.task] += _rows(gates[:, 1], seg).sum()
            self.gate_token_count[seg.task] += seg.num_rows

    def _mim_loss(self, z_universal: torch.Tensor, z_task: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """mean over tokens and channels of ½[(mu(D) − U)²/σ² + log σ²] (method.md §2), exact, without
        building a (tokens × d_out) tensor: with D' = scale⊙D = S_n·z_t, U = B_U·z_u and W = diag(1/σ²),
        ‖D' + b − U‖²_W expands into rank-space Gram matrices (S_nᵀWS_n, S_nᵀWB_U, B_UᵀWB_U) paired with
        ZᵀZ sums over each task's rows. Done in fp32 at least: the expansion cancels terms."""
        z_u = _at_least_fp32(z_universal)
        universal_B = _at_least_fp32(self.universal_B)
        if self.config.mim_detach_teacher:
            z_u, universal_B = z_u.detach(), universal_B.detach()
        variance = F.softplus(_at_least_fp32(self.mim_var)) + MIM_EPS
        inv_var = 1.0 / variance
        shift = _at_least_fp32(self.mim_shift)
        weighted_shift = shift * inv_var
        student_B = _at_least_fp32(self.task_B) * _at_least_fp32(self.mim_scale)[:, None]  # (N, d_out, r_t)
        weighted_student_t = (student_B * inv_var[:, None]).transpose(1, 2)
        gram_tt = weighted_student_t @ student_B  # (N, r_t, r_t)
        gram_tu = weighted_student_t @ universal_B  # (N, r_t, r)
        gram_uu = (universal_B * inv_var[:, None]).t() @ universal_B  # (r, r)
        linear_t = student_B.transpose(1, 2) @ weighted_shift  # (N, r_t)
        linear_u = universal_B.t() @ weighted_shift  # (r,)
        total = (shift * weighted_shift).sum() * z_u.shape[0] + (gram_uu * (z_u.t() @ z_u)).sum() \
            - 2.0 * linear_u.dot(z_u.sum(0))
        for seg in segments:
            z_t, z_u_seg = _at_least_fp32(_rows(z_task, seg)), _rows(z_u, seg)
            total = total + (gram_tt[seg.task] * (z_t.t() @ z_t)).sum() \
                - 2.0 * (gram_tu[seg.task] * (z_t.t() @ z_u_seg)).sum() + 2.0 * linear_t[seg.task].dot(z_t.sum(0))
        return 0.5 * (total / (z_u.shape[0] * self.out_features) + torch.log(variance).mean())

    def pop_mim_terms(self) -> list[torch.Tensor]:
        terms, self._mim_terms = self._mim_terms, []
        return terms

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, mode={c.mode}, r={c.rank}, "
                f"r_t={c.expert_task_rank if c.uses_task_experts else 0}, tasks={c.num_tasks}")
