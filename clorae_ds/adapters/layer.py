"""The C-LoRAE linear layer, fast: y = W0·x + (α/r)·(g1·U(x) + g2·D_n(x)) (docs/method.md; reference.py is the
same method in plain autograd, and the oracle these kernels are tested against).

Design, top to bottom:
- Fused experts. `expert_A` (R [+ 1], d_in) and `expert_B` (d_out, R [+ 3]) hold every expert's columns
  [universal | task 0 | ... | task N-1], R = r + N·r_t; expert_A's extra row is the gate's p (W_g = [−p; p],
  _task_gate), expert_B's extra columns the MIM regressor. Two parameter tensors a layer, as LoRA has: DeepSpeed's
  optimiser wrappers cost a fixed handful of ops per tensor.
- One masked pass (_MaskedDelta): z = drop(x)·Aᵀ over all R columns (and the gate's), each token's columns scaled
  by α/r times its gate weight and zeroed outside its own task (per-token column weights from TaskRouting, built
  once per step), y = base + (z ⊙ coef)·Bᵀ: a fixed handful of kernels whatever the task mix, and absent tasks'
  experts get exact zero gradients (every rank touches the same tensors: ZeRO-3 needs it).
- MIM in rank space (_GroupMIMLoss): exact, from Gram matrices, every layer call of the same shapes in one batched
  call at collection.
- Hand-written backwards: nothing saved that autograd would not need, gradients written in the parameters' dtype.
  They trace under torch.compile (plain tensor code, no in-place outputs, no host decisions on tensor values).
- One kernel policy per device type (KernelPolicy), which benchmarks and tests override (set_kernel_policy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLoRAEConfig
from .routing import RoutingError, TaskRouting

MIM_EPS = 1e-5
MIM_INITIAL_VARIANCE = 5.0
# The MIM regressor's columns [shift | scale | var], expert_B's last three where MIM is on (CLoRAELinear.mim_regressor).
PACKED_SHIFT, PACKED_SCALE, PACKED_VAR = 0, 1, 2
MIM_COLUMNS = 3


@dataclass(frozen=True)
class KernelPolicy:
    """The layer's kernel choices on one device type, each measured where it is taken (bench_adapter):
    - cpu_dropout_mask: dropout from _dropout_keep's float mask (CPU: 0.23 ms for 576 × 384 against 1.5 for
      bernoulli_), else torch.native_dropout, one kernel (a GPU step of these sizes is launch-bound). Under
      torch.compile always native_dropout: the mask's in-place draws do not trace.
    - rank_alignment: rank-space widths zero-padded to a multiple of it. CPU: MKL runs a product whose output is 31
      or 85 wide up to 2× slower than 32 or 88 (a 31-wide down-projection of 700 × 384 tokens: 461 µs against 229
      padded, copy included); CUDA: tensor-core kernels want 16-byte aligned rows (untimed there: bench_adapter's
      unpadded arms measure it).
    - softmax_gate: the gate as a row-wise softmax of [−l, l] (CPU, where a vectorised elementwise kernel rounds a
      row by its position, so a sample's gate would depend on its batch); else s = tanh(l) = g2 − g1 in one
      kernel, the column weights α/2r·(1 ± s) (TaskRouting.column_coefficients), where the softmax takes five.
    - unaligned_output: expert_B's R + 3 wide gradient written by the product in place (CPU BLAS: as fast as a
      fresh aligned product plus an add); else a fresh product and one add.
    - expand_reduced_columns: a (tokens, 1) bf16/fp16 column expanded to its partner's shape as it is cast (CPU
      kernels broadcast a reduced-precision column slowly: an addcmul of 576 × 31 in bf16 33 µs broadcasting, 5 µs
      on equal shapes)."""
    cpu_dropout_mask: bool = False
    rank_alignment: int = 1
    softmax_gate: bool = False
    unaligned_output: bool = False
    expand_reduced_columns: bool = False


KERNEL_POLICIES = {
    "cpu": KernelPolicy(cpu_dropout_mask=True, rank_alignment=8, softmax_gate=True, unaligned_output=True,
                        expand_reduced_columns=True),
    "cuda": KernelPolicy(rank_alignment=8),
}
GENERIC_POLICY = KernelPolicy()  # any other device: the plainest kernels


def kernel_policy(device: torch.device) -> KernelPolicy:
    return KERNEL_POLICIES.get(device.type, GENERIC_POLICY)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


DROPOUT_LEVELS = 2 ** 15  # 15-bit levels: each int16 of an int64 from random_(), its sign bit cleared


def _dropout_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask for x, pre-scaled as F.dropout's (1/(1 − p) where kept, 0 where dropped), in x's dtype.
    Drawn as 15-bit integers against a threshold, p rounded to a multiple of 2^-15 and the scale taken from the
    rounded p, so the mask's mean is exactly 1 in expectation. The integers are the four 16-bit chunks of int64
    draws (random_() fills an int64 with 63 random bits at about the cost of an int16's 15), sign bits cleared. A
    float mask, as CPU kernels multiply by a bool mask slowly."""
    threshold = round(p * DROPOUT_LEVELS)
    if threshold == 0:
        return torch.ones_like(x)
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
    levels = draws.view(torch.int16)[:x.numel()].view(x.shape).bitwise_and_(DROPOUT_LEVELS - 1)
    return (levels >= threshold).to(x.dtype).mul_(DROPOUT_LEVELS / (DROPOUT_LEVELS - threshold))


def _dropout(x: torch.Tensor, p: float, policy: KernelPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop(x), its mask for _dropout_grad)."""
    if policy.cpu_dropout_mask and not torch.compiler.is_compiling():
        keep = _dropout_keep(x, p)
        return x * keep, keep
    return torch.native_dropout(x, p, True)


def _dropout_grad(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """d loss / d x from d loss / d drop(x) (in place for _dropout_keep's mask)."""
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))
    return grad.mul_(mask)


def _rank_padding(width: int, policy: KernelPolicy) -> int:
    """Zero columns to add to a rank-space width, up to a multiple of the policy's rank_alignment."""
    return -width % policy.rank_alignment


def _padded_cat(parts: list, dim: int, policy: KernelPolicy) -> torch.Tensor:
    """cat(parts, dim) with zeros added along dim up to _rank_padding's width; parts[0] itself when alone and
    already that wide."""
    pad = _rank_padding(sum(part.shape[dim] for part in parts), policy)
    if len(parts) == 1 and not pad:
        return parts[0]
    if pad:
        shape = list(parts[0].shape)
        shape[dim] = pad
        parts = parts + [parts[0].new_zeros(shape)]
    return torch.cat(parts, dim)


def _aligned_copy(t: torch.Tensor, policy: KernelPolicy) -> torch.Tensor:
    """A copy of t (rows, columns) whose rows lie _rank_padding's multiple apart: a view of a wider buffer, so that
    products reading its leading columns get an aligned leading dimension (expert_B's R + 3 columns are odd
    wherever R is). A plain clone where t is that wide already."""
    columns = t.shape[1]
    pad = _rank_padding(columns, policy)
    if not pad:
        return t.clone()
    return t.new_empty(t.shape[0], columns + pad)[:, :columns].copy_(t)


def _per_row(column: torch.Tensor, like: torch.Tensor, policy: KernelPolicy) -> torch.Tensor:
    """A (tokens, 1) column in like's dtype, to multiply into like (tokens, width)."""
    if policy.expand_reduced_columns and like.dtype in (torch.float16, torch.bfloat16):
        return column.expand_as(like).to(like.dtype)
    return column.to(like.dtype)


def _first_columns(t: torch.Tensor, count: int) -> torch.Tensor:
    return t if t.shape[1] == count else t[:, :count]


_LOGIT_PAIRS: dict = {}  # per device, fp32 [−1, 1]: a logit column times it is [−l, l]


def _logit_pair(device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # a constant of the graph; the cache's first fill would recompile
        return torch.tensor([-1.0, 1.0], device=device)
    pair = _LOGIT_PAIRS.get(device)
    if pair is None:
        pair = _LOGIT_PAIRS[device] = torch.tensor([-1.0, 1.0], device=device)
    return pair


def _task_gate(logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((g1, g2) (tokens, 2), 2·g1·g2 (tokens, 1)), fp32 at least, from l = p·x (tokens, 1), the gate row's column
    of the down-projection's output: the expert-motivated gate softmax(W_g·x) with W_g = [−p; p] is softmax([−l, l]),
    and 2·g1·g2 = dg2/dl for the backward. W_g trained as two rows from its zero init keeps W_g[0] = −W_g[1] (their
    gradients are opposite), so storing p alone is the same gate and, under Adam, which is blind to a gradient's
    scale, the same training. [−l, l] is l times an fp32 [−1, 1] (one kernel, which also promotes a bf16 l)."""
    gates = torch.softmax(logit * _logit_pair(logit.device), dim=-1)
    return gates, gates.prod(1, keepdim=True) * 2.0


def _gate_pair(gates: torch.Tensor) -> torch.Tensor:
    """(g1, g2) (tokens, 2), fp32 at least, from a pass's gates: (g1, g2) already, or the tanh form's s."""
    if gates.shape[1] == 2:
        return gates
    return (_at_least_fp32(gates) * _logit_pair(gates.device)).add_(1.0).mul_(0.5)


def _vid_value(residual_sq: torch.Tensor, variance: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """MIM from every channel's Σ_t v_c² over `tokens` real tokens: the mean over tokens and channels of
    ½[v²/σ² + log σ²], summed over layers when the tensors are (layers, d_out)."""
    return ((residual_sq / variance).sum() / tokens + torch.log(variance).sum()) * (0.5 / variance.shape[-1])


def _vid_var_grad(grad_mim, residual_sq, variance, var_slope, tokens) -> torch.Tensor:
    """d MIM / d var, the raw variance parameter (σ² = softplus(var) + eps, var_slope = sigmoid(var))."""
    inv_var = variance.reciprocal()
    return grad_mim * (0.5 / variance.shape[-1]) * inv_var * (1.0 - residual_sq * inv_var / tokens) * var_slope


class _MaskedDelta(torch.autograd.Function):
    """y = base_out + (z ⊙ coef)·Bᵀ with [z | l] = drop(x)·[A; p]ᵀ and coef = column_base + s·column_slope
    (TaskRouting.column_coefficients: α/r·g1 on the universal columns, α/r·g2 on the token's own task's, 0 elsewhere),
    s = g2 ("softmax" gate_form) or tanh(l) ("tanh"; None without a gate). Every rank-space tensor is W wide (R
    expert columns, the gate's, the pad), coef 0 past R, so elementwise work runs on whole rows (a strided bf16
    operand runs 4-8× slower on CPU). The products with B read U = R + pad columns: the regressor's where expert_B
    has them (coef is 0 there), else a zero pad. Returns (y, gates, z, mim_B): gates for routing statistics (not
    differentiable); with `mim`, the down-projection's output and a row-aligned copy of expert_B (never the
    parameter, which ZeRO-3 releases after the forward) for _GroupMIMLoss, whose gradients join the delta's in this
    node's backward: one gradient per parameter per step. y is base_out updated in place in eager, a fresh tensor
    under torch.compile."""

    @staticmethod
    def forward(ctx, base_out, x, expert_A, expert_B, rank, mim, column_base, column_slope, gate_form, scaling,
                dropout, policy):
        ctx.set_materialize_grads(False)
        keep = None
        xd = x
        if dropout > 0:
            xd, keep = _dropout(x, dropout, policy)
        R, gated = rank, gate_form is not None
        down = _padded_cat([expert_A], 0, policy)  # [A | gate row | zero pad], (W, d_in)
        U, P = R + _rank_padding(R, policy), expert_B.shape[1]
        # MIM's copy of expert_B, experts and regressor, its rows aligned as the products below want them
        mim_B = _aligned_copy(expert_B, policy) if mim else None
        # [B | pad] (d_out, U), U ≤ W: expert_B's first U columns where its regressor columns reach U (coef is 0
        # past R then): MIM's copy, else expert_B itself (ZeRO-3 gathers the parameter again for the backward)
        if P >= U and column_base is not None:
            up_source = expert_B if mim_B is None else mim_B
        else:
            up_source = _padded_cat([expert_B if P == R else expert_B[:, :R]], 1, policy)
        up = _first_columns(up_source, U)
        z = xd @ down.t()  # [z | l | pad]
        gates = gate_slope = None
        coef = column_base  # (tokens, W) or None (every column α/r)
        tanh_gate = gate_form == "tanh"
        if tanh_gate:  # gate_slope holds s itself: ds/dl = 1 − s² (tanh_backward)
            gates = gate_slope = torch.tanh(z[:, R:R + 1])
            coef = torch.addcmul(column_base, gates, column_slope)
        elif gated:
            gates, gate_slope = _task_gate(z[:, R:R + 1])
            coef = torch.addcmul(column_base, _per_row(gates[:, 1:], column_slope, policy), column_slope)
        zc = z * coef if coef is not None else z  # 0 past R: the gate's column and the pad
        alpha = 1.0 if coef is not None else scaling
        if torch.compiler.is_compiling():  # an output aliasing an input does not trace
            y = torch.addmm(base_out, zc[:, :U], up.t(), alpha=alpha)
        else:  # in place in eager: bench_adapter's C-LoRAE step 1.05x peft LoRA's out of place, 1.00x in place (CPU)
            y = base_out.addmm_(zc[:, :U], up.t(), alpha=alpha)
            ctx.mark_dirty(y)
        if gates is not None:
            ctx.mark_non_differentiable(gates)
        mim_inputs = (z, mim_B) if mim else (None, None)
        ctx.scaling, ctx.dropout, ctx.rank, ctx.B_width, ctx.up_width = scaling, dropout, R, P, U
        ctx.tanh_gate, ctx.policy = tanh_gate, policy
        ctx.save_for_backward(x if keep is None else xd, keep, down, up_source, column_slope, gate_slope, coef, zc,
                              z if gates is not None else None)
        return (y, gates) + mim_inputs

    @staticmethod
    def backward(ctx, grad_y, _grad_gates, grad_z_mim, grad_mim_B):
        xd, keep, down, up_source, column_slope, gate_slope, coef, zc, z = ctx.saved_tensors
        R, P, U, W = ctx.rank, ctx.B_width, ctx.up_width, down.shape[0]
        up = _first_columns(up_source, U)
        if grad_y is None:
            grad_y = xd.new_zeros(xd.shape[0], up.shape[0])
        grad_coefd = grad_y @ up  # d loss / d (z ⊙ coef), (tokens, U)
        # expert_B's gradient (d_out, P): MIM's (a fresh tensor) with the delta's added on the U columns the
        # product reads, in one kernel (0 past R, as zc is); without MIM the delta's U wide, sliced to R: products
        # whose output is U wide run faster on CPU BLAS than 31 wide
        alpha = 1.0 if coef is not None else ctx.scaling
        if P == R:  # no regressor columns (no MIM)
            grad_B = grad_y.t() @ zc[:, :U]
            if alpha != 1.0:
                grad_B.mul_(alpha)
            grad_B = grad_B[:, :R]
        else:
            grad_B = grad_mim_B if grad_mim_B is not None else grad_y.new_zeros(grad_y.shape[1], P)
            reach = min(U, P)  # the columns the product writes: the U it reads, or all P (zc is 0 past R)
            if _rank_padding(P, ctx.policy) and not ctx.policy.unaligned_output:
                # written into P-wide rows the product's output would be unaligned: a fresh one, then one add
                grad_B[:, :reach].add_((grad_y.t() @ zc[:, :U])[:, :reach], alpha=alpha)
            else:
                grad_B[:, :reach].addmm_(grad_y.t(), zc[:, :reach], alpha=alpha)
        # d loss / d [z | l | pad], the down-projection's output, so that one product gives A's and the gate's
        # gradients and one product x's. Zero past R (coef is) but for the gate's column.
        gated = gate_slope is not None
        if grad_z_mim is None:
            grad_z = grad_coefd * (coef[:, :U] if coef is not None else ctx.scaling)
        elif coef is not None:  # MIM's gradient joins in the same kernel
            grad_z = torch.addcmul(grad_z_mim[:, :U], grad_coefd, coef[:, :U])
        else:
            grad_z = torch.add(grad_z_mim[:, :U], grad_coefd, alpha=ctx.scaling)
        parts = [grad_z[:, :R]]
        if gated:  # d loss / d s = Σ over the token's columns of d loss / d coef · d coef / d s, times ds/dl
            grad_gate = (grad_coefd * z[:, :U]).mul_(column_slope[:, :U]).sum(1, keepdim=True)
            grad_logit = torch.ops.aten.tanh_backward(grad_gate, gate_slope) if ctx.tanh_gate else grad_gate * gate_slope
            if grad_logit.dtype != grad_z.dtype:  # the softmax form's slope is fp32 (a same-dtype .to still dispatches)
                grad_logit = grad_logit.to(grad_z.dtype)
            parts.append(grad_logit)
        if W > R + gated:  # the pad: zero (the products with B read none of it or coef is 0 there)
            parts.append(grad_z.new_zeros(grad_z.shape[0], W - R - gated))
        grad_down_out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        grad_down = grad_down_out.t() @ xd  # A's gradient and the gate row's: all of it without a pad
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = grad_down_out @ down
            if keep is not None:
                grad_x = _dropout_grad(grad_x, keep, ctx.dropout)
        grad_A = grad_down[:R + gated]
        return (grad_y, grad_x, grad_A, grad_B) + (None,) * 8


class MaskedMIMInputs(NamedTuple):
    """What a masked-path layer call leaves for its MIM term (_MaskedDelta's z and expert_B, experts and regressor,
    the routing's signs and real-token count); mim_loss() computes it together with the other calls of the same
    shapes."""
    z: torch.Tensor
    expert_B: torch.Tensor
    signs: torch.Tensor
    real_tokens: torch.Tensor
    universal_rank: int
    rank: int  # R, B's expert columns (the regressor's follow)
    detach_teacher: bool
    routing: object  # the TaskRouting that made the signs
    shape: tuple  # (batch, tokens per sample) of the layer input the signs were made for

    def joins(self, other: "MaskedMIMInputs") -> bool:
        """Whether the two calls' terms compute as one group: signs of one routing for the same input shape (equal
        values: in eager the very tensor the routing caches, under torch.compile one computed per call) and the
        same shapes."""
        return (self.routing is other.routing and self.shape == other.shape and self.signs.shape == other.signs.shape
                and self.z.shape == other.z.shape and self.z.dtype == other.z.dtype
                and self.expert_B.shape == other.expert_B.shape and self.expert_B.dtype == other.expert_B.dtype
                and (self.universal_rank, self.rank, self.detach_teacher)
                == (other.universal_rank, other.rank, other.detach_teacher))


def mim_loss(terms: list) -> Optional[torch.Tensor]:
    """The sum of the MIM terms recorded by layer calls (CLoRAELinear.pop_mim_terms), computed a group at a time:
    every call with the same routing and shapes (an encoder's q, k, v, o, ...) in one set of batched kernels,
    instead of a few dozen small ones per layer call (on CPU MIM's share of the default's step over LoRA's went from
    0.08 to 0.05, bench_train). None when nothing was recorded."""
    groups: list[list[MaskedMIMInputs]] = []
    for term in terms:
        group = next((g for g in groups if g[0].joins(term)), None)
        if group is None:
            groups.append([term])
        else:
            group.append(term)
    scalars = []
    for group in groups:
        first = group[0]
        scalars.append(_GroupMIMLoss.apply(first.signs, first.real_tokens, first.universal_rank, first.rank,
                                           first.detach_teacher, *(t.z for t in group),
                                           *(t.expert_B for t in group)))
    if not scalars:
        return None
    return torch.stack(scalars).sum() if len(scalars) > 1 else scalars[0]


def _regressed_experts(expert_B: torch.Tensor, regressor: torch.Tensor, universal_rank: int, rank: int,
                       width: int) -> torch.Tensor:
    """M̃ = [B_U, scale⊙B_task, shift, 0] (layers, d_out, width) from B (layers, d_out, ≥ rank) and the regressor's
    rows [shift; scale; var] (layers, 3, d_out): the columns of Z̃ = [−z_U | z_task |
    1 | 0] (TaskRouting.mim_signs), zero past R + 1."""
    return torch.cat([expert_B[..., :universal_rank],
                      expert_B[..., universal_rank:rank] * regressor[:, PACKED_SCALE, :, None],
                      regressor[:, PACKED_SHIFT, :, None],
                      expert_B.new_zeros(*expert_B.shape[:-1], width - rank - 1)], -1)


class _GroupMIMLoss(torch.autograd.Function):
    """Σ over a group of L layer calls (same routing, same shapes) of each call's MIM term, exact, without a
    tokens × d_out tensor. With Z̃ = [−z_U | z_task | 1 | 0] (z through TaskRouting.mim_signs: the token's own task
    columns only, the constant in column R, zero on padding) and M̃ = [B_U, scale⊙B_task, shift, 0], a real token's
    residual is v = M̃·Z̃_t, so channel c's Σ_t v_c² is (M̃·C·M̃ᵀ)_cc with C = Z̃ᵀZ̃. The backward reuses M̃·C for B,
    the regressor and the variance, and zeroes M̃ᵀWM̃ where z's gradient does not reach (past R; the universal
    columns under a detached teacher). Batched over the layers (bmm), in fp32 at least (the expansion cancels
    terms), the regressors transposed to (L, 3, d_out) (a strided column runs 5-7× slower on CPU). Inputs: signs,
    real_tokens, r, R, detach_teacher, then the L z's and the L expert_B copies (_MaskedDelta's outputs)."""

    @staticmethod
    def forward(ctx, signs, real_tokens, universal_rank, rank, detach_teacher, *tensors):
        count = len(tensors) // 2
        z = torch.stack(tensors[:count])  # (L, T, W)
        B = _at_least_fp32(torch.stack(tensors[count:]))  # (L, d_out, R + 3): experts, then the regressor
        regressor = B[..., rank:rank + MIM_COLUMNS].transpose(1, 2).contiguous()  # (L, 3, d_out)
        W, r = z.shape[2], universal_rank
        Z = _at_least_fp32(z) * signs[:, :W]  # [−z_U, own z_t, 1, 0]: the constant over z's gate or pad column
        constant = signs[:, rank:rank + 1].expand(count, -1, -1)
        Z = torch.cat([Z[..., :rank], constant, Z[..., rank + 1:]] if W > rank else [Z, constant], -1)
        M = _regressed_experts(B, regressor, r, rank, Z.shape[2])
        variance = F.softplus(regressor[:, PACKED_VAR]) + MIM_EPS  # (L, d_out)
        MC = M @ (Z.transpose(1, 2) @ Z)
        residual_sq = (MC * M).sum(2)  # Σ_t v_c² per layer and channel: the diagonal of M̃·C·M̃ᵀ
        ctx.save_for_backward(signs, real_tokens, B, regressor, M, Z, MC, residual_sq, variance)
        ctx.r, ctx.rank, ctx.detach_teacher = r, rank, detach_teacher
        ctx.z_width, ctx.dtypes = W, (tensors[0].dtype, tensors[count].dtype)
        # fp32 at least, whatever z's dtype: summed over a model's layers MIM is some 57 (mostly ½·log σ²), where a
        # bf16 value moves in steps of 0.25 and its logged trend is lost
        return _vid_value(residual_sq, variance, real_tokens)

    @staticmethod
    def backward(ctx, grad_mim):
        signs, tokens, B, regressor, M, Z, MC, residual_sq, variance = ctx.saved_tensors
        r, R, W, (z_dtype, B_dtype) = ctx.r, ctx.rank, ctx.z_width, ctx.dtypes
        d_out = M.shape[1]
        grad_mim = _at_least_fp32(grad_mim)
        weight = (grad_mim / (tokens * d_out * variance))[..., None]  # d mim / d M̃ = weight ⊙ M̃C, per channel
        # d mim / d Z̃ = Z̃·M̃ᵀ(weight ⊙ M̃), then to z through the signs, on the columns z reaches: the task experts'
        # (and the universal expert's unless the teacher is detached), not the constant's nor any past R
        reach = M.transpose(1, 2) @ (M[..., :W] * weight)  # (L, width, W)
        reach[..., R:] = 0
        if ctx.detach_teacher:
            reach[..., :r] = 0
        grad_z = ((Z @ reach) * signs[:, :W]).to(z_dtype)
        grad_task = MC[..., r:R] * (weight * regressor[:, PACKED_SCALE, :, None])
        grad_universal = MC[..., :r] * weight if not ctx.detach_teacher else grad_task.new_zeros(*MC.shape[:2], r)
        columns = [None] * MIM_COLUMNS  # (L, d_out) each, into the regressor's columns of B
        columns[PACKED_SHIFT] = MC[..., R] * weight[..., 0]
        columns[PACKED_SCALE] = (MC[..., r:R] * B[..., r:R]).sum(2) * weight[..., 0]
        columns[PACKED_VAR] = _vid_var_grad(grad_mim, residual_sq, variance, torch.sigmoid(regressor[:, PACKED_VAR]),
                                            tokens)
        grad_B = torch.cat([grad_universal, grad_task, torch.stack(columns, 2)], 2).to(B_dtype)
        return (None,) * 5 + grad_z.unbind(0) + grad_B.unbind(0)


class CLoRAELinear(nn.Module):
    """A frozen nn.Linear plus a universal LoRA expert, N task experts and a per-token 2-way gate."""

    kernel_policy: Optional[KernelPolicy] = None  # None: the device's (KERNEL_POLICIES); set_kernel_policy forces one

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
        n, d_in, d_out = config.num_tasks, base.in_features, base.out_features
        self.universal_rank = config.rank if config.uses_universal else 0
        self.task_rank = config.expert_task_rank if config.uses_task_experts else 0
        self.expert_columns = columns = self.universal_rank + n * self.task_rank  # R
        self.uses_gate = config.uses_gate
        # LoRA init: A kaiming-uniform (as nn.Linear, fan-in d_in for every expert), B zero, so the adapted
        # model starts equal to the base model. The gate's row p of expert_A (W_g = [−p; p]) starts at zero: both
        # experts start with weight 0.5.
        self.expert_A = nn.Parameter(torch.zeros(columns + self.uses_gate, d_in, **factory))
        nn.init.kaiming_uniform_(self.expert_A[:columns], a=math.sqrt(5))
        # With MIM, expert_B's last three columns are the VID regressor [shift | scale | var] (mim_regressor):
        # mu(D) = scale * D + shift, per-channel variance softplus(var) + eps, starting as the identity with
        # variance 5. Every parameter tensor costs a step the same fixed work whatever its size (DeepSpeed's bf16
        # optimiser wrapper some 67 small ops per tensor, ZeRO-2 on a GPU about 17 kernels), so the regressor rides
        # on expert_B: C-LoRAE then has LoRA's two tensors per layer, and the masked pass's products read the
        # regressor's columns as their pad (coef is 0 there) instead of a copy with a zero column.
        self.expert_B = nn.Parameter(torch.zeros(d_out, columns + MIM_COLUMNS * config.uses_mim, **factory))
        if config.uses_mim:
            init = math.log(math.expm1(MIM_INITIAL_VARIANCE - MIM_EPS))
            with torch.no_grad():
                regressor = self.mim_regressor
                regressor[:, PACKED_SHIFT], regressor[:, PACKED_SCALE], regressor[:, PACKED_VAR] = 0.0, 1.0, init
        self.routing: Optional[TaskRouting] = None
        self._mim_terms: list = []  # MaskedMIMInputs: mim_loss() sums them
        # True while activation checkpointing recomputes this layer's forward during backward
        # (adapters.model.checkpoint_context_fn): it computes and saves what it did, records nothing again.
        self.replaying = False
        # Per task, Σ g1 and Σ g2 over the tokens routed with record_stats (their sum counts the tokens)
        self.register_buffer("gate_stats", torch.zeros(n, 2, dtype=torch.float32, device=base.weight.device),
                             persistent=False)

    @property
    def mim_regressor(self) -> torch.Tensor:
        """The MIM regressor (d_out, 3), columns [shift | scale | var]: a view of expert_B's last three columns."""
        if not self.config.uses_mim:
            raise AttributeError("this layer has no MIM regressor (its config does not use MIM)")
        return self.expert_B[:, self.expert_columns:]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight: HF models read `.weight` of their linears (e.g. for dtype)."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def split_experts(self, fused_A: torch.Tensor, fused_B: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of fused (R [+ 1], d_in) / (d_out, R [+ 3]) tensors — weights or their gradients — per expert:
        universal_A (r, d_in), universal_B (d_out, r), task_A (N, r_t, d_in), task_B (N, d_out, r_t), with a
        gate gate_row (d_in,), its p, and with MIM mim_regressor (d_out, 3)."""
        r, r_t, n, R = self.universal_rank, self.task_rank, self.config.num_tasks, self.expert_columns
        parts = {}
        if r:
            parts["universal_A"], parts["universal_B"] = fused_A[:r], fused_B[:, :r]
        if r_t:
            parts["task_A"] = fused_A[r:R].view(n, r_t, -1)
            parts["task_B"] = fused_B[:, r:R].reshape(-1, n, r_t).permute(1, 0, 2)
        if self.uses_gate:
            parts["gate_row"] = fused_A[R]
        if self.config.uses_mim:
            parts["mim_regressor"] = fused_B[:, R:]
        return parts

    def expert_weights(self) -> dict[str, torch.Tensor]:
        """The experts' weights (split_experts, the MIM regressor left out) and the gate as the paper writes it,
        W_g (2, d_in) = [−p; p]."""
        weights = self.split_experts(self.expert_A.detach(), self.expert_B.detach())
        weights.pop("mim_regressor", None)
        if self.uses_gate:
            p = weights.pop("gate_row")
            weights["gate"] = torch.stack([-p, p])
        return weights

    def forward(self, x: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
            # The autograd Functions below mix no dtypes: run the whole layer in the autocast dtype (its
            # parameters cast like any autocast matmul's, gradients flowing back to the fp32 masters).
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.to(dtype), task_ids, dtype)
        return self._forward(x, task_ids, None)

    def _forward(self, x: torch.Tensor, task_ids: Optional[torch.Tensor], cast) -> torch.Tensor:
        policy = self.kernel_policy or kernel_policy(x.device)
        x2 = x.reshape(-1, x.shape[-1])
        expert_A, expert_B = self.expert_A, self.expert_B
        if cast is not None:
            expert_A, expert_B = expert_A.to(cast), expert_B.to(cast)
            base_out = F.linear(x2, self.base.weight.to(cast), None if self.base.bias is None else self.base.bias.to(cast))
        else:
            base_out = self.base(x2)
        if base_out._base is not None and not torch.compiler.is_compiling():  # a view: the delta goes in in place
            base_out = base_out.clone()
        column_base = column_slope = width = one_hot = routing = None
        gate_form = None if not self.uses_gate else "softmax" if policy.softmax_gate else "tanh"
        shape = (x.shape[0], x2.shape[0] // x.shape[0])  # (samples, tokens a sample)
        if self.task_rank:
            routing = TaskRouting(task_ids, self.config.num_tasks, record_stats=True) if task_ids is not None \
                else self.routing
            if routing is None:
                raise RoutingError("this C-LoRAE layer needs task ids: call it with task_ids= or inside "
                                   "clorae_ds.adapters.task_routing(model, task_ids)")
            width = self.expert_columns + self.uses_gate
            width += _rank_padding(width, policy)  # W: the expert columns, the gate's, the pad
            column_base, column_slope = routing.column_coefficients(
                *shape, self.universal_rank, self.task_rank, self.config.scaling, gate_form, width, x.device, x.dtype)
            if self.uses_gate and routing.record_stats:
                one_hot = routing.one_hot(*shape, x.device, self.gate_stats.dtype)
        dropout = self.config.dropout if self.training else 0.0
        mim = self.config.uses_mim and self.training and torch.is_grad_enabled()
        y, gates, z, mim_B = _MaskedDelta.apply(base_out, x2, expert_A, expert_B, self.expert_columns, mim, column_base,
                                                column_slope, gate_form, self.config.scaling, dropout, policy)
        if mim and not self.replaying:
            self._mim_terms.append(MaskedMIMInputs(
                z, mim_B, routing.mim_signs(*shape, self.universal_rank, self.task_rank, width, x.device),
                routing.real_token_count(*shape, x.device), self.universal_rank, self.expert_columns,
                self.config.mim_detach_teacher, routing, shape))
        if one_hot is not None and not self.replaying:  # addmm_: no Module.__setattr__
            self.gate_stats.addmm_(one_hot.t(), _gate_pair(gates).to(one_hot.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def pop_mim_terms(self) -> list:
        terms, self._mim_terms = self._mim_terms, []
        return terms

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, mode={c.mode}, r={self.universal_rank}, "
                f"r_t={self.task_rank}, tasks={c.num_tasks}")
