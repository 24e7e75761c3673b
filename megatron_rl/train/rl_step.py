"""The pieces of one RL training step, between the rollout and the weight sync.

The trainer's loop (:mod:`megatron_rl.trainer`) calls them in a flat, timed sequence::

    plan = plan_step(cfg, batch, topo=topo, advantages=adv)     # which groups, packed micro-batches
    values = gather_table(forward_table(critic, plan), topo=topo)      # critic (PPO), offloaded after
    ref_logp = forward_table(ref, plan)                                # reference (kl_coef > 0)
    targets, kl_stats = ppo_step_targets(cfg, batch, rewards, values=values, old_logp=old, ref_logp=ref_logp, topo=topo)
    out = policy_update(eng, cfg, batch, plan, lr=lr, ref_logp=ref_logp)
    out |= critic_update(critic, cfg, plan, targets=targets, lr=critic_lr)

Each optimizer step trains one mini-batch (``algorithm.mini_batches``); the policy trains on
the rollout ``algorithm.ppo_epochs`` times, the critic ``algorithm.critic_epochs`` times. Statistic sums are reduced over every rank.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_rl.algorithms.grpo import GRPOLoss, dp_shards, make_groups, stats_from_sums
from megatron_rl.algorithms.mismatch import ratio_stats
from megatron_rl.algorithms.ppo_step import PPOTargets, ValueLoss, ppo_targets, token_groups, value_stats
from megatron_rl.parallel import collectives as coll


@dataclass
class StepPlan:
    """This DP rank's share of a step: global group indices and packed micro-batches per mini-batch."""

    shards: list
    mb_batches: list

    @property
    def passes(self) -> int:
        return len(self.shards)


def _pack(cfg, groups: list) -> list:
    from megatron_rl.attention import make_batches  # lazy: keeps vLLM/megatron out of CLI start-up
    from megatron_rl.attention.packing import group_tokens, naive_tokens  # lazy: as above

    shared = cfg.train.shared_prefix
    size = group_tokens if shared else naive_tokens  # tokens one group occupies in this layout
    # about micro_batch_groups groups per micro-batch; the packer keeps groups whole and in order
    max_tokens = max(size(g) for g in groups) * cfg.train.micro_batch_groups
    pad = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    return make_batches(groups, max_tokens=max_tokens, max_seq_len=cfg.rollout.max_model_len, cp_size=cfg.parallel.cp,
                        pad_multiple=pad, shared_prefix=shared)


def plan_step(cfg, batch, *, topo, advantages: Optional[torch.Tensor] = None, token_adv: Optional[dict] = None):
    """Shards and micro-batches; advantages per response ``(N*G,)``, per token (``token_adv``
    table), or neither (a forward-only plan: the critic's and the reference's)."""
    shards = dp_shards(len(batch.prompt_ids), dp_rank=topo.coord.dp, dp_size=topo.grid.dp,
                       mini_batches=cfg.algorithm.mini_batches)
    mbs = []
    for indices in shards:
        if token_adv is not None:
            groups = token_groups(batch, token_adv, indices=indices)
        else:
            adv = advantages if advantages is not None else torch.zeros(len(batch.prompt_ids) * batch.group_size)
            groups = make_groups(batch, adv, indices=indices)
        mbs.append(_pack(cfg, groups))
    return StepPlan(shards=shards, mb_batches=mbs)


def forward_table(model, plan: StepPlan, *, topo, values: bool = False) -> dict:
    """``{(global group, response): (R,)}`` log-probs (or a critic's values) of ``model`` on the
    last PP stage ({} elsewhere); ``model`` has ``forward(batches, forward_fn=...)``."""
    from megatron_rl.attention import collect_logprobs, make_forward_fn, pg_loss  # lazy: CLI start-up

    out = {}
    for indices, batches in zip(plan.shards, plan.mb_batches):
        metrics = model.forward(batches, forward_fn=make_forward_fn(pg_loss, values=values))
        got = collect_logprobs(metrics, cp_group=topo.cp_group)
        out.update({(indices[g], i): t for (g, i), t in got.items()})
    return out


def gather_table(table: dict, *, topo) -> dict:
    """The union of every rank's table, on every rank (gloo control group; tables are small)."""
    mine = table if topo.is_last_stage and topo.coord.tp == 0 else {}
    out = {}
    for part in coll.all_gather_object(mine, group=topo.control_group):
        out.update(part)
    return out


def global_sums(sums: torch.Tensor, *, topo, maximum: float = 0.0) -> tuple[torch.Tensor, float]:
    """Sums over every rank, and the max of ``maximum``; last-stage TP ranks hold identical copies,
    hence the division by TP. (One all-reduce on the control group's device.)"""
    total, mx = coll.sum_max(sums.tolist(), [maximum])
    return torch.tensor(total, dtype=sums.dtype).reshape(sums.shape) / topo.grid.tp, float(mx[0])


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _epochs(model, plan: StepPlan, *, epochs: int, loss, values: bool = False, on_epoch=None) -> list:
    from megatron_rl.attention import make_forward_fn  # lazy: keeps vLLM/megatron out of CLI start-up

    outs = []
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        for indices, batches in zip(plan.shards, plan.mb_batches):
            loss.key_of = indices.__getitem__  # local group index in these micro-batches -> global group
            outs.append(model.step(batches, forward_fn=make_forward_fn(loss, values=values)))
    return outs


def _mean_norm(outs: list) -> float:
    norms = [o["grad_norm"] for o in outs if o["grad_norm"] is not None]
    return sum(norms) / max(len(norms), 1)


def policy_update(eng, cfg, batch, plan: StepPlan, *, lr: float, old_logp: Optional[dict] = None,
                  ref_logp: Optional[dict] = None) -> dict:
    """The policy's optimizer steps (every mini-batch, ``ppo_epochs`` times); its global loss
    statistics, the mismatch distribution, the mean grad norm and lr. PPO puts the KL in the
    rewards, so its loss has no KL term."""
    algo = cfg.algorithm
    if algo.name == "ppo":
        algo, ref_logp = dataclasses.replace(algo, kl_coef=0.0), None
    _set_lr(eng.optimizer, lr)
    loss = GRPOLoss(algo, rollout_logp=batch.logp_by_key(), key_of=plan.shards[0].__getitem__, old_logp=old_logp,
                    ref_logp=ref_logp)
    routing = getattr(eng, "routing", None)

    def on_epoch(e: int) -> None:  # the first pass sees every token once
        loss.record_ratios = e == 0
        if routing is not None:
            routing.counting = e == 0

    outs = _epochs(eng, plan, epochs=cfg.algorithm.ppo_epochs, loss=loss, on_epoch=on_epoch)
    sums, mx = global_sums(loss.sums(), topo=eng.topo, maximum=loss.mismatch_max)
    return {"grad_norm": _mean_norm(outs), "lr": lr, **stats_from_sums(sums, mismatch_max=mx),
            **_ratio_metrics(loss, topo=eng.topo, tis_cap=cfg.algorithm.tis_cap), **route_metrics(routing)}


def route_metrics(routing) -> dict:
    """``moe/route_mismatch``: the share of routing decisions (token, MoE layer) of the counted pass
    where training's own top-k expert set differs from the rollout's, over every rank (each rank
    counts the tokens its routers see: its SP slice, its stage's layers). With routing replay the
    routers use the rollout's routes, and the share compares the top-k they would have chosen with
    the one replayed. {} without routing control."""
    if routing is None:
        return {}
    routing.counting = False
    mismatched, decisions = routing.take_counts()
    total, _ = coll.sum_max([mismatched, decisions], [])
    return {"moe/route_mismatch": total[0] / max(total[1], 1.0), "moe/route_decisions": total[1]}


def _ratio_metrics(loss: GRPOLoss, *, topo, tis_cap) -> dict:
    """The per-token ratio statistics over every token of the step (first epoch: each once)."""
    mine = torch.cat(loss.ratio_diffs) if (loss.ratio_diffs and topo.is_last_stage and topo.coord.tp == 0) else None
    parts = [p for p in coll.all_gather_object(mine, group=topo.control_group) if p is not None]
    d = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)  # (tokens,) trainer - rollout
    return ratio_stats(d, rollout_logp=torch.zeros_like(d), tis_cap=tis_cap)


def critic_update(critic, cfg, plan: StepPlan, *, targets: PPOTargets, lr: float) -> dict:
    """The critic's optimizer steps over the same mini-batches, ``algorithm.critic_epochs`` times;
    its value loss and clip share (mean over the passes) and mean grad norm."""
    _set_lr(critic.optimizer, lr)
    loss = ValueLoss(cfg.algorithm, targets=targets, key_of=plan.shards[0].__getitem__)
    outs = _epochs(critic, plan, epochs=cfg.algorithm.critic_epochs, loss=loss, values=True)
    return {**value_stats(global_sums(loss.sums(), topo=critic.topo)[0]), "critic/grad_norm": _mean_norm(outs),
            "critic/lr": lr}


def ppo_step_targets(cfg, batch, rewards: list, *, values: dict, old_logp, ref_logp, topo) -> tuple:
    """GAE targets of every response (the same on every rank), and the KL reward term's figures:
    with ``algorithm.kl_coef > 0`` the per-token KL estimate (trainer minus reference log-probs,
    gathered) enters the rewards, and ``ppo/kl_mean`` (its token mean) and ``ppo/kl_reward``
    (``-kl_coef`` times its sum per response, averaged over responses) are logged."""
    a = cfg.algorithm
    keys = [(g, i) for g in range(len(batch.prompt_ids)) for i in range(batch.group_size)]
    kl, stats = None, {}
    if a.kl_coef > 0:
        kl = gather_table({k: old_logp[k] - ref_logp[k] for k in old_logp}, topo=topo)
        total = float(sum(kl[k].double().sum() for k in keys))
        tokens = sum(kl[k].numel() for k in keys)
        stats = {"ppo/kl_mean": total / max(tokens, 1), "ppo/kl_reward": -a.kl_coef * total / len(keys)}
    targets = ppo_targets(keys, scores=torch.tensor(rewards, dtype=torch.float64), values=values, gamma=a.gamma,
                          lam=a.lam, whiten_adv=a.whiten_advantages, kl=kl, kl_coef=a.kl_coef)
    return targets, stats
