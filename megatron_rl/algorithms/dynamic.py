"""DAPO dynamic sampling: drop groups whose rewards all agree, and refill the batch.

A group whose G rewards are all equal has zero advantage under any group baseline, so it only
costs compute. With ``algorithm.dynamic_sampling=true`` the trainer keeps the other groups and
samples further rollout batches until ``data.prompts_per_step`` groups are kept, at most
``algorithm.max_gen_batches`` batches per step. Pure functions; rewards are flat ``(N*G,)``
with groups contiguous, as in :mod:`.advantages`.

Usage::

    pool = DynamicPool(target=8)
    while not pool.full and pool.batches < max_gen_batches:
        pool.add(rewards_of_new_batch, group_size=G)       # returns the kept group indices
    chosen = pool.chosen()                                  # (batch, group) pairs, len == target
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def informative_groups(rewards: torch.Tensor, *, group_size: int) -> list[int]:
    """Indices of the groups whose rewards are not all equal (zero std groups are dropped)."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be flat (N*G,) with G={group_size}, got shape {tuple(rewards.shape)}")
    r = rewards.reshape(-1, group_size)  # (N, G)
    spread = r.max(dim=1).values - r.min(dim=1).values  # (N,)
    return torch.nonzero(spread > 0).squeeze(-1).tolist()


@dataclass
class DynamicPool:
    """The groups kept so far over one step's rollout batches (in sampling order).

    ``target`` groups make a full batch. :meth:`chosen` returns the first ``target`` kept groups;
    when the batches ran out first (``max_gen_batches``), it tops the batch up with dropped
    groups in sampling order (they carry zero advantage) so every step trains a full batch, and
    ``topped_up`` says how many.
    """

    target: int
    batches: int = 0
    sampled: int = 0
    kept: list = field(default_factory=list)  # (batch, group) pairs
    dropped: list = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.target

    def add(self, rewards: torch.Tensor, *, group_size: int) -> list[int]:
        keep = informative_groups(rewards, group_size=group_size)
        n = rewards.numel() // group_size
        keep_set = set(keep)
        self.kept += [(self.batches, g) for g in keep]
        self.dropped += [(self.batches, g) for g in range(n) if g not in keep_set]
        self.batches += 1
        self.sampled += n
        return keep

    @property
    def topped_up(self) -> int:
        return max(self.target - len(self.kept), 0)

    def chosen(self) -> list:
        out = self.kept[:self.target] + self.dropped[:self.topped_up]
        if len(out) < self.target:
            raise ValueError(f"dynamic sampling: {self.sampled} groups sampled, fewer than the {self.target} needed")
        return out

    def metrics(self) -> dict:
        """``dynamic/gen_batches``, ``dynamic/groups_sampled``, ``dynamic/groups_kept`` (informative
        groups sampled) and ``dynamic/groups_topped_up``."""
        return {"dynamic/gen_batches": self.batches, "dynamic/groups_sampled": self.sampled,
                "dynamic/groups_kept": len(self.kept), "dynamic/groups_topped_up": self.topped_up}


def select_groups(parts: list, chosen: list, *, group_size: int) -> tuple:
    """``(RolloutBatch, rewards (len(chosen)*G,) list)`` of the ``chosen`` ``(batch, group)``
    pairs, from ``parts``: one ``(RolloutBatch, flat rewards)`` per rollout batch sampled."""
    from megatron_rl.algorithms.grpo import RolloutBatch  # lazy: grpo's import stays one-way

    G = group_size
    rows, prompts, resp, logp, rewards, p_routes, r_routes = [], [], [], [], [], [], []
    for b, g in chosen:
        batch, r = parts[b]
        if batch.prompt_routes:
            p_routes.append(batch.prompt_routes[g])
            r_routes.append(batch.response_routes[g])
        if batch.rows:
            rows.append(batch.rows[g])
        prompts.append(batch.prompt_ids[g])
        resp.append(batch.response_ids[g])
        logp.append(batch.logprobs[g])
        rewards += list(r[g * G:(g + 1) * G])
    return RolloutBatch(rows=rows, prompt_ids=prompts, response_ids=resp, logprobs=logp, prompt_routes=p_routes,
                        response_routes=r_routes), rewards
