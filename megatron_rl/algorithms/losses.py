"""Policy-gradient losses as pure functions over per-token log-probabilities.

Every per-token tensor is ``(B, T)``: B responses, T response positions, padded on the
right; ``mask`` ``(B, T)`` is 1 on real response tokens and 0 on padding. Log-probs are
of the sampled tokens (not full distributions). Names of the log-prob inputs:

- ``logp``: the policy being trained (carries the gradient);
- ``old_logp``: the trainer's log-probs of the policy that sampled the data (detached);
- ``rollout_logp``: what the rollout engine (vLLM) reported for the same tokens. It should
  equal ``old_logp`` but differs slightly (kernels, precision); see :func:`tis_weights`;
- ``ref_logp``: a frozen reference model, for the KL penalty.

Usage::

    loss, stats = policy_objective(logp, old_logp=old, rollout_logp=roll, advantages=adv,
                                   mask=mask, clip_low=0.2, clip_high=0.28, loss_agg="token-mean")
    loss.backward()
"""
from __future__ import annotations

from typing import Optional

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3")


def clipped_policy_loss(logp: torch.Tensor, *, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate with an asymmetric range (DAPO "clip-higher").

    ``ratio = exp(logp - old_logp)``; per token
    ``loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))``.
    A larger ``clip_high`` lets low-probability tokens with positive advantage grow further,
    which keeps entropy from collapsing.

    Args:
        logp, old_logp: ``(B, T)``.
        advantages: ``(B,)`` (one per response, broadcast over T) or ``(B, T)``.

    Returns:
        ``(loss, clipped)``: both ``(B, T)``; ``clipped`` is 1.0 where the clipped branch was
        taken (the token gets no gradient), else 0.0.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages  # (B, 1) or (B, T)
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    return loss, (clipped > unclipped).to(logp.dtype)


def kl_penalty(logp: torch.Tensor, *, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With ``d = ref_logp - logp`` (``r = exp(d)`` = pi_ref/pi):

    - ``k1 = -d``: unbiased, high variance, can be negative;
    - ``k2 = d**2 / 2``: biased, low variance, always >= 0;
    - ``k3 = r - 1 - d``: unbiased and always >= 0 (Schulman's estimator; GRPO's default).

    Shapes: ``(B, T)`` in, ``(B, T)`` out. Differentiable in ``logp``.
    """
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - 1.0 - d
    raise ValueError(f"unknown KL estimator {estimator!r}; use one of {KL_ESTIMATORS}")


def reduce_parts(per_token: torch.Tensor, *, mask: torch.Tensor, mode: str) -> tuple[torch.Tensor, int]:
    """``(numerator, denominator)`` of :func:`aggregate` (``(B, T)`` in): numerators and
    denominators of micro-batches and ranks add up, so ``sum(num) / sum(den)`` is the global
    value. This is megatron-core's per-token-loss convention (``loss_sum``, ``num_tokens``).
    The denominator counts tokens (token-mean) or responses (the seq-mean modes).
    """
    m = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * m).sum(), int(mask.sum().item())
    if mode == "seq-mean-token-sum":
        return (per_token * m).sum(), per_token.shape[0]
    if mode == "seq-mean-token-mean":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # (B,)
        return per_seq.sum(), per_token.shape[0]
    raise ValueError(f"unknown loss aggregation {mode!r}; use one of {LOSS_AGG_MODES}")


def aggregate(per_token: torch.Tensor, *, mask: torch.Tensor, mode: str,
              num_tokens: Optional[float] = None, num_seqs: Optional[float] = None) -> torch.Tensor:
    """Reduce a ``(B, T)`` per-token quantity to a scalar.

    - ``token-mean``: ``sum(x * m) / sum(m)``: every token weighs the same, so long
      responses weigh more (DAPO);
    - ``seq-mean-token-sum``: ``sum_b sum_t(x * m) / B``: per-response sums, averaged
      (Dr.GRPO's length-unbiased form when T is fixed);
    - ``seq-mean-token-mean``: ``sum_b [sum_t(x * m) / sum_t(m)] / B``: the original GRPO.

    When a batch is split into micro-batches and over data-parallel ranks, pass the
    GLOBAL ``num_tokens`` (total of ``mask``) or ``num_seqs`` (total responses): each call then
    returns its share, and the shares sum to the global value.
    """
    num, den = reduce_parts(per_token, mask=mask, mode=mode)
    override = num_tokens if mode == "token-mean" else num_seqs
    return num / max(float(den if override is None else override), 1.0)


def tis_weights(old_logp: torch.Tensor, *, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights for the rollout/train mismatch.

    Tokens were sampled by the rollout engine (``rollout_logp``) but the loss treats them as
    samples of the trainer's policy (``old_logp``). Reweighting each token by
    ``min(exp(old_logp - rollout_logp), cap)`` corrects for that, and the cap bounds the
    variance. Returns ``(B, T)``, detached (a weight, not a gradient path).
    """
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (both ``(B, T)``); 0 when the mask is empty."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def logprob_mismatch(train_logp: torch.Tensor, *, rollout_logp: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float]:
    """How far the rollout engine's log-probs are from the trainer's, over masked tokens.

    Returns floats: ``mismatch_abs_mean`` = mean |train - rollout|, ``mismatch_abs_max``,
    ``mismatch_kl_k1`` = mean(rollout - train) and ``mismatch_kl_k3`` = mean(r - 1 - log r) with
    ``r = exp(train - rollout)``: both estimate KL(pi_rollout || pi_train) from the rollout's
    own samples (k3 is never negative).
    """
    with torch.no_grad():
        diff = train_logp.float() - rollout_logp.float()  # (B, T)
        m = mask.bool()
        abs_max = diff.abs()[m].max().item() if m.any() else 0.0
        return {
            "mismatch_abs_mean": masked_mean(diff.abs(), m).item(),
            "mismatch_abs_max": abs_max,
            "mismatch_kl_k1": masked_mean(-diff, m).item(),
            "mismatch_kl_k3": masked_mean(torch.exp(diff) - 1.0 - diff, m).item(),
        }


def token_objective(logp: torch.Tensor, *, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                    clip_high: float, rollout_logp: Optional[torch.Tensor] = None, tis_cap: Optional[float] = None,
                    ref_logp: Optional[torch.Tensor] = None, kl_coef: float = 0.0,
                    kl_estimator: str = "k3") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO/DAPO objective per token, before aggregation: ``w * pg + kl_coef * kl``.

    ``pg`` is :func:`clipped_policy_loss`, ``w`` the TIS weights (1 when ``tis_cap`` or
    ``rollout_logp`` is None) and ``kl`` is :func:`kl_penalty` (0 when ``kl_coef == 0``).
    Every aggregation mode is linear, so aggregating this equals aggregating each term.
    Inputs ``(B, T)``; ``advantages`` ``(B,)`` or ``(B, T)``.

    Returns ``(per_token, parts)``: ``(B, T)`` with gradient, and detached ``(B, T)`` parts
    ``pg`` (weighted), ``kl``, ``clipped``, ``tis_weight``, ``tis_capped`` for statistics.
    """
    pg, clipped = clipped_policy_loss(logp, old_logp=old_logp, advantages=advantages,
                                      clip_low=clip_low, clip_high=clip_high)
    w, capped = torch.ones_like(pg), torch.zeros_like(pg)
    if tis_cap is not None and rollout_logp is not None:
        w = tis_weights(old_logp, rollout_logp=rollout_logp, cap=tis_cap)
        # compare the raw ratio: a float32 weight clamped to 1.05 is 1.0499999523 < 1.05
        capped = (torch.exp(old_logp - rollout_logp) >= tis_cap).to(w.dtype)
    per_token = pg * w
    kl = torch.zeros_like(pg)
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp (the reference model's log-probs)")
        kl = kl_penalty(logp, ref_logp=ref_logp, estimator=kl_estimator)
        per_token = per_token + kl_coef * kl
    parts = {"pg": (pg * w).detach(), "kl": kl.detach(), "clipped": clipped, "tis_weight": w, "tis_capped": capped}
    return per_token, parts


def policy_objective(logp: torch.Tensor, *, old_logp: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, clip_low: float, clip_high: float, loss_agg: str = "token-mean",
                     rollout_logp: Optional[torch.Tensor] = None, tis_cap: Optional[float] = None,
                     ref_logp: Optional[torch.Tensor] = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                     num_tokens: Optional[float] = None,
                     num_seqs: Optional[float] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full objective for one micro-batch: :func:`token_objective`, then :func:`aggregate`.

    ``loss = agg(w * pg) + kl_coef * agg(kl)``. Inputs ``(B, T)``; ``advantages`` ``(B,)``.
    Returns ``(loss, stats)``: a scalar with gradient, and detached scalar tensors
    ``pg_loss``, ``kl``, ``clip_frac``, ``tis_weight_mean``, ``tis_clip_frac`` (the share
    of tokens whose weight hit the cap), all aggregated the same way as the loss.
    """
    per_token, parts = token_objective(logp, old_logp=old_logp, advantages=advantages, clip_low=clip_low,
                                       clip_high=clip_high, rollout_logp=rollout_logp, tis_cap=tis_cap,
                                       ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator)
    agg = dict(mask=mask, mode=loss_agg, num_tokens=num_tokens, num_seqs=num_seqs)
    loss = aggregate(per_token, **agg)
    with torch.no_grad():
        names = {"pg_loss": "pg", "kl": "kl", "clip_frac": "clipped", "tis_weight_mean": "tis_weight",
                 "tis_clip_frac": "tis_capped"}
        stats = {name: aggregate(parts[part], **agg) for name, part in names.items()}
    return loss, stats
