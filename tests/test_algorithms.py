"""Tier 1: advantages and losses against hand computations with small explicit numbers."""
import math

import pytest
import torch

from megatron_rl.algorithms import (aggregate, clipped_policy_loss, group_advantages, kl_penalty, logprob_mismatch,
                                    lr_at, policy_objective, reduce_parts, tis_weights)

pytestmark = pytest.mark.unit
LN2 = math.log(2.0)


def _close(got, want, tol=1e-6):
    assert torch.allclose(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                          atol=tol, rtol=0), (got, want)


# -- advantages --------------------------------------------------------------------------------

def test_grpo_advantages_by_hand():
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; group 2: all equal -> exactly 0
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(r, group_size=4, eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)  # 0.8660254
    _close(adv, [s, -s, -s, s, 0, 0, 0, 0])
    assert torch.equal(adv[4:], torch.zeros(4))
    # rounding noise of the mean (0.1 * 3 / 3 != 0.1) must not turn into +-1 after normalisation
    assert torch.equal(group_advantages(torch.full((3,), 0.1, dtype=torch.float64), group_size=3, eps=0.0),
                       torch.zeros(3, dtype=torch.float64))
    # G=2: rewards 3, 1 -> mean 2, std sqrt(2) -> +-1/sqrt(2)
    _close(group_advantages(torch.tensor([3.0, 1.0]), group_size=2, eps=0.0), [0.70710678, -0.70710678])
    # eps enters the denominator
    _close(group_advantages(torch.tensor([3.0, 1.0]), group_size=2, eps=0.5), [1 / (math.sqrt(2) + 0.5),
                                                                              -1 / (math.sqrt(2) + 0.5)])


def test_dr_grpo_and_rloo_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    _close(group_advantages(r, group_size=4, normalize_std=False), [0.5, -0.5, -0.5, 0.5])
    # leave-one-out: r0 baseline (0+0+1)/3, r1 baseline (1+0+1)/3
    _close(group_advantages(r, group_size=4, estimator="rloo", normalize_std=False), [2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_advantage_errors():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match=r"flat \(N\*G,\) with G=3"):
        group_advantages(torch.zeros(4), group_size=3)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages(torch.zeros(4), group_size=2, estimator="ppo")


# -- clipped policy loss -----------------------------------------------------------------------

def test_clipped_loss_by_hand():
    # seq 0: A=+1, ratios 1.5 (clipped to 1.28), 0.5 (unclipped: min takes the lower ratio)
    # seq 1: A=-1, ratios 1.1 (inside), 0.7 (clipped to 0.8)
    ratio = torch.tensor([[1.5, 0.5], [1.1, 0.7]])
    logp = ratio.log().requires_grad_(True)
    loss, clipped = clipped_policy_loss(logp, old_logp=torch.zeros(2, 2), advantages=torch.tensor([1.0, -1.0]),
                                        clip_low=0.2, clip_high=0.28)
    _close(loss, [[-1.28, -0.5], [1.1, 0.8]])
    _close(clipped, [[1, 0], [0, 1]])
    loss.sum().backward()
    # d(-A * ratio)/dlogp = -A * ratio on unclipped tokens, 0 on clipped ones
    _close(logp.grad, [[0.0, -0.5], [1.1, 0.0]])


def test_clip_higher_is_asymmetric():
    logp = torch.tensor([[math.log(1.25)]])
    adv = torch.tensor([1.0])
    sym, _ = clipped_policy_loss(logp, old_logp=torch.zeros(1, 1), advantages=adv, clip_low=0.2, clip_high=0.2)
    dapo, _ = clipped_policy_loss(logp, old_logp=torch.zeros(1, 1), advantages=adv, clip_low=0.2, clip_high=0.28)
    _close(sym, [[-1.2]])
    _close(dapo, [[-1.25]])


# -- KL ----------------------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    _close(kl_penalty(logp, ref_logp=ref, estimator="k1"), [LN2, -LN2])
    _close(kl_penalty(logp, ref_logp=ref, estimator="k2"), [0.5 * LN2 ** 2, 0.5 * LN2 ** 2])
    _close(kl_penalty(logp, ref_logp=ref, estimator="k3"), [0.5 - 1 + LN2, 2 - 1 - LN2])
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref_logp=ref, estimator="k9")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators_are_unbiased(estimator):
    # Exact expectation under p over a 3-way categorical: sum_x p(x) k(x) = KL(p || q) = 0.25 ln 2.
    p, q = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    est = (p * kl_penalty(p.log(), ref_logp=q.log(), estimator=estimator)).sum()
    _close(est, 0.25 * LN2, tol=1e-12)


# -- aggregation -------------------------------------------------------------------------------

def test_aggregation_modes_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])  # 100s are padding: must not count
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    _close(aggregate(x, mask=m, mode="token-mean"), (1 + 2 + 3 + 4) / 4)
    _close(aggregate(x, mask=m, mode="seq-mean-token-sum"), (6 + 4) / 2)
    _close(aggregate(x, mask=m, mode="seq-mean-token-mean"), (2 + 4) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(x, mask=m, mode="mean")


@pytest.mark.parametrize("mode,kw", [("token-mean", {"num_tokens": 4}), ("seq-mean-token-sum", {"num_seqs": 2}),
                                     ("seq-mean-token-mean", {"num_seqs": 2})])
def test_aggregation_shares_sum_to_global(mode, kw):
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    whole = aggregate(x, mask=m, mode=mode)
    shares = aggregate(x[:1], mask=m[:1], mode=mode, **kw) + aggregate(x[1:], mask=m[1:], mode=mode, **kw)
    _close(shares, whole)
    # megatron's convention: numerators and denominators add up over micro-batches and ranks
    (n0, d0), (n1, d1) = reduce_parts(x[:1], mask=m[:1], mode=mode), reduce_parts(x[1:], mask=m[1:], mode=mode)
    _close((n0 + n1) / (d0 + d1), whole)
    assert d0 + d1 == (4 if mode == "token-mean" else 2)


# -- truncated importance sampling and mismatch ------------------------------------------------

def test_tis_weights_by_hand():
    old = torch.log(torch.tensor([1.0, 3.0, 0.5])).requires_grad_(True)
    w = tis_weights(old, rollout_logp=torch.zeros(3), cap=2.0)
    _close(w, [1.0, 2.0, 0.5])
    assert not w.requires_grad


def test_mismatch_metrics_by_hand():
    train = torch.tensor([[-1.0, -2.0], [-0.5, 7.0]])
    roll = torch.tensor([[-1.1, -2.0], [-0.3, -9.0]])  # [1, 1] is padding
    m = torch.tensor([[1, 1], [1, 0]])
    got = logprob_mismatch(train, rollout_logp=roll, mask=m)
    d = [0.1, 0.0, -0.2]  # train - rollout on real tokens
    assert got["mismatch_abs_mean"] == pytest.approx(0.1, abs=1e-6)
    assert got["mismatch_abs_max"] == pytest.approx(0.2, abs=1e-6)
    assert got["mismatch_kl_k1"] == pytest.approx(sum(-x for x in d) / 3, abs=1e-6)
    assert got["mismatch_kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 3, abs=1e-6)


# -- the whole objective -----------------------------------------------------------------------

def test_policy_objective_by_hand():
    # ratio 1 (on-policy); TIS weights min(0.5/0.25, 1.5) = 1.5 and 1; A = 2;
    # pg per token -2 * w = [-3, -2] -> token-mean -2.5; k3 KL [0.193147, 0.306853] -> mean 0.25.
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_(True)
    loss, st = policy_objective(logp, old_logp=logp.detach(), advantages=torch.tensor([2.0]), mask=torch.ones(1, 2),
                                clip_low=0.2, clip_high=0.28, rollout_logp=torch.log(torch.tensor([[0.25, 0.25]])),
                                tis_cap=1.5, ref_logp=torch.log(torch.tensor([[0.25, 0.5]])), kl_coef=0.1)
    _close(loss, -2.5 + 0.1 * 0.25)
    _close(st["pg_loss"], -2.5)
    _close(st["kl"], 0.25)
    _close(st["clip_frac"], 0.0)
    _close(st["tis_weight_mean"], 1.25)
    _close(st["tis_clip_frac"], 0.5)
    loss.backward()
    # pg: -A * ratio * w / T = [-1.5, -1.0]; k3: (1 - exp(ref - logp)) * kl_coef / T = [0.025, -0.05]
    _close(logp.grad, [[-1.475, -1.05]])


def test_policy_objective_needs_ref_for_kl():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_objective(z, old_logp=z, advantages=torch.ones(1), mask=torch.ones(1, 1), clip_low=0.2,
                         clip_high=0.2, kl_coef=0.1)


def test_lr_schedule_by_hand():
    kw = dict(lr=1.0, min_lr=0.0, warmup_steps=2, total_steps=6)
    assert [lr_at(s, **kw) for s in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    # cosine over steps 2..5: progress 0, 1/3, 2/3, 1 -> 0.5 * (1 + cos(pi * p))
    _close([lr_at(s, schedule="cosine", **kw) for s in range(6)], [0.5, 1.0, 1.0, 0.75, 0.25, 0.0])
    assert lr_at(3, lr=1.0, min_lr=0.2, warmup_steps=0, total_steps=4, schedule="cosine") == pytest.approx(0.2)


# -- GRPO glue: the engine's loss over shared-prefix packed micro-batches ----------------------

def _rollout_batch():
    from megatron_rl.algorithms.grpo import RolloutBatch

    g = torch.Generator().manual_seed(0)
    resp = [[[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]], [[15], [16, 17]]]  # N=3, G=2, ragged
    logp = [[(-torch.rand(len(r), generator=g) - 0.1).tolist() for r in grp] for grp in resp]
    return RolloutBatch(rows=[], prompt_ids=[[1, 2], [3], [4, 4, 4]], response_ids=resp, logprobs=logp)


def test_dp_shards_and_groups_by_hand():
    from megatron_rl.algorithms.grpo import dp_shards, make_groups

    assert dp_shards(8, dp_rank=1, dp_size=2, mini_batches=2) == [[2, 3], [6, 7]]
    assert dp_shards(4, dp_rank=0, dp_size=1) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="do not split"):
        dp_shards(6, dp_rank=0, dp_size=4)
    groups = make_groups(_rollout_batch(), torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 0.0]), indices=[1, 2])
    assert [list(g.prompt) for g in groups] == [[3], [4, 4, 4]]
    assert [list(g.advantages) for g in groups] == [[0.5, -0.5], [0.0, 0.0]]


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_grpo_loss_over_packed_microbatches_equals_direct_objective(mode, kl_coef):
    from megatron_rl.algorithms.grpo import GRPOLoss, make_groups, stats_from_sums
    from megatron_rl.attention.packing import pack_groups
    from megatron_rl.attention.plan import build_local
    from megatron_rl.config import AlgorithmConfig

    batch = _rollout_batch()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    algo = AlgorithmConfig(group_size=2, loss_agg=mode, tis_cap=1.02, clip_low=0.2, clip_high=0.28, kl_coef=kl_coef)
    g = torch.Generator().manual_seed(1)
    # the trainer's log-probs: the rollout's plus a small mismatch, per (group, response)
    train = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in batch.logp_by_key().items()}
    # the reference model's log-probs (used when kl_coef > 0): further away
    ref_table = {k: v - 0.3 * torch.rand(v.shape, generator=g) for k, v in train.items()}
    # Direct: pad all 6 responses into (6, 4) and call the objective once.
    keys = [(gi, i) for gi in range(3) for i in range(2)]
    lp = torch.zeros(6, 4)
    roll = torch.zeros(6, 4)
    ref = torch.zeros(6, 4)
    mask = torch.zeros(6, 4)
    for b, k in enumerate(keys):
        n = train[k].numel()
        lp[b, :n], roll[b, :n], ref[b, :n], mask[b, :n] = train[k], batch.logp_by_key()[k], ref_table[k], 1
    lp.requires_grad_(True)
    want, st = policy_objective(lp, old_logp=lp.detach(), advantages=adv, mask=mask, clip_low=0.2, clip_high=0.28,
                                loss_agg=mode, rollout_logp=roll, tis_cap=1.02, ref_logp=ref, kl_coef=kl_coef)
    want.backward()
    # Packed: groups [0] and [1, 2] in two micro-batches; the loss sees (N_local,) log-probs.
    loss = GRPOLoss(algo, rollout_logp=batch.logp_by_key(), key_of=lambda j: j,
                    ref_logp=ref_table if kl_coef else None)
    nums, dens, grads = [], [], {}
    for indices in ([0], [1, 2]):
        (packed,) = pack_groups(make_groups(batch, adv, indices=indices), max_tokens=64)
        local = build_local(packed)
        loss.key_of = indices.__getitem__
        flat = torch.cat([train[(indices[gi], i)] for gi, i in local.response_keys]).requires_grad_(True)
        num, den, metrics = loss(flat, local)
        num.backward()
        nums.append(num.detach())
        dens.append(int(den))
        for (gi, i), part in zip(local.response_keys, local.split_responses(flat.grad)):
            grads[(indices[gi], i)] = part
    total_den = sum(dens)
    _close(sum(nums) / total_den, want)
    for b, k in enumerate(keys):  # d(sum num)/d logp / total_den == d(direct loss)/d logp
        _close(grads[k] / total_den, lp.grad[b, :train[k].numel()])
    got = stats_from_sums(loss.sums(), mismatch_max=loss.mismatch_max)
    _close(got["loss"], want.detach())
    for name in ("pg_loss", "kl", "clip_frac", "tis_weight_mean", "tis_clip_frac"):
        _close(got[name], st[name])
    assert (got["kl"] > 1e-3) == (kl_coef > 0)  # the KL statistic is reported (and non-trivial) with a reference
    mm = logprob_mismatch(lp.detach(), rollout_logp=roll, mask=mask)
    assert got["mismatch/abs_mean"] == pytest.approx(mm["mismatch_abs_mean"], abs=1e-6)
    assert got["mismatch/abs_max"] == pytest.approx(mm["mismatch_abs_max"], abs=1e-6)
    assert got["mismatch/kl_k3"] == pytest.approx(mm["mismatch_kl_k3"], abs=1e-6)
    assert 0 < got["tis_clip_frac"] < 1  # the cap 1.02 bites on some tokens, not all
