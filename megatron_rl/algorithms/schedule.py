"""Learning-rate schedule of the RL loop: linear warm-up, then constant or cosine to ``min_lr``.

Usage::

    lr = lr_at(step, lr=1e-6, min_lr=0.0, warmup_steps=10, total_steps=500, schedule="cosine")
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "constant") -> float:
    """The learning rate for 0-based ``step``.

    Warm-up: ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Then
    ``constant`` keeps ``lr``; ``cosine`` goes from ``lr`` (first step after warm-up) to
    ``min_lr`` (the last step, ``total_steps - 1``).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; use constant or cosine")
    span = max(total_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
