"""GRPO glue between a step's rollout and the shared-prefix training step.

Everything here is per rank and uses no process group: :class:`RolloutBatch` holds one step's
samples (the same on every rank), :func:`dp_shards` says which groups this data-parallel rank
trains in each optimizer step, :func:`make_groups` turns them into packing groups, and
:class:`GRPOLoss` is the loss plugged into the engine's forward step. It sees the log-probs
of this rank's response tokens, computes :func:`~megatron_rl.algorithms.losses.token_objective`
and returns megatron's ``(loss_sum, normaliser, metrics)``, keeping statistic sums that the
trainer reduces over ranks.

Usage::

    loss = GRPOLoss(cfg.algorithm, rollout_logp=batch.logp_by_key(), key_of=lambda j: order[j])
    eng.step(make_batches(make_groups(batch, adv, indices=order), ...), forward_fn=make_forward_fn(loss))
    sums = loss.sums()          # (len(STAT_KEYS),) float64
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from megatron_rl.algorithms.losses import reduce_parts, token_objective


# Statistic sums kept by GRPOLoss, in this order (the trainer all-reduces them as one tensor).
STAT_KEYS = ("loss_num", "loss_den", "pg_num", "kl_num", "clip_num", "tisw_num", "tiscap_num",
             "mm_abs_sum", "mm_k1_sum", "mm_k3_sum", "mm_tokens")


@dataclass
class RolloutBatch:
    """One step's samples in group order: N prompts x G responses. Identical on every rank."""

    rows: list  # N dataset rows (dicts with "prompt", maybe "answer")
    prompt_ids: list  # N lists of token ids
    response_ids: list  # N lists of G lists of token ids
    logprobs: list  # N lists of G lists of floats (the rollout engine's log p of each response token)
    texts: list = field(default_factory=list)  # N lists of G decoded responses
    # MoE routes from the rollout (Generation.routes), when the trainer asked for them: the prompt's
    # once per group, (P, L, k), and each response's, (R, L, k) (its final token: never routed)
    prompt_routes: list = field(default_factory=list)  # N tensors
    response_routes: list = field(default_factory=list)  # N lists of G tensors

    def route_fields(self, g: int) -> dict:
        """``prompt_routes`` / ``response_routes`` of group ``g`` for a packing ``Group`` ({} without routes)."""
        if not self.prompt_routes:
            return {}
        return {"prompt_routes": self.prompt_routes[g], "response_routes": list(self.response_routes[g])}

    @property
    def group_size(self) -> int:
        return len(self.response_ids[0])

    def flat_lengths(self) -> list[int]:
        return [len(r) for group in self.response_ids for r in group]

    def logp_by_key(self) -> dict:
        """``{(group, response): (R,) float32 tensor}`` of the rollout log-probs."""
        return {(g, i): torch.tensor(lp, dtype=torch.float32)
                for g, group in enumerate(self.logprobs) for i, lp in enumerate(group)}


def dp_shards(num_groups: int, *, dp_rank: int, dp_size: int, mini_batches: int = 1) -> list[list[int]]:
    """Global group indices this DP rank trains, one list per optimizer step (mini-batch).

    Mini-batch m holds groups ``[m*k, (m+1)*k)`` with ``k = num_groups / mini_batches``; each
    is split in contiguous equal parts over the DP ranks (config checks the divisibility).
    """
    if num_groups % (dp_size * mini_batches):
        raise ValueError(f"{num_groups} groups do not split over dp {dp_size} x mini_batches {mini_batches}")
    per_mb = num_groups // mini_batches
    per_rank = per_mb // dp_size
    return [list(range(m * per_mb + dp_rank * per_rank, m * per_mb + (dp_rank + 1) * per_rank))
            for m in range(mini_batches)]


def make_groups(batch: RolloutBatch, advantages: torch.Tensor, *, indices: Sequence[int]):
    """Packing groups (``megatron_rl.attention.Group``) for the given global group indices.

    ``advantages`` is ``(N*G,)``; each response gets its own scalar.
    """
    from megatron_rl.attention.packing import Group  # lazy: keeps vLLM/megatron out of CLI start-up

    g_size = batch.group_size
    adv = advantages.reshape(-1, g_size).tolist()  # (N, G)
    return [Group(prompt=list(batch.prompt_ids[g]), responses=[list(r) for r in batch.response_ids[g]],
                  advantages=adv[g], **batch.route_fields(g)) for g in indices]


class GRPOLoss:
    """``loss(logp (N_local,), local) -> (loss_sum, normaliser, metrics)`` for the engine.

    Args:
        algo: the ``AlgorithmConfig``.
        rollout_logp: ``{(global group, response): (R,)}`` from the rollout engine.
        key_of: maps a micro-batch's local group index (position in the list given to
            ``make_batches``) to the global group index.
        old_logp: ``{(global group, response): (R,)}`` trainer log-probs before this step's
            first update, or None when the loss runs on-policy (one optimizer step per
            rollout: ``old = logp.detach()``).
        ref_logp: the same for the reference model when ``algo.kl_coef > 0``.
    """

    def __init__(self, algo, *, rollout_logp: dict, key_of: Callable[[int], int], old_logp: Optional[dict] = None,
                 ref_logp: Optional[dict] = None):
        self.algo, self.rollout_logp, self.key_of = algo, rollout_logp, key_of
        self.old_logp, self.ref_logp = old_logp, ref_logp
        self._sums = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
        self.mismatch_max = 0.0
        # per-token (trainer - rollout) log-prob differences, kept while record_ratios is set
        # (the trainer sets it for the first pass over the rollout only: every token once)
        self.record_ratios, self.ratio_diffs = True, []

    def _gather(self, table: dict, keys: list, like: torch.Tensor) -> torch.Tensor:
        return torch.cat([table[k] for k in keys]).to(device=like.device, dtype=like.dtype)  # (N_local,)

    def __call__(self, logp: torch.Tensor, local):
        from megatron_rl.attention.step import padded  # lazy: keeps vLLM/megatron out of CLI start-up

        keys = [(self.key_of(int(g)), int(i)) for g, i in local.response_keys]
        if not keys:  # a CP rank may hold no response tokens: a zero that keeps the graph
            zero = logp.sum() * 0.0
            n = torch.tensor(0, dtype=torch.int)
            return zero, n, {"loss_sum": zero.detach().clone(), "tokens": n.clone()}
        lp, mask = padded(logp, local)  # (B, T)
        old = lp.detach() if self.old_logp is None else padded(self._gather(self.old_logp, keys, logp), local)[0]
        roll = padded(self._gather(self.rollout_logp, keys, logp), local)[0]
        adv = padded(local.advantages.to(logp), local)[0]
        ref = None if self.ref_logp is None else padded(self._gather(self.ref_logp, keys, logp), local)[0]
        a = self.algo
        per_token, parts = token_objective(lp, old_logp=old, advantages=adv, clip_low=a.clip_low,
                                           clip_high=a.clip_high, rollout_logp=roll, tis_cap=a.tis_cap,
                                           ref_logp=ref, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator)
        num, den = reduce_parts(per_token, mask=mask, mode=a.loss_agg)
        self._accumulate(num, den, parts, mask=mask, old=old, roll=roll)
        n = torch.tensor(den, dtype=torch.int)
        return num, n, {"loss_sum": num.detach().clone(), "tokens": n.clone()}

    @torch.no_grad()
    def _accumulate(self, num, den, parts, *, mask, old, roll) -> None:
        mode = self.algo.loss_agg
        part_sums = [reduce_parts(parts[k], mask=mask, mode=mode)[0].item()
                     for k in ("pg", "kl", "clipped", "tis_weight", "tis_capped")]
        m = mask.to(old.dtype)
        d = (old - roll).double() * m  # trainer - rollout, 0 on padding
        k3 = (torch.exp(d) - 1.0 - d) * m
        self._sums += torch.tensor([num.item(), den, *part_sums, d.abs().sum().item(), (-d).sum().item(),
                                    k3.sum().item(), m.sum().item()], dtype=torch.float64)
        self.mismatch_max = max(self.mismatch_max, d.abs().max().item())
        if self.record_ratios:
            self.ratio_diffs.append(d[mask.bool()].cpu())  # (tokens,) float64

    def sums(self) -> torch.Tensor:
        """The statistic sums so far, ``(len(STAT_KEYS),)`` float64, keyed by :data:`STAT_KEYS`."""
        return self._sums.clone()


def stats_from_sums(sums: torch.Tensor, *, mismatch_max: float) -> dict[str, float]:
    """Per-step metrics from globally reduced :data:`STAT_KEYS` sums."""
    s = dict(zip(STAT_KEYS, sums.tolist()))
    den, tok = max(s["loss_den"], 1.0), max(s["mm_tokens"], 1.0)
    return {"loss": s["loss_num"] / den, "pg_loss": s["pg_num"] / den, "kl": s["kl_num"] / den, "clip_frac": s["clip_num"] / den,
            "tis_weight_mean": s["tisw_num"] / den, "tis_clip_frac": s["tiscap_num"] / den,
            "mismatch/abs_mean": s["mm_abs_sum"] / tok, "mismatch/abs_max": mismatch_max,
            "mismatch/kl_k1": s["mm_k1_sum"] / tok, "mismatch/kl_k3": s["mm_k3_sum"] / tok}
