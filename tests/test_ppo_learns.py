"""Tier 2, end to end: PPO with a critic learns the demo task, its critic learns too, and DAPO
dynamic sampling acts, in ONE launch of `megatron-rl train` (configs/tiny_cpu.yaml, world 4:
megatron-core TP2 x PP2 for the policy and the critic, vLLM TP1 x 4) with ``algorithm.name=ppo``
and ``algorithm.dynamic_sampling=true``. Pairs of responses (``G=2``) make all-equal groups
(every response digit-free) common at the start, so the filter has something to drop.

Asserted, each against numbers the trainer logs:

* the mean reward rises by at least ``MIN_GAIN`` (first 20% of steps vs last 20%);
* the critic's explained variance (of the values the advantages came from, measured before its
  update on each new rollout) rises by at least ``MIN_EV_RISE``, and ends positive;
* dynamic sampling: over the run fewer groups are kept than sampled, the steps that dropped
  groups sampled another rollout batch, and every step still trained ``data.prompts_per_step``
  groups (``dynamic/groups_topped_up`` counts zero-advantage fillers, recomputed here from the
  kept and target counts), and the trained batch's rewards hold no all-equal group but those
  fillers (``reward/zero_adv_groups``, computed from the trained rewards, not by the filter).

Measured (10 steps, 2 cores shared with other jobs, load ~20): 105 s wall for the launch, 112 s
for the test; reward 0.059 -> 0.350, explained variance -0.000 -> +0.263, 21..29 of 32 groups kept
per step (two rollout batches each). The launch timeout (900 s) is over twice the wall time.
"""
import os
import time

import pytest

from _launch import REPO, torchrun
from megatron_rl.metrics import read_metrics, reward_gain

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

STEPS, PROMPTS, G = 10, 16, 2
MIN_GAIN, MIN_EV_RISE = 0.2, 0.05
TIMEOUT_S = 900  # the launch; the wall time must stay under half of it (asserted)


def test_ppo_learns_with_a_critic_and_dynamic_sampling(tiny_models, tmp_path):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    proc, _ = torchrun(os.path.join(REPO, "megatron_rl", "cli.py"), nproc=4, out_dir=str(tmp_path), timeout=TIMEOUT_S,
                       args=["train", "--config", "configs/tiny_cpu.yaml", "algorithm.name=ppo",
                             "algorithm.dynamic_sampling=true", f"algorithm.group_size={G}",
                             f"data.prompts_per_step={PROMPTS}",
                             f"train.steps={STEPS}", "checkpoint.dir=null", "logging.progress=false",
                             f"logging.run_dir={run}", f"model.hf_path={tiny_models['llama']}"])
    wall = time.perf_counter() - t0
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(STEPS))
    rewards = [r["reward/mean"] for r in rows]
    ev = [r["critic/explained_var"] for r in rows]
    first, last, gain = reward_gain(rewards)
    ev_first, ev_last, ev_rise = reward_gain(ev)
    sampled = [r["dynamic/groups_sampled"] for r in rows]
    kept = [r["dynamic/groups_kept"] for r in rows]
    batches = [r["dynamic/gen_batches"] for r in rows]
    print(f"PPO: reward {first:.3f} -> {last:.3f} (gain {gain:+.3f}); explained variance {ev_first:+.3f} -> "
          f"{ev_last:+.3f}; groups kept/sampled per step {list(zip(kept, sampled))}; wall {wall:.0f} s")
    assert gain >= MIN_GAIN, (rewards, gain)
    assert ev_rise >= MIN_EV_RISE and ev_last > 0, ev
    assert f"gain: {gain:+.4f}" in proc.stdout + proc.stderr  # the trainer's own summaries agree
    assert f"rise: {ev_rise:+.4f}" in proc.stdout + proc.stderr
    # dynamic sampling dropped groups and sampled more to fill the batch
    assert sum(kept) < sum(sampled), (kept, sampled)
    for r in rows:
        assert r["dynamic/groups_sampled"] == PROMPTS * r["dynamic/gen_batches"], r
        dropped = r["dynamic/groups_sampled"] - r["dynamic/groups_kept"]
        if dropped and r["dynamic/gen_batches"] < 4:  # max_gen_batches (the default) not reached
            assert r["dynamic/groups_kept"] >= PROMPTS and r["dynamic/groups_topped_up"] == 0, r
        assert r["dynamic/groups_topped_up"] == max(PROMPTS - r["dynamic/groups_kept"], 0), r
        # the trained batch's own rewards: all-equal groups only as fillers
        assert r["reward/zero_adv_groups"] == r["dynamic/groups_topped_up"], r
    assert max(batches) > 1, batches  # at least one step over-sampled
    assert wall < TIMEOUT_S / 2, f"{wall:.0f} s: the launch timeout must stay over twice the wall time"
