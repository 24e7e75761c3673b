"""PPO glue between a step's rollout, the critic and the shared-prefix training step.

Per rank, no process group. Tables are ``{(group, response): (R,) tensor}`` over the whole
step (every rank holds all of them once gathered). :func:`ppo_targets` turns the critic's
values and the rewards into per-token advantages and value targets (GAE, whitened over the
whole batch); :func:`token_groups` packs them as per-token advantages (the policy loss is
:class:`~megatron_rl.algorithms.grpo.GRPOLoss` unchanged: its clipped loss takes ``(B, T)``
advantages); :class:`ValueLoss` is the critic's loss plugged into the engine's forward step.

Usage::

    tg = ppo_targets(keys, scores=rewards, values=values, gamma=1.0, lam=0.95, whiten_adv=True)
    groups = token_groups(batch, tg.advantages, indices=shard)
    critic.step(make_batches(groups, ...), forward_fn=make_forward_fn(ValueLoss(algo, targets=tg, key_of=...),
                                                                        values=True))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_rl.algorithms.losses import reduce_parts
from megatron_rl.algorithms.ppo import clipped_value_loss, explained_variance, gae_advantages, token_rewards, whiten

VALUE_STAT_KEYS = ("vf_num", "vf_den", "vf_clip_num")


@dataclass
class PPOTargets:
    """Per-token tables ``{(group, response): (R,)}``: advantages (whitened when asked), value
    targets (returns) and the critic's values they came from, plus its explained variance."""

    advantages: dict
    returns: dict
    values: dict
    explained_variance: float


def _pad(table: dict, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` float64 rows of ``table[keys[b]]`` and their mask."""
    width = max([table[k].numel() for k in keys] + [1])
    out = torch.zeros(len(keys), width, dtype=torch.float64)
    mask = torch.zeros(len(keys), width, dtype=torch.bool)
    for b, k in enumerate(keys):
        n = table[k].numel()
        out[b, :n], mask[b, :n] = table[k].double(), True
    return out, mask


def _unpad(x: torch.Tensor, mask: torch.Tensor, keys: list) -> dict:
    return {k: x[b][mask[b]].float() for b, k in enumerate(keys)}


def ppo_targets(keys: Sequence, *, scores: torch.Tensor, values: dict, gamma: float, lam: float,
                whiten_adv: bool = True, kl: Optional[dict] = None, kl_coef: float = 0.0) -> PPOTargets:
    """GAE advantages and returns for every response of the step.

    Args:
        keys: ``(group, response)`` of every response, in the order of ``scores``.
        scores: ``(len(keys),)`` sequence rewards.
        values: the critic's ``{key: (R,)}`` (before its update this step).
        kl: ``{key: (R,)}`` per-token KL estimate to the reference (``old - ref`` log-probs);
            with ``kl_coef > 0`` it is subtracted from the rewards (:func:`token_rewards`).
        whiten_adv: whiten the advantages over all tokens of the step (returns stay raw).
    """
    keys = list(keys)
    v, mask = _pad(values, keys)  # (B, T)
    kl_pad = _pad(kl, keys)[0] if kl is not None and kl_coef > 0 else None
    r = token_rewards(scores.double(), mask=mask, kl=kl_pad, kl_coef=kl_coef)
    gae = gae_advantages(r, values=v, mask=mask, gamma=gamma, lam=lam)
    adv = whiten(gae.advantages, mask=mask) if whiten_adv else gae.advantages
    return PPOTargets(advantages=_unpad(adv, mask, keys), returns=_unpad(gae.returns, mask, keys),
                      values={k: values[k].float() for k in keys},
                      explained_variance=explained_variance(v, returns=gae.returns, mask=mask))


def token_groups(batch, advantages: dict, *, indices: Sequence[int]):
    """Packing groups for the global group indices, each response with its per-token advantages."""
    from megatron_rl.attention.packing import Group  # lazy: keeps vLLM/megatron out of CLI start-up

    return [Group(prompt=list(batch.prompt_ids[g]), responses=[list(r) for r in batch.response_ids[g]],
                  advantages=[advantages[(g, i)].tolist() for i in range(len(batch.response_ids[g]))],
                  **batch.route_fields(g)) for g in indices]


class ValueLoss:
    """``loss(values (N_local,), local) -> (loss_sum, normaliser, metrics)`` for the critic's engine.

    The clipped value loss (``algo.value_clip``) against ``targets.returns``, clipped around
    ``targets.values``, aggregated as ``algo.loss_agg``. ``key_of`` maps a micro-batch's local
    group index to the global one (as in ``GRPOLoss``).
    """

    def __init__(self, algo, *, targets: PPOTargets, key_of: Callable[[int], int]):
        self.algo, self.targets, self.key_of = algo, targets, key_of
        self._sums = torch.zeros(len(VALUE_STAT_KEYS), dtype=torch.float64)

    def __call__(self, values: torch.Tensor, local):
        from megatron_rl.attention.step import padded  # lazy: keeps vLLM/megatron out of CLI start-up

        keys = [(self.key_of(int(g)), int(i)) for g, i in local.response_keys]
        if not keys:
            zero = values.sum() * 0.0
            n = torch.tensor(0, dtype=torch.int)
            return zero, n, {"loss_sum": zero.detach().clone(), "tokens": n.clone()}

        def table(t: dict) -> torch.Tensor:
            return padded(torch.cat([t[k] for k in keys]).to(values), local)[0]  # (B, T)

        v, mask = padded(values, local)
        per_token, clipped = clipped_value_loss(v, old_values=table(self.targets.values),
                                                returns=table(self.targets.returns), clip=self.algo.value_clip)
        num, den = reduce_parts(per_token, mask=mask, mode=self.algo.loss_agg)
        clip_num = reduce_parts(clipped, mask=mask, mode=self.algo.loss_agg)[0]
        self._sums += torch.tensor([num.item(), den, clip_num.item()], dtype=torch.float64)
        n = torch.tensor(den, dtype=torch.int)
        return num, n, {"loss_sum": num.detach().clone(), "tokens": n.clone()}

    def sums(self) -> torch.Tensor:
        """``(len(VALUE_STAT_KEYS),)`` float64 sums so far."""
        return self._sums.clone()


def value_stats(sums: torch.Tensor) -> dict[str, float]:
    """``critic/value_loss`` and ``critic/clip_frac`` from globally reduced :data:`VALUE_STAT_KEYS` sums."""
    s = dict(zip(VALUE_STAT_KEYS, sums.tolist()))
    den = max(s["vf_den"], 1.0)
    return {"critic/value_loss": s["vf_num"] / den, "critic/clip_frac": s["vf_clip_num"] / den}
