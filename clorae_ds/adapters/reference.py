"""C-LoRAE in plain PyTorch autograd: the method as docs/method.md writes it, expert by expert.

This is the oracle, not the fast path: the tests compare CLoRAELinear (layer.py) against it in every mode, with
and without dropout, MIM and padding. It reads a layer's weights through `CLoRAELinear.split_experts`, whose views
keep autograd's link to the packed parameters, so gradients compare too.

For an adapted linear with frozen W0, b, an input x (batch, tokens, d_in) and a task id n per sample:
  U(x)   = B_U·A_U·drop(x)                              eq. 3, the universal expert, rank r
  D_n(x) = B_n·A_n·drop(x)                              eq. 4, task n's expert, rank r_t = r // N
  (g1, g2) = softmax(W_g·drop(x)),  W_g = [−p; p]       eq. 6, per token
  y = W0·x + b + (α/r)·(g1·U(x) + g2·D_n(x))            eq. 7-8
  L_MIM = mean over real tokens and channels of ½[(μ(D) − U)²/σ² + log σ²],
          μ(D) = scale⊙D + shift,  σ² = softplus(var) + ε     eq. 5 (VID), U detached when the teacher is
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

MIM_EPS = 1e-5


def expert_weights(layer) -> dict[str, torch.Tensor]:
    """universal_A (r, d_in), universal_B (d_out, r), task_A (N, r_t, d_in), task_B (N, d_out, r_t), gate_row p
    (d_in,), mim_regressor (d_out, 3) columns [shift | scale | var]: those the layer's mode has."""
    return layer.split_experts(layer.expert_A, layer.expert_B)


def universal_output(xd: torch.Tensor, w: dict) -> torch.Tensor:  # eq. 3
    return xd @ w["universal_A"].T @ w["universal_B"].T


def task_output(xd: torch.Tensor, w: dict, task_ids: torch.Tensor) -> torch.Tensor:  # eq. 4
    """Each sample through its own task's expert only."""
    A, B = w["task_A"][task_ids], w["task_B"][task_ids]  # (batch, r_t, d_in), (batch, d_out, r_t)
    return torch.einsum("bsi,bri,bor->bso", xd, A, B)


def gate(xd: torch.Tensor, w: dict) -> torch.Tensor:  # eq. 6
    """(g1, g2) per token, (batch, tokens, 2)."""
    W_g = torch.stack([-w["gate_row"], w["gate_row"]])
    return torch.softmax(xd @ W_g.T, dim=-1)


def forward(layer, x: torch.Tensor, task_ids: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y (eq. 7-8) for x (batch, tokens, d_in) in the layer's mode. `keep`: a dropout mask already scaled by
    1/(1 − p), multiplied into the adapter branch's input; None for no dropout (evaluation)."""
    config, w = layer.config, expert_weights(layer)
    xd = x if keep is None else x * keep
    y = F.linear(x, layer.base.weight, layer.base.bias)
    if config.mode == "universal_only":  # vanilla LoRA
        h = universal_output(xd, w)
    elif config.mode == "task_only":
        h = task_output(xd, w, task_ids)
    elif config.mode == "no_gate":  # h = U + D
        h = universal_output(xd, w) + task_output(xd, w, task_ids)
    else:  # clorae
        g = gate(xd, w)
        h = g[..., :1] * universal_output(xd, w) + g[..., 1:] * task_output(xd, w, task_ids)
    return y + config.scaling * h


def mim(layer, x: torch.Tensor, task_ids: torch.Tensor, real: Optional[torch.Tensor] = None,
        keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's MIM term (eq. 5) over the real tokens (`real` (batch, tokens) bool; None: all), the universal
    expert the teacher (detached when config.mim_detach_teacher), the task expert the student."""
    config, w = layer.config, expert_weights(layer)
    xd = x if keep is None else x * keep
    teacher = universal_output(xd, w)
    if config.mim_detach_teacher:
        teacher = teacher.detach()
    shift, scale, var = w["mim_regressor"].unbind(1)
    variance = F.softplus(var) + MIM_EPS
    mu = scale * task_output(xd, w, task_ids) + shift
    per_channel = 0.5 * ((mu - teacher) ** 2 / variance + torch.log(variance))  # (batch, tokens, d_out)
    return per_channel.mean() if real is None else per_channel[real].mean()
