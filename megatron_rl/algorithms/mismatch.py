"""The rollout/train mismatch per token: the importance ratio's distribution.

``ratio = exp(train_logp - rollout_logp)`` over every response token of a step (1 when the
rollout engine and the trainer agree). Besides the mean and max of ``|train - rollout|``
(:class:`~megatron_rl.algorithms.grpo.GRPOLoss`), a step logs quantiles of the ratio, the
share of tokens outside ``[0.9, 1.1]`` and the share that truncated importance sampling caps.

Usage::

    stats = ratio_stats(torch.cat(all_train_logp), rollout_logp=torch.cat(all_rollout_logp), tis_cap=2.0)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
BAND = (0.9, 1.1)


def ratio_stats(train_logp: torch.Tensor, *, rollout_logp: torch.Tensor, tis_cap: Optional[float],
                quantiles: Sequence[float] = QUANTILES, band: tuple = BAND) -> dict[str, float]:
    """Statistics of the per-token ratio; inputs ``(N,)`` (all response tokens, flat).

    Returns ``mismatch/ratio_q{pct}`` per quantile (linear interpolation, as ``torch.quantile``),
    ``mismatch/ratio_outside_frac`` (ratio < band[0] or > band[1]) and
    ``mismatch/tis_capped_frac`` (ratio >= ``tis_cap``; 0 when TIS is off). Empty input: zeros.
    """
    names = [f"mismatch/ratio_q{round(q * 100):02d}" for q in quantiles]
    if train_logp.numel() == 0:
        return {**{n: 0.0 for n in names}, "mismatch/ratio_outside_frac": 0.0, "mismatch/tis_capped_frac": 0.0}
    ratio = torch.exp(train_logp.double() - rollout_logp.double())  # (N,)
    qs = torch.quantile(ratio, torch.tensor(list(quantiles), dtype=torch.float64)).tolist()
    outside = ((ratio < band[0]) | (ratio > band[1])).double().mean().item()
    capped = 0.0 if tis_cap is None else (ratio >= tis_cap).double().mean().item()
    return {**dict(zip(names, qs)), "mismatch/ratio_outside_frac": outside, "mismatch/tis_capped_frac": capped}
