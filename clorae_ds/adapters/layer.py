"""The C-LoRAE linear layer: y = W0·x + (α/r)·(g1·U(x) + g2·D_n(x))  (method.md eq. 3-8).

All experts of a layer are stored pre-fused: `expert_A` (R, d_in) and `expert_B` (d_out, R) with R = r + N·r_t
columns laid out [universal | task 0 | ... | task N-1]; with a gate, `expert_A` has one row more, the gate's p
(W_g = [−p; p], _task_gate). Two paths compute the same delta (config.expert_path):
- own-task (_OwnTaskDelta + _OwnTaskMIMLoss): a batch sorted by task runs segment by segment through each
  task's K = r + r_t columns [universal | own task], the fewest FLOPs;
- masked (_MaskedDelta): any batch runs as one low-rank pass, z = drop(x)·Aᵀ over all R columns, each token's
  columns scaled by α/r times its gate weight and zeroed outside its own task (per-token column weights built
  once per step), y += (z ⊙ coef)·Bᵀ: a fixed handful of kernels whatever the task mix, at the price of N·r_t
  instead of r_t task columns in the thin matmuls. Its MIM terms are computed at collection (mim_loss), every
  layer call of the same routing and shapes in one batched _GroupMIMLoss. On CPU, where per-kernel overhead
  dominates at small ranks, this is the faster path (`auto` takes it).
On both paths the gate's logit comes from the same down-projection as the experts (its row of expert_A), so the
gate reads the adapter's input after dropout as the experts do (the same input at evaluation).
On either path every rank touches the same tensors every step, and absent tasks' experts get exact zero
gradients (ZeRO-3 gathers and reduces per parameter; ranks that differ hang). The low-rank work is written as
autograd Functions with hand-written backwards: the delta is accumulated into the base output in place, and
nothing is saved that autograd would not need. On CPU rank-space widths are padded with zeros to a multiple of 8
(_rank_padding): the own-task path's products whose output is K wide, the masked path's whole rank space.

The MIM term is exact and computed in rank space from Gram matrices: O(T·K² + d_out·K²) matmul work per layer
call, in a fixed number of kernels per group of layer calls on the masked path. Computing it elementwise from the
universal and task outputs U and D instead (no extra matmul, ~27 passes over a (tokens, d_out) tensor in forward +
backward) was implemented and measured slower at training shapes —
1.33× peft LoRA's step against 1.17× for the Gram form then, 1.09× once the own-task Gram blocks were shared
(bench_adapter's shapes, 1 thread) — and on a GPU those passes are memory-bound where the Gram matmuls are not;
it wins only on FLOP counts at a few hundred tokens per step, where the d_out·K² terms do not amortise. There the
own-task path takes the one block that needs no gradient (the universal expert's, under the detached teacher) in
token space; launchers/report_cost.py prints a lower bound on exact MIM's FLOPs beside what this costs.
"""
from __future__ import annotations

import math
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


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


DROPOUT_LEVELS = 2 ** 15  # 15-bit levels: each int16 of an int64 from random_(), its sign bit cleared


def _dropout_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask for x, pre-scaled as F.dropout's (1/(1 − p) where kept, 0 where dropped), in x's dtype.
    Drawn as 15-bit integers against a threshold, p rounded to a multiple of 2^-15 and the scale taken from the
    rounded p, so the mask's mean is exactly 1 in expectation. The integers are the four 16-bit chunks of int64
    draws (random_() fills an int64 with 63 random bits, an int16 with 15, at about the same cost per element),
    sign bits cleared: on CPU 0.23 ms for 576 × 384 against 0.62 for int16 draws and 1.5 for bernoulli_, where
    the mask was a tenth of a LoRA layer's step. A float mask, as CPU kernels multiply by a bool mask slowly."""
    threshold = round(p * DROPOUT_LEVELS)
    if threshold == 0:
        return torch.ones_like(x)
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
    levels = draws.view(torch.int16)[:x.numel()].view(x.shape).bitwise_and_(DROPOUT_LEVELS - 1)
    return (levels >= threshold).to(x.dtype).mul_(DROPOUT_LEVELS / (DROPOUT_LEVELS - threshold))


CUSTOM_DROPOUT_DEVICES = ("cpu",)  # where _dropout_keep beats torch.native_dropout


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop(x), its mask for _dropout_grad): on CPU x times _dropout_keep's float mask; elsewhere
    torch.native_dropout, one kernel returning a bool mask, where _dropout_keep's half a dozen small kernels
    would cost more than the draws they save (a GPU step of these sizes is launch-bound)."""
    if x.device.type in CUSTOM_DROPOUT_DEVICES:
        keep = _dropout_keep(x, p)
        return x * keep, keep
    return torch.native_dropout(x, p, True)


def _dropout_grad(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """d loss / d x from d loss / d drop(x) (in place for _dropout_keep's mask)."""
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))
    return grad.mul_(mask)


RANK_ALIGNMENT = {"cpu": 8, "cuda": 8}  # per device type, the multiple rank-space widths are zero-padded to


# Devices whose BLAS writes a product into unaligned rows (expert_B's P = R + 3 wide gradient) as fast as into a fresh
# aligned tensor plus an add: CPU (bench_adapter's C-LoRAE step in bf16 1.02-1.03x slower with the fresh product,
# fp32 0.98x: noise-level either way, so the fewer kernels). Elsewhere, where a device aligns rank-space widths,
# tensor cores want the product's output rows aligned too.
UNALIGNED_OUTPUT_DEVICES = ("cpu",)


def _rank_padding(width: int, tensor: torch.Tensor) -> int:
    """Zero columns to add to a rank-space width, up to a multiple of RANK_ALIGNMENT on the tensor's device: on CPU,
    where MKL runs a product whose output is 31 or 85 wide up to 2× slower than 32 or 88 (1 and 2 threads; a 31-wide
    down-projection at 700 × 384 tokens: 461 µs against 229 µs padded, copy included); on CUDA, whose tensor-core
    kernels want 16-byte aligned rows where r 64 makes R = 127 (not yet measured there: an H200 ran C-LoRAE
    without MIM at 1.46x peft LoRA unpadded at 32 × 512 tokens, where our LoRA layer, 64 wide, ran 1.04x;
    bench_adapter's unpadded arms measure the choice). The padding costs a kernel or a few a layer call where a
    step is launch-bound. None on other devices."""
    return -width % RANK_ALIGNMENT.get(tensor.device.type, 1)


def _zeros_along(t: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = count
    return t.new_zeros(shape)


def _padded_cat(parts: list, dim: int) -> torch.Tensor:
    """cat(parts, dim) with zeros added along dim up to _rank_padding's width; parts[0] itself when alone and
    already that wide."""
    pad = _rank_padding(sum(part.shape[dim] for part in parts), parts[0])
    if len(parts) == 1 and not pad:
        return parts[0]
    return torch.cat(parts + [_zeros_along(parts[0], dim, pad)] if pad else parts, dim)


def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of t (rows, columns) whose rows lie _rank_padding's multiple apart: a view of a wider buffer, so that
    products reading its leading columns get an aligned leading dimension (expert_B's R + 3 columns are odd
    wherever R is). A plain clone where t is that wide already."""
    columns = t.shape[1]
    pad = _rank_padding(columns, t)
    if not pad:
        return t.clone()
    return t.new_empty(t.shape[0], columns + pad)[:, :columns].copy_(t)


def _per_row(column: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (tokens, 1) column in like's dtype, to multiply into like (tokens, width): on CPU in bf16 or fp16 expanded
    to like's shape as it is cast (one copy kernel), as CPU kernels broadcast a reduced-precision column slowly (an
    addcmul of 576 × 31 in bf16: 33 µs broadcasting, 5 µs on equal shapes; in fp32 5 µs either way)."""
    if like.device.type == "cpu" and like.dtype in (torch.float16, torch.bfloat16):
        return column.expand_as(like).to(like.dtype)
    return column.to(like.dtype)


def _first_columns(t: torch.Tensor, count: int) -> torch.Tensor:
    return t if t.shape[1] == count else t[:, :count]


def _has_gate_row(expert_A: torch.Tensor, rank: int) -> bool:
    """Whether expert_A carries the gate's row p after its R = rank expert rows."""
    return expert_A.shape[0] > rank


_LOGIT_PAIRS: dict = {}  # per device, fp32 [−1, 1]: a logit column times it is [−l, l]


def _logit_pair(device: torch.device) -> torch.Tensor:
    pair = _LOGIT_PAIRS.get(device)
    if pair is None:
        pair = _LOGIT_PAIRS[device] = torch.tensor([-1.0, 1.0], device=device)
    return pair


def _task_gate(logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((g1, g2) (tokens, 2), 2·g1·g2 (tokens, 1)), fp32 at least, from l = p·x (tokens, 1), the gate row's column
    of a down-projection's output: the expert-motivated gate softmax(W_g·x) with W_g = [−p; p] is softmax([−l, l]),
    and 2·g1·g2 = dg2/dl for the backward. W_g trained as two rows from its zero init keeps W_g[0] = −W_g[1] (their
    gradients are opposite), so storing p alone is the same gate, and under Adam, which is blind to a gradient's
    scale, the same training; it saves a parameter tensor per layer, which DeepSpeed's optimiser wrappers handle one
    by one (some 70 small ops per tensor per step), and the copy that joined a separate gate to the experts' rows.
    [−l, l] is l times an fp32 [−1, 1] (one kernel, which also promotes a bf16 l), and the softmax runs along each
    row of that (tokens, 2) tensor, so that a sample's gate does not depend on its batch: a sigmoid vectorised along
    the tokens rounds a row by its position (vector body or scalar tail)."""
    gates = torch.softmax(logit * _logit_pair(logit.device), dim=-1)
    return gates, gates.prod(1, keepdim=True).mul_(2.0)


SOFTMAX_GATE_DEVICES = ("cpu",)  # where the masked path's gate is _task_gate's row-wise softmax


def _gate_form(x: torch.Tensor) -> str:
    """How the masked path computes its gate on x's device: "softmax" (_task_gate) on CPU, where a vectorised
    elementwise kernel rounds a row by its position; elsewhere "tanh": s = tanh(l) = g2 − g1 = 2·g2 − 1 in one
    kernel in the logit's dtype, the column weights α/2r·(1 ± s) (TaskRouting.column_coefficients) and
    ds/dl = 1 − s² by one tanh_backward, where the softmax form takes five kernels (a GPU step of these sizes is
    launch-bound; on CUDA an elementwise kernel computes each element alike wherever it lies)."""
    return "softmax" if x.device.type in SOFTMAX_GATE_DEVICES else "tanh"


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
    """The masked path: y = base_out + (z ⊙ coef)·Bᵀ with [z | l] = drop(x)·[A; p]ᵀ (expert_A, its gate row p last
    where it has one) and coef = column_base + s·column_slope (TaskRouting.column_coefficients: α/r·g1 on the
    universal columns, α/r·g2 on the token's own task columns, 0 elsewhere), (g1, g2) = softmax([−l, l]), s = g2
    or tanh(l) as gate_form says (_gate_form's "softmax" or "tanh"; None without a gate row). Every
    rank-space tensor is as wide as the down-projection's output W (R expert columns, the gate's column,
    _rank_padding's zeros), coef 0 past R, so that their elementwise work runs on whole rows: CPU kernels run a strided bf16 operand 4-8× slower than a
    contiguous one (an addcmul of 576 × 31: 46 µs against 7). The products with B read its columns zero-padded to
    U = R + _rank_padding(R) ≤ W: where expert_B carries the MIM regressor's columns after its R expert columns
    (CLoRAELinear) and U ≤ R + 3, those columns are the pad, as coef is 0 past R (0 × a finite weight is 0 in the
    product, and the gradient there is 0); otherwise a zero pad is joined. Returns (y, gates, z, mim_B): gates
    each token's (g1, g2) (tokens, 2) or s = tanh(l) (tokens, 1) for routing statistics (_gate_pair; not
    differentiable); with `mim`, what this layer's MIM
    term needs, which _GroupMIMLoss reads for a group of layers at once: the down-projection's output
    [z | l | pad] (tokens, W) and expert_B, experts and regressor, (d_out, R + 3), fresh tensors, never the
    parameter (ZeRO-3 releases it after the layer's forward); that copy of expert_B has its rows aligned
    (_aligned_copy), and the products with B read it in the parameter's place. Their gradients come back into this node's backward
    and join the delta's there, so each parameter gets one gradient per step (ZeRO-2 reduces each once) and only
    when ZeRO-3 has gathered it."""

    @staticmethod
    def forward(ctx, base_out, x, expert_A, expert_B, rank, mim, column_base, column_slope, gate_form, scaling,
                dropout):
        ctx.set_materialize_grads(False)
        keep = None
        xd = x
        if dropout > 0:
            xd, keep = _dropout(x, dropout)
        R, gated = rank, gate_form is not None
        down = _padded_cat([expert_A], 0)  # [A | gate row | zero pad], (W, d_in)
        U, P = R + _rank_padding(R, expert_B), expert_B.shape[1]
        # MIM's copy of expert_B, experts and regressor, its rows aligned as the products below want them
        mim_B = _aligned_copy(expert_B) if mim else None
        # [B | pad] (d_out, U), U ≤ W: expert_B's first U columns where its regressor columns reach U (coef is 0
        # past R then): MIM's copy, else expert_B itself (ZeRO-3 gathers the parameter again for the backward)
        if P >= U and column_base is not None:
            up_source = expert_B if mim_B is None else mim_B
        else:
            up_source = _padded_cat([expert_B if P == R else expert_B[:, :R]], 1)
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
            coef = torch.addcmul(column_base, _per_row(gates[:, 1:], column_slope), column_slope)
        zc = z * coef if coef is not None else z  # 0 past R: the gate's column and the pad
        base_out.addmm_(zc[:, :U], up.t(), alpha=1.0 if coef is not None else scaling)
        ctx.mark_dirty(base_out)
        if gates is not None:
            ctx.mark_non_differentiable(gates)
        mim_inputs = (z, mim_B) if mim else (None, None)
        ctx.scaling, ctx.dropout, ctx.rank, ctx.B_width, ctx.up_width = scaling, dropout, R, P, U
        ctx.tanh_gate = tanh_gate
        ctx.save_for_backward(x if keep is None else xd, keep, down, up_source, column_slope, gate_slope, coef, zc,
                              z if gates is not None else None)
        return (base_out, gates) + mim_inputs

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
            if _rank_padding(P, grad_B) and grad_B.device.type not in UNALIGNED_OUTPUT_DEVICES:
                # written into P-wide rows the product's output would be unaligned: a fresh one, then one add
                grad_B[:, :reach].add_((grad_y.t() @ zc[:, :U])[:, :reach], alpha=alpha)
            else:
                grad_B[:, :reach].addmm_(grad_y.t(), zc[:, :reach], alpha=alpha)
        # d loss / d [z | l | pad], the down-projection's output, so that one product gives A's and the gate's
        # gradients and one product x's. Zero past R (coef is) but for the gate's column, written last.
        gated = gate_slope is not None
        grad_down_out = grad_y.new_empty(grad_y.shape[0], W)
        grad_z = grad_down_out[:, :U]  # all of it on CPU but where R is a multiple of 8 and a gate adds a column
        if max(U, R + gated) < W:  # pad columns the products with B do not reach
            grad_down_out[:, max(U, R + gated):].zero_()
        if grad_z_mim is None:
            torch.mul(grad_coefd, coef[:, :U] if coef is not None else ctx.scaling, out=grad_z)
        elif coef is not None:  # MIM's gradient joins in the same kernel
            torch.addcmul(grad_z_mim[:, :U], grad_coefd, coef[:, :U], out=grad_z)
        else:
            torch.add(grad_z_mim[:, :U], grad_coefd, alpha=ctx.scaling, out=grad_z)
        if gated:  # d loss / d s = Σ over the token's columns of d loss / d coef · d coef / d s, times ds/dl
            grad_gate = (grad_coefd * z[:, :U]).mul_(column_slope[:, :U]).sum(1, keepdim=True)
            if ctx.tanh_gate:
                torch.ops.aten.tanh_backward.grad_input(grad_gate, gate_slope, grad_input=grad_down_out[:, R:R + 1])
            else:
                torch.mul(grad_gate, gate_slope, out=grad_down_out[:, R:R + 1])
        grad_down = grad_down_out.t() @ xd  # A's gradient and the gate row's: all of it without a pad
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = grad_down_out @ down
            if keep is not None:
                grad_x = _dropout_grad(grad_x, keep, ctx.dropout)
        grad_A = grad_down[:R + gated]
        return (grad_y, grad_x, grad_A, grad_B) + (None,) * 7


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

    def group_key(self) -> tuple:
        # The routing caches one signs tensor (and one real-token count) per input shape: same signs, same rows.
        return (id(self.signs), self.z.shape, self.z.dtype, self.expert_B.shape, self.expert_B.dtype,
                self.universal_rank, self.rank, self.detach_teacher)


def mim_loss(terms: list) -> Optional[torch.Tensor]:
    """The sum of the MIM terms recorded by layer calls (CLoRAELinear.pop_mim_terms): the own-task path's are
    scalars already; the masked path's are MaskedMIMInputs, computed here a group at a time — every call with
    the same routing and shapes (an encoder's q, k, v, o, ...) in one set of batched kernels, instead of a few
    dozen small ones per layer call (on CPU MIM's share of the default's step over LoRA's went from 0.08 to 0.05,
    bench_train). None when nothing was recorded."""
    scalars = [t for t in terms if isinstance(t, torch.Tensor)]
    groups: dict[tuple, list[MaskedMIMInputs]] = {}
    for term in terms:
        if isinstance(term, MaskedMIMInputs):
            groups.setdefault(term.group_key(), []).append(term)
    for group in groups.values():
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
    M = expert_B.new_zeros(*expert_B.shape[:-1], width)
    M[..., :universal_rank] = expert_B[..., :universal_rank]
    torch.mul(expert_B[..., universal_rank:rank], regressor[:, PACKED_SCALE, :, None], out=M[..., universal_rank:rank])
    M[..., rank] = regressor[:, PACKED_SHIFT]
    return M


class _GroupMIMLoss(torch.autograd.Function):
    """Σ over a group of L masked-path layer calls (same routing, same shapes) of each call's MIM term (method.md
    §2): the mean over real tokens and channels of ½[(mu(D) − U)²/σ² + log σ²], mu(D) = scale⊙D + shift,
    σ² = softplus(var) + eps, exact, without a (tokens × d_out) tensor. With Z̃ = [−z_U | z_task | 1 | 0] (the
    down-projection's output z through the signs of TaskRouting.mim_signs: each token's own task columns only,
    the constant in column R, all zero on padding) and M̃ = [B_U, scale⊙B_task, shift, 0], a real token's
    residual is v = M̃·Z̃_t, so channel c's Σ_t v_c² is (M̃·C·M̃ᵀ)_cc with C = Z̃ᵀZ̃: a square Gram over the tokens
    and M̃·C (d_out × width) per layer, which the backward reuses for B, the regressor and the variance. Z̃ is as
    wide as z where z has a column past R (the gate's or a pad: the constant takes it), else one wider: 32 rather
    than 33 columns at the default's r 16, which the CPU's batched products run 30 % faster. The backward's
    M̃ᵀWM̃ is zeroed on the columns z's gradient does not reach — past R, and the universal expert's when the
    teacher is detached — so that z's gradient comes out of one product whole. Batched over the group's layers
    (bmm), computed in fp32 at least (the expansion cancels terms); the regressors transposed to (L, 3, d_out), as
    CPU kernels run a strided column 5-7× slower (softplus of 30 × 384: 144 µs against 20). The gradients are
    written in the inputs' dtypes directly, expert_B's one tensor per layer (experts and regressor). Inputs: signs,
    real_tokens, r, R, detach_teacher, then the L z's and the L expert_B's (_MaskedDelta's outputs, so the
    gradients go back through that node)."""

    @staticmethod
    def forward(ctx, signs, real_tokens, universal_rank, rank, detach_teacher, *tensors):
        count = len(tensors) // 2
        z = torch.stack(tensors[:count])  # (L, T, W)
        B = _at_least_fp32(torch.stack(tensors[count:]))  # (L, d_out, R + 3): experts, then the regressor
        regressor = B[..., rank:rank + MIM_COLUMNS].transpose(1, 2).contiguous()  # (L, 3, d_out)
        W, r = z.shape[2], universal_rank
        Z = z.new_empty(count, z.shape[1], signs.shape[1], dtype=_at_least_fp32(z).dtype)  # [−z_U, own z_t, 1, 0]
        torch.mul(z, signs[:, :W], out=Z[..., :W])
        Z[..., rank] = signs[:, rank]  # the constant, over z's gate or pad column
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
        grad_z = torch.mul(Z @ reach, signs[:, :W], out=Z.new_empty(Z.shape[0], Z.shape[1], W, dtype=z_dtype))
        grad_B = B.new_zeros(B.shape, dtype=B_dtype)
        torch.mul(MC[..., r:R], weight * regressor[:, PACKED_SCALE, :, None], out=grad_B[..., r:R])
        if not ctx.detach_teacher:
            torch.mul(MC[..., :r], weight, out=grad_B[..., :r])
        columns = [None] * MIM_COLUMNS  # (L, d_out) each, into the regressor's columns of B
        columns[PACKED_SHIFT] = MC[..., R] * weight[..., 0]
        columns[PACKED_SCALE] = (MC[..., r:R] * B[..., r:R]).sum(2) * weight[..., 0]
        columns[PACKED_VAR] = _vid_var_grad(grad_mim, residual_sq, variance, torch.sigmoid(regressor[:, PACKED_VAR]),
                                            tokens)
        grad_B[..., R:R + MIM_COLUMNS] = torch.stack(columns, 2)
        return (None,) * 5 + grad_z.unbind(0) + grad_B.unbind(0)


class _OwnTaskDelta(torch.autograd.Function):
    """The delta of _MaskedDelta for a batch whose tasks come in contiguous row segments (the collator sorts
    each batch by task): each segment runs through its own K = r + r_t columns [universal | own task] only (and
    the gate row), accumulated into the base output in place. Returns (y, z, gates) with z (tokens, K) each
    row's own columns (for the MIM loss); gates (tokens, 2), (g1, g2), are for routing statistics (not
    differentiable)."""

    @staticmethod
    def forward(ctx, base_out, x, expert_A, expert_B, segments, universal_rank, rank, scaling, dropout):
        ctx.set_materialize_grads(False)
        r = universal_rank
        keep = None
        xd = x
        if dropout > 0:
            xd, keep = _dropout(x, dropout)
        views = _segment_views(segments, expert_A, expert_B, r, rank)
        K = r + segments[0][2] - segments[0][1]
        z_and_logit = x.new_empty(x.shape[0], views[0][2][0].shape[0])  # [z | l | pad]
        for _, (start, stop), (A_seg, _) in views:
            torch.mm(xd[start:stop], A_seg.t(), out=z_and_logit[start:stop])
        z = z_and_logit[:, :K]
        gated = _has_gate_row(expert_A, rank)
        gates, gate_slope = _task_gate(z_and_logit[:, K:K + 1]) if gated else (None, None)
        task_weight = gates[:, 1:].to(x.dtype) if gates is not None else None
        zc = _gated(z, task_weight, r, scaling)
        for _, (start, stop), (_, B_seg) in views:
            base_out[start:stop].addmm_(zc[start:stop], B_seg[:, :K].t())
        ctx.mark_dirty(base_out)
        if gates is not None:
            ctx.mark_non_differentiable(gates)
        ctx.segments, ctx.r, ctx.rank, ctx.scaling, ctx.dropout = segments, r, rank, scaling, dropout
        ctx.save_for_backward(x if keep is None else xd, keep, expert_A, expert_B, gate_slope, task_weight, z)
        return base_out, z, gates

    @staticmethod
    def backward(ctx, grad_y, grad_z_extra, _grad_gates):
        xd, keep, expert_A, expert_B, gate_slope, task_weight, z = ctx.saved_tensors
        r, scaling = ctx.r, ctx.scaling
        if grad_y is None:
            grad_y = xd.new_zeros(xd.shape[0], expert_B.shape[0])
        zc = _gated(z, task_weight, r, scaling)
        grad_A, grad_B = torch.zeros_like(expert_A), torch.zeros_like(expert_B)
        views = _segment_views(ctx.segments, expert_A, expert_B, r, ctx.rank)
        K = z.shape[1]
        grad_zc = z.new_empty(z.shape[0], views[0][2][1].shape[1])
        for _, (start, stop), (_, B_seg) in views:
            torch.mm(grad_y[start:stop], B_seg, out=grad_zc[start:stop])
        grad_zc = grad_zc[:, :K]
        for task_columns, (start, stop), (A_seg, B_seg) in views:
            grad_B_seg = (zc[start:stop].t() @ grad_y[start:stop]).t()  # (d_out, K)
            grad_B[:, :r] += grad_B_seg[:, :r]
            grad_B[:, task_columns] += grad_B_seg[:, r:]
        # d loss / d [z | l], the segments' down-projection outputs without their pad
        gated = gate_slope is not None
        grad_down_out = z.new_empty(z.shape[0], K + gated)
        grad_z = _gated(grad_zc, task_weight, r, scaling, out=grad_down_out[:, :K])
        if grad_z_extra is not None:
            grad_z.add_(grad_z_extra)
        if gated:  # d loss / d g2 (g1 = 1 − g2), times dg2/dl
            grad_prob = ((grad_zc[:, r:] * z[:, r:]).sum(1, keepdim=True)
                         - (grad_zc[:, :r] * z[:, :r]).sum(1, keepdim=True)) * scaling
            torch.mul(grad_prob, gate_slope, out=grad_down_out[:, K:])
        grad_x = xd.new_empty(xd.shape) if ctx.needs_input_grad[1] else None
        for task_columns, (start, stop), (A_seg, _) in views:
            grad_A_seg = grad_down_out[start:stop].t() @ xd[start:stop]
            grad_A[:r] += grad_A_seg[:r]
            grad_A[task_columns] += grad_A_seg[r:K]
            if gated:  # the gate row, last
                grad_A[-1:] += grad_A_seg[K:]
            if grad_x is not None:
                torch.mm(grad_down_out[start:stop], A_seg[:K + gated], out=grad_x[start:stop])
        if grad_x is not None and keep is not None:
            grad_x = _dropout_grad(grad_x, keep, ctx.dropout)
        return grad_y, grad_x, grad_A, grad_B, None, None, None, None, None


def _own_columns(fused: torch.Tensor, r: int, first: int, last: int, dim: int, extra: list = ()) -> torch.Tensor:
    """[universal | one task's | extra] columns of a fused expert tensor along `dim`, zero-padded (_padded_cat): a
    view when adjacent (task 0), with no extra and no pad, a small copy otherwise."""
    if first == r and not extra and not _rank_padding(last, fused):
        return fused.narrow(dim, 0, last)
    return _padded_cat([fused.narrow(dim, 0, r), fused.narrow(dim, first, last - first)] + list(extra), dim)


def _segment_views(segments, expert_A, expert_B, r, rank) -> list:
    """Per segment: its task's columns (a slice), its rows, and (A_seg (K', d_in), B_seg (d_out, K')): A_seg the
    segment's K = r + r_t rows and the gate row (expert_A's row R, where it has one),
    B_seg its K columns, each zero-padded (_rank_padding)."""
    gate_row = [expert_A[rank:]] if _has_gate_row(expert_A, rank) else []
    return [(slice(first, last), (start, stop),
             (_own_columns(expert_A, r, first, last, 0, gate_row), _own_columns(expert_B, r, first, last, 1)))
            for _, first, last, start, stop in segments]


def _gated(z: torch.Tensor, task_weight: Optional[torch.Tensor], r: int, scaling: float,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rank-space activations times α/r and each token's gate weight: g1 = 1 − g2 on the universal columns, g2
    (task_weight, (tokens, 1)) on the task's (no gate: α/r alone); into `out` when given."""
    out = torch.empty_like(z) if out is None else out
    if task_weight is None:
        return torch.mul(z, scaling, out=out)
    weight = task_weight * scaling
    torch.mul(z[:, :r], scaling - weight, out=out[:, :r])
    torch.mul(z[:, r:], weight, out=out[:, r:])
    return out


class _OwnTaskMIMLoss(torch.autograd.Function):
    """The MIM term (as in _MaskedDelta) for the own-task path's z (tokens, K = r + r_t), rows in task segments,
    summed over every segment and normalised by all real tokens. A token's columns are the universal ones and its
    own task's, so the token Gram C = Z̃ᵀZ̃ is block-structured and each block is computed once: C_UU (every
    segment's rows) once per layer, each task's C_Ut and C_tt on its own rows. The forward keeps M̃·C by blocks —
    each task's MC_t, and MC_U (d_out × r, all tasks' contributions summed) when the teacher is not detached —
    whose row-wise products with M̃ give every channel's Σ_t v_c², and which the backward reuses for B, the
    regressor and the variance; the backward's M̃ᵀWM̃ blocks are built only where z's gradient reaches (the task
    columns when the teacher is detached). With the teacher detached only the value needs the universal block
    (its diagonal, in token space where that costs fewer FLOPs) and the cross block is counted from MC_t alone."""

    @staticmethod
    def forward(ctx, z, token_mask, expert_B, regressor, segments, universal_rank, detach_teacher, real_tokens):
        r = universal_rank
        Z = _at_least_fp32(z) if token_mask is None else _at_least_fp32(z) * _at_least_fp32(token_mask)
        B = _at_least_fp32(expert_B)
        regressor32 = _at_least_fp32(regressor)
        scale32, shift32 = regressor32[:, PACKED_SCALE], regressor32[:, PACKED_SHIFT]
        var = regressor32[:, PACKED_VAR]
        variance = F.softplus(var) + MIM_EPS
        M_U = -B[:, :r]  # v = M_U·z_U + M_t·z_t + shift, M_t = scale⊙B_t
        Z_U = Z[:, :r]
        column_sum_U = Z_U.sum(0)
        M_column_sum = M_U @ column_sum_U  # Σ_t (M_U·z_U + M_t·z_t), per channel
        # The universal-universal part of Σ_t v_c². With the teacher detached nothing but this value needs M_U·C_UU;
        # in token space it costs 2·T·r·d_out against 2·(d_out + T)·r², fewer FLOPs below T = d_out·r/(d_out − r)
        # (decoder layers at batch 1).
        MC_U = None
        if not detach_teacher:
            MC_U, residual_sq = M_U @ (Z_U.t() @ Z_U), 0.0  # MC_U: + each task's M_t·C_tU below
        elif Z.shape[0] * (M_U.shape[0] - r) < M_U.shape[0] * r:
            residual_sq = (Z_U @ M_U.t()).square().sum(0)
        else:
            residual_sq = ((M_U @ (Z_U.t() @ Z_U)) * M_U).sum(1)
        blocks = []  # per segment: rows, task columns, B_t, M_t, MC_t, column_sum_t
        for _, first, last, start, stop in segments:
            B_t = B[:, first:last].clone()
            M_t = B_t * scale32[:, None]
            Z_sU, Z_sT = Z[start:stop, :r], Z[start:stop, r:]
            C_Ut, column_sum_t = Z_sU.t() @ Z_sT, Z_sT.sum(0)
            cross = M_U @ C_Ut  # Σ_t v_c·z_t's universal-task part
            MC_t = torch.addmm(cross, M_t, Z_sT.t() @ Z_sT)
            M_column_sum += M_t @ column_sum_t
            if detach_teacher:  # the cross term counted twice here, as M_U·C_Ut·M_tᵀ's diagonal is M_t·C_tU·M_Uᵀ's
                residual_sq = residual_sq + ((MC_t + cross) * M_t).sum(1)
            else:
                MC_U += M_t @ C_Ut.t()
                residual_sq = residual_sq + (MC_t * M_t).sum(1)
            blocks.append(((start, stop), (first, last), B_t, M_t, MC_t, column_sum_t))
        if not detach_teacher:
            residual_sq = residual_sq + (MC_U * M_U).sum(1)
        residual_sq = residual_sq + 2.0 * shift32 * M_column_sum + real_tokens * shift32 * shift32
        loss = _vid_value(residual_sq, variance, real_tokens)
        # Fresh tensors only, never a parameter: this node's backward runs early (the loss adds the MIM terms
        # last), before ZeRO-3 gathers the layer's partitioned parameters again. The per-segment blocks ride on ctx.
        ctx.save_for_backward(Z, token_mask, scale32.clone(), shift32.clone(), torch.sigmoid(var),
                              variance, M_U, MC_U, M_column_sum, residual_sq, column_sum_U, real_tokens)
        ctx.blocks, ctx.B_shape = blocks, B.shape
        ctx.param_dtype, ctx.mim_dtype, ctx.z_dtype = expert_B.dtype, regressor.dtype, z.dtype
        ctx.universal_rank, ctx.detach_teacher = r, detach_teacher
        return loss  # fp32 at least, as _GroupMIMLoss's

    @staticmethod
    def backward(ctx, grad_loss):
        (Z, token_mask, scale, shift, var_slope, variance, M_U, MC_U, M_column_sum, residual_sq, column_sum_U,
         tokens) = ctx.saved_tensors
        r, d_out = ctx.universal_rank, M_U.shape[0]
        grad_loss = _at_least_fp32(grad_loss)
        weight = grad_loss / (tokens * d_out * variance)  # d loss / d M̃ = weight ⊙ M̃C̃, per channel
        # d loss / d Z̃ = Z̃·M̃ᵀ(weight ⊙ M̃), by blocks, on the columns z's gradient reaches
        grad_z = torch.zeros_like(Z)
        if not ctx.detach_teacher:
            WM_U = M_U * weight[:, None]
            grad_z[:, :r] = torch.addmm(WM_U.t() @ shift, Z[:, :r], M_U.t() @ WM_U)
        grad_B = Z.new_zeros(ctx.B_shape)
        grad_scale = torch.zeros_like(scale)
        for (start, stop), (first, last), B_t, M_t, MC_t, column_sum_t in ctx.blocks:
            WM_t = M_t * weight[:, None]
            Z_sU, Z_sT = Z[start:stop, :r], Z[start:stop, r:]
            grad_z[start:stop, r:] = torch.addmm(WM_t.t() @ shift, Z_sU, M_U.t() @ WM_t).addmm_(Z_sT, M_t.t() @ WM_t)
            if not ctx.detach_teacher:
                grad_z[start:stop, :r] += Z_sT @ (M_t.t() @ WM_U)
            grad_M_t = (MC_t + shift[:, None] * column_sum_t[None, :]) * weight[:, None]
            grad_B[:, first:last] = grad_M_t * scale[:, None]
            grad_scale += (grad_M_t * B_t).sum(1)
        if token_mask is not None:
            grad_z = grad_z * _at_least_fp32(token_mask)
        if not ctx.detach_teacher:
            grad_B[:, :r] = -(MC_U + shift[:, None] * column_sum_U[None, :]) * weight[:, None]
        grad_shift = (M_column_sum + tokens * shift) * weight
        grad_var = _vid_var_grad(grad_loss, residual_sq, variance, var_slope, tokens)
        grad_regressor = torch.stack([grad_shift, grad_scale, grad_var], 1)  # PACKED_* order
        # the regressor's own dtype: fp32 masters under autocast, where expert_B arrives cast
        return (grad_z.to(ctx.z_dtype), None, grad_B.to(ctx.param_dtype), grad_regressor.to(ctx.mim_dtype),
                None, None, None, None)


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
        self._mim_terms: list = []  # scalars (own-task path) and MaskedMIMInputs: mim_loss() sums them
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
        x2 = x.reshape(-1, x.shape[-1])
        params = {name: getattr(self, name) for name in ("expert_A", "expert_B")}
        if cast is not None:
            params = {name: p.to(cast) for name, p in params.items()}
            base_out = F.linear(x2, self.base.weight.to(cast), None if self.base.bias is None else self.base.bias.to(cast))
        else:
            base_out = self.base(x2)
        if base_out._base is not None:  # a view (e.g. from a hook): the delta is added in place below
            base_out = base_out.clone()
        column_base = column_slope = width = one_hot = segments = None
        gate_form = _gate_form(x) if self.uses_gate else None  # the masked pass's; its coefficients follow it
        if self.task_rank:
            if task_ids is not None:
                routing = TaskRouting(task_ids, self.config.num_tasks, record_stats=True)
            else:
                routing = self.routing
            if routing is None:
                raise RoutingError("this C-LoRAE layer needs task ids: call it with task_ids= or inside "
                                   "clorae_ds.adapters.task_routing(model, task_ids)")
            shape = (x.shape[0], x2.shape[0] // x.shape[0])
            path = self.config.expert_path
            if path == "auto":  # fewest kernels, fastest on CPU (config.py says what was measured where)
                path = "masked"
            if path == "own_task":
                segments = routing.segments(*shape, self.universal_rank, self.task_rank)
            if segments is None:
                width = self._masked_width(x)
                column_base, column_slope = routing.column_coefficients(
                    *shape, self.universal_rank, self.task_rank, self.config.scaling, gate_form, width, x.device,
                    x.dtype)
            if self.uses_gate and routing.record_stats:
                one_hot = routing.one_hot(*shape, x.device, self.gate_stats.dtype)
        dropout = self.config.dropout if self.training else 0.0
        R = self.expert_columns
        mim = self.config.uses_mim and self.training and torch.is_grad_enabled()
        if segments is not None:  # a batch sorted by task: each row pays for its own task's columns only
            y, z, gates = _OwnTaskDelta.apply(base_out, x2, params["expert_A"], params["expert_B"], segments,
                                              self.universal_rank, R, self.config.scaling, dropout)
            if mim:  # run when replaying too: a recompute must save what the forward saved, in the same order
                B = params["expert_B"]
                term = _OwnTaskMIMLoss.apply(
                    z, routing.token_mask(*shape, x.device, x.dtype), B[:, :R], B[:, R:], segments,
                    self.universal_rank, self.config.mim_detach_teacher, routing.real_token_count(*shape, x.device))
                if not self.replaying:
                    self._mim_terms.append(term)
        else:
            y, gates, z, mim_B = _MaskedDelta.apply(
                base_out, x2, params["expert_A"], params["expert_B"], R, mim, column_base, column_slope, gate_form,
                self.config.scaling, dropout)
            if mim and not self.replaying:
                self._mim_terms.append(MaskedMIMInputs(
                    z, mim_B,
                    routing.mim_signs(*shape, self.universal_rank, self.task_rank, width, x.device),
                    routing.real_token_count(*shape, x.device), self.universal_rank, self.expert_columns,
                    self.config.mim_detach_teacher))
        if one_hot is not None and not self.replaying:  # addmm_: no Module.__setattr__
            self.gate_stats.addmm_(one_hot.t(), _gate_pair(gates).to(one_hot.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def _masked_width(self, x: torch.Tensor) -> int:
        """W, the masked path's down-projection output width: the expert columns, the gate's, _rank_padding's."""
        columns = self.expert_columns + self.uses_gate
        return columns + _rank_padding(columns, x)

    def pop_mim_terms(self) -> list:
        terms, self._mim_terms = self._mim_terms, []
        return terms

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, mode={c.mode}, r={self.universal_rank}, "
                f"r_t={self.task_rank}, tasks={c.num_tasks}")
