"""The learning-rate schedule: linear warm-up, then linear or cosine decay to 0, or constant."""
from __future__ import annotations

import math


def lr_lambda(warmup: int, total: int, decay: str):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor
