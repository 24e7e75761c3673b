"""PPO with a value model (critic): per-token rewards, GAE, the clipped value loss, whitening.

Every per-token tensor is ``(B, T)``: B responses, T response positions, right-padded, with
``mask`` ``(B, T)`` 1 on real response tokens. Token ``t`` of a response is one action; its
state is the prompt plus the response's first ``t`` tokens, so ``values[b, t]`` is the critic's
estimate read at the position whose logits predict token ``t`` (the same position the policy's
log-prob of token ``t`` comes from). The episode ends after the last real token.

Usage::

    r = token_rewards(scores, mask=mask, kl=logp_old - ref_logp, kl_coef=0.05)     # (B, T)
    gae = gae_advantages(r, values=old_values, mask=mask, gamma=1.0, lam=0.95)
    adv = whiten(gae.advantages, mask=mask)                                      # policy loss input
    vl, clipped = clipped_value_loss(values, old_values=old_values, returns=gae.returns, clip=0.2)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class GAEResult:
    """``advantages`` and ``returns`` (= advantages + values), both ``(B, T)``, 0 on padding."""

    advantages: torch.Tensor
    returns: torch.Tensor


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` position of each response's last real token (-1 for an empty response)."""
    return mask.to(torch.long).sum(dim=-1) - 1


def token_rewards(scores: torch.Tensor, *, mask: torch.Tensor, kl: Optional[torch.Tensor] = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards ``(B, T)``: the sequence score at the last real token, minus
    ``kl_coef * kl`` on every real token (InstructGPT-style PPO).

    Args:
        scores: ``(B,)`` one reward per response.
        mask: ``(B, T)``.
        kl: ``(B, T)`` per-token KL estimate to the reference (e.g. ``old_logp - ref_logp``), or
            None; required when ``kl_coef > 0``.
    """
    m = mask.to(scores.dtype)
    out = torch.zeros_like(m)
    last = last_token_index(mask)  # (B,)
    rows = torch.nonzero(last >= 0).squeeze(-1)  # empty responses get no reward token
    out[rows, last[rows]] = scores[rows]
    if kl_coef > 0:
        if kl is None:
            raise ValueError("token_rewards: kl_coef > 0 needs the per-token kl")
        out = out - kl_coef * kl.to(out.dtype) * m
    return out


def gae_advantages(rewards: torch.Tensor, *, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> GAEResult:
    """Generalised advantage estimation per token, right to left over each response.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V`` and ``A`` taken as 0 after the last real token (the episode ends there). Returns
    ``A`` and ``A + V`` (the value targets), both ``(B, T)`` and 0 on padding. Inputs
    ``(B, T)``; the result carries no gradient.
    """
    m = mask.to(rewards.dtype)
    r, v = rewards.detach() * m, values.detach().to(rewards.dtype) * m
    adv = torch.zeros_like(r)
    next_v = torch.zeros_like(r[:, 0])  # (B,)
    next_a = torch.zeros_like(r[:, 0])  # (B,)
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = (delta + gamma * lam * next_a) * m[:, t]
        adv[:, t] = a
        # on padding the carried V and A stay 0, so the last real token sees V_{T}=0, A_{T}=0
        next_v, next_a = v[:, t] * m[:, t], a
    return GAEResult(advantages=adv, returns=(adv + v) * m)


def whiten(x: torch.Tensor, *, mask: torch.Tensor, eps: float = 1e-8, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (population variance); 0 on
    padding. ``shift_mean=False`` keeps the mean (scales only). ``(B, T)`` in and out."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def clipped_value_loss(values: torch.Tensor, *, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token: ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with
    ``V_clip = V_old + clamp(V - V_old, -clip, clip)``; ``clip=None`` is plain ``0.5 (V - R)^2``.

    Inputs ``(B, T)``; ``values`` carries the gradient. Returns ``(loss, clipped)``, both
    ``(B, T)``: ``clipped`` is 1.0 where the clipped branch is the larger (no gradient).
    """
    plain = (values - returns) ** 2
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain).detach()
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), (clipped > plain).to(values.dtype).detach()


def explained_variance(values: torch.Tensor, *, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over the masked tokens (1: perfect critic; 0: no better than
    the mean; nan when the returns have no variance)."""
    m = mask.bool()
    r, v = returns[m].double(), values[m].double()
    var_r = r.var(correction=0)
    if r.numel() == 0 or var_r == 0:
        return float("nan")
    return float(1.0 - (r - v).var(correction=0) / var_r)
