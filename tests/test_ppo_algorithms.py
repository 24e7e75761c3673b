"""Tier 1: PPO's pure functions (GAE, value loss, whitening, explained variance), DAPO's dynamic
sampling filter and the per-token mismatch statistics, against numbers worked out by hand."""
import math

import pytest
import torch

from megatron_rl.algorithms.dynamic import DynamicPool, informative_groups
from megatron_rl.algorithms.mismatch import ratio_stats
from megatron_rl.algorithms.ppo import (clipped_value_loss, explained_variance, gae_advantages, token_rewards,
                                        whiten)

pytestmark = pytest.mark.unit


def _close(got, want, tol=1e-6):
    assert torch.allclose(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                          atol=tol, rtol=0), (got, want)


MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # response 1 has 2 tokens, then padding


def test_token_rewards_by_hand():
    kl = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.2, 5.0]])  # 5.0 sits on padding: ignored
    r = token_rewards(torch.tensor([1.0, 0.0]), mask=MASK, kl=kl, kl_coef=0.5)
    _close(r, [[0.0, 0.0, 1.0], [-0.05, 0.1, 0.0]])
    with pytest.raises(ValueError, match="kl_coef > 0 needs"):
        token_rewards(torch.tensor([1.0, 0.0]), mask=MASK, kl_coef=0.5)


def test_gae_three_tokens_by_hand():
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72). Row 0: V = [0.5, 0.2, 0.4], reward 1 at the last token.
    #   d2 = 1 - 0.4 = 0.6                 A2 = 0.6
    #   d1 = 0.9*0.4 - 0.2 = 0.16          A1 = 0.16 + 0.72*0.6   = 0.592
    #   d0 = 0.9*0.2 - 0.5 = -0.32         A0 = -0.32 + 0.72*0.592 = 0.10624
    # Row 1 (2 tokens, a 9.0 value on padding that must not leak): V = [0.3, 0.1], r = [-0.05, 0.1]
    #   d1 = 0.1 - 0.1 = 0                 A1 = 0
    #   d0 = -0.05 + 0.9*0.1 - 0.3 = -0.26 A0 = -0.26
    values = torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.1, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [-0.05, 0.1, 0.0]])
    out = gae_advantages(rewards, values=values, mask=MASK, gamma=0.9, lam=0.8)
    _close(out.advantages, [[0.10624, 0.592, 0.6], [-0.26, 0.0, 0.0]])
    _close(out.returns, [[0.60624, 0.792, 1.0], [0.04, 0.1, 0.0]])
    # gamma = lam = 1: Monte Carlo, A_t = (sum of rewards from t) - V_t
    mc = gae_advantages(rewards, values=values, mask=MASK, gamma=1.0, lam=1.0)
    _close(mc.advantages, [[0.5, 0.8, 0.6], [0.05 - 0.3, 0.1 - 0.1, 0.0]])
    # lam = 0: one-step TD, A_t = r_t + gamma V_{t+1} - V_t
    td = gae_advantages(rewards, values=values, mask=MASK, gamma=0.9, lam=0.0)
    _close(td.advantages, [[-0.32, 0.16, 0.6], [-0.26, 0.0, 0.0]])


def test_clipped_value_loss_by_hand():
    # token 0: plain (1-0.5)^2 = 0.25; V_clip = 0.8+0.1 = 0.9 -> 0.16; max 0.25 -> 0.125, unclipped
    # token 1: plain (0.45-0.5)^2 = 0.0025; V_clip = 0+0.1 -> 0.16 is larger -> 0.08, clipped
    # token 2: V = R -> 0
    v = torch.tensor([[1.0, 0.45, 0.5]], requires_grad=True)
    old, ret = torch.tensor([[0.8, 0.0, 0.5]]), torch.tensor([[0.5, 0.5, 0.5]])
    loss, clipped = clipped_value_loss(v, old_values=old, returns=ret, clip=0.1)
    _close(loss, [[0.125, 0.08, 0.0]])
    _close(clipped, [[0.0, 1.0, 0.0]])
    loss.sum().backward()
    _close(v.grad, [[0.5, 0.0, 0.0]])  # the clipped token gets no gradient; d/dV 0.5(V-R)^2 = V-R
    plain, none = clipped_value_loss(v.detach(), old_values=old, returns=ret, clip=None)
    _close(plain, [[0.125, 0.00125, 0.0]])
    assert none.sum() == 0


def test_whiten_and_explained_variance_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [100.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    s = 1 / math.sqrt(2 / 3)  # mean 2, population var 2/3
    _close(whiten(x, mask=mask, eps=0.0), [[-s, 0.0, s], [0.0, 0.0, 0.0]])
    _close(whiten(x, mask=mask, eps=0.0, shift_mean=False), [[2 - s, 2.0, 2 + s], [0.0, 0.0, 0.0]])
    # returns [1, 2, 3], values [1, 2, 2]: residual var 2/9, returns var 2/3 -> 1 - 1/3
    ev = explained_variance(torch.tensor([[1.0, 2.0, 2.0]]), returns=torch.tensor([[1.0, 2.0, 3.0]]),
                            mask=torch.ones(1, 3, dtype=torch.bool))
    assert ev == pytest.approx(2 / 3, abs=1e-12)
    assert math.isnan(explained_variance(torch.zeros(1, 2), returns=torch.ones(1, 2), mask=torch.ones(1, 2)))


def test_dynamic_sampling_by_hand():
    # G = 2: [1,1] all equal (drop), [0,1] keep, [.5,.5] drop, [0,.3] keep
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.3]), group_size=2) == [1, 3]
    pool = DynamicPool(target=3)
    assert pool.add(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.3]), group_size=2) == [1, 3]
    assert not pool.full
    assert pool.add(torch.tensor([0.0, 0.0, 1.0, 0.0]), group_size=2) == [1]
    assert pool.full and pool.chosen() == [(0, 1), (0, 3), (1, 1)]
    assert pool.metrics() == {"dynamic/gen_batches": 2, "dynamic/groups_sampled": 6, "dynamic/groups_kept": 3,
                              "dynamic/groups_topped_up": 0}
    # batches ran out: the batch is topped up with dropped groups, in sampling order
    short = DynamicPool(target=3)
    short.add(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), group_size=2)
    assert short.chosen() == [(0, 1), (0, 0), (0, 2)] and short.metrics()["dynamic/groups_topped_up"] == 2


def test_ratio_stats_by_hand():
    ratios = torch.tensor([1.0, 1.05, 0.8, 1.2, 3.0], dtype=torch.float64)
    roll = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5], dtype=torch.float64)
    s = ratio_stats(roll + ratios.log(), rollout_logp=roll, tis_cap=2.0)
    # sorted [0.8, 1.0, 1.05, 1.2, 3.0]; q at position q*4, linear in between
    assert s["mismatch/ratio_q50"] == pytest.approx(1.05)
    assert s["mismatch/ratio_q10"] == pytest.approx(0.8 + 0.4 * 0.2)
    assert s["mismatch/ratio_q90"] == pytest.approx(1.2 + 0.6 * 1.8)
    assert s["mismatch/ratio_outside_frac"] == pytest.approx(0.6)  # 0.8, 1.2 and 3.0
    assert s["mismatch/tis_capped_frac"] == pytest.approx(0.2)  # 3.0 >= 2.0
    assert ratio_stats(roll + ratios.log(), rollout_logp=roll, tis_cap=None)["mismatch/tis_capped_frac"] == 0.0
