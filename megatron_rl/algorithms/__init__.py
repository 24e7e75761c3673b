"""RL algorithms as pure tensor functions: group advantages and policy losses.

See :mod:`.advantages` (GRPO / Dr.GRPO / RLOO) and :mod:`.losses` (clipped policy loss,
KL to a reference, loss aggregation, truncated importance sampling, mismatch metrics) and
:mod:`.schedule` (the learning-rate schedule), :mod:`.ppo` (GAE, the clipped value loss, whitening,
explained variance), :mod:`.dynamic` (DAPO dynamic sampling) and :mod:`.mismatch` (the per-token
importance-ratio statistics).
"""
from .advantages import ESTIMATORS, group_advantages
from .losses import (KL_ESTIMATORS, LOSS_AGG_MODES, aggregate, clipped_policy_loss, kl_penalty, logprob_mismatch,
                     masked_mean, policy_objective, reduce_parts, tis_weights, token_objective)
from .schedule import lr_at

__all__ = ["ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGG_MODES", "aggregate", "clipped_policy_loss", "group_advantages",
           "kl_penalty", "logprob_mismatch", "lr_at", "masked_mean", "policy_objective", "reduce_parts", "tis_weights",
           "token_objective"]
