"""What the hardware offers and the few process-wide settings chosen from it."""
from __future__ import annotations

import os

import torch


def bf16_supported() -> bool:
    """bf16 matmuls in hardware: a GPU that has them, or a CPU with AVX512-BF16 or AMX-BF16 (elsewhere a CPU
    emulates bf16, slower than fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def configure_cuda_kernels() -> None:
    """No cuDNN attention: it builds an execution plan for every new sequence shape, and a batch's lengths
    change every step. On an H200 (benchmarks/profile_step.py, 2026-11-27) its calls took 3.4 ms of host time
    each, 120 of the 256 ms of a LoRA step of the default whose kernels ran 7.6 ms; attention falls back to the
    flash and memory-efficient kernels, which plan nothing."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def unlink_shm_allreduce_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce (used when the launcher says every rank is on this machine) creates a
    /dev/shm segment of ~70 MB per rank and never unlinks it: every run would leave its segments in memory until
    reboot. Called once every rank has mapped every segment (after a barrier), unlinking our name lets the memory go
    when the last rank exits, however it exits."""
    env = os.environ
    path = os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                                    f"{env.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
