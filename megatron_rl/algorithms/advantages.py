"""Critic-free advantages for group-sampled RL (GRPO, Dr.GRPO, RLOO).

A step samples G responses for each of N prompts. Rewards arrive flat, groups contiguous:
``[p0r0, p0r1, ..., p0r(G-1), p1r0, ...]``, shape ``(N*G,)``. Every response gets one
scalar advantage, which the loss broadcasts over the response's tokens.

Usage::

    adv = group_advantages(rewards, group_size=8)                        # GRPO
    adv = group_advantages(rewards, group_size=8, normalize_std=False)   # Dr.GRPO
"""
from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "rloo")


def group_advantages(rewards: torch.Tensor, *, group_size: int, estimator: str = "grpo",
                     normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-response advantages from per-response rewards.

    Args:
        rewards: ``(N*G,)`` float, groups contiguous.
        group_size: G (>= 2).
        estimator: ``"grpo"``: baseline = the group mean (the response itself included);
            ``"rloo"``: baseline = the mean of the *other* G-1 responses (leave-one-out).
        normalize_std: divide by the group's standard deviation (unbiased, G-1 in the
            denominator) plus ``eps``. ``False`` is Dr.GRPO, which drops this division because
            it over-weights groups whose rewards barely differ.
        eps: guards groups whose rewards are all equal (their advantages are 0 either way).

    Returns:
        ``(N*G,)`` advantages, same dtype as ``rewards``. Groups whose rewards are all equal
        get exactly 0 and so contribute no policy gradient.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group advantages, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be flat (N*G,) with G={group_size}, got shape {tuple(rewards.shape)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; use one of {ESTIMATORS}")
    r = rewards.reshape(-1, group_size)  # (N, G)
    total = r.sum(dim=1, keepdim=True)  # (N, 1)
    if estimator == "grpo":
        adv = r - total / group_size
    else:
        adv = r - (total - r) / (group_size - 1)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True, correction=1) + eps)
    # All-equal groups: exactly 0 (not rounding noise of the mean, nor 0/0 when eps is 0).
    flat = (r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values)  # (N, 1)
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.reshape(-1)  # (N*G,)
