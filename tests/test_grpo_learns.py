"""Tier 2, end to end in bf16 on the MoE model: `megatron-rl train` on the MoE demo config
(configs/tiny_moe_cpu.yaml: the tiny Qwen3-MoE, 8 experts top-2, routing replay on) with
``model.dtype=bfloat16`` on both sides, training at PP2 x EP2 (DP2: the bf16 pipeline's p2p and the
expert all-to-all in one run), vLLM TP1 x 4, learns: the mean reward rises by at least ``MIN_GAIN``
within ``STEPS`` steps.

In bf16 vLLM's numbers are not the trainer's, so none of these can pass by construction:
- the logged log-prob mismatch is non-zero every step, and truncated importance sampling acts on
  it (``tis_clip_frac``, the share of tokens whose weight hits ``algorithm.tis_cap``, is > 0; the
  cap ``TIS_CAP`` sits just above 1, where fp32 never reaches it: tests/test_grpo_e2e.py asserts 0);
- training's own router would choose other experts than the rollout's on some decisions
  (``moe/route_mismatch`` > 0 on some step, < 5 % on every step: measured 0.4-1.6 %), which is
  what routing replay takes out of the loss.

Measured: 39 s wall for the launch (reward 0.043 -> 0.596 over 10 steps, |dlogp| 1.2e-3..2.3e-3,
TIS-capped share 0.10..0.34, route mismatch 0.4-1.6 %); the launch timeout (900 s) is far over twice that.
Dense GRPO at TP2 x PP2 runs in fp32 in tests/test_grpo_e2e.py; the dense bf16 trainer, in the GPU
check's lm-train (tests/gpu/check.py, world 1)."""
import os
import time

import pytest

from _launch import REPO, torchrun
from megatron_rl.metrics import read_metrics, reward_gain

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

STEPS, MIN_GAIN = 10, 0.2
TIS_CAP = 1.001  # also tests/test_grpo_e2e.py (fp32: nothing capped)
TIMEOUT_S = 900  # the launch; the wall time must stay under half of it (asserted)
LAYERS = 2  # the tiny MoE's layers, every one MoE


def test_moe_reward_rises_in_bf16_with_tis_and_route_mismatch_acting(tiny_models, tmp_path):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    proc, _ = torchrun(os.path.join(REPO, "megatron_rl", "cli.py"), nproc=4, out_dir=str(tmp_path), timeout=TIMEOUT_S,
                       args=["train", "--config", "configs/tiny_moe_cpu.yaml", f"train.steps={STEPS}",
                             "checkpoint.dir=null", "model.dtype=bfloat16", f"algorithm.tis_cap={TIS_CAP}",
                             "parallel.tp=1", "parallel.pp=2", "parallel.ep=2", "parallel.sequence_parallel=false",
                             f"logging.run_dir={run}", f"model.hf_path={tiny_models['qwen3-moe']}"])
    wall = time.perf_counter() - t0
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(STEPS))
    rewards = [r["reward/mean"] for r in rows]
    first, last, gain = reward_gain(rewards)
    mismatch = [r["mismatch/abs_mean"] for r in rows]
    capped = [r["tis_clip_frac"] for r in rows]
    routes = [r["moe/route_mismatch"] for r in rows]
    print(f"bf16 MoE GRPO: reward {first:.3f} -> {last:.3f} (gain {gain:+.3f}); |dlogp| mean per step "
          f"{['%.1e' % m for m in mismatch]}; TIS-capped share {['%.3f' % c for c in capped]}; "
          f"route mismatch {['%.4f' % m for m in routes]}; wall {wall:.0f} s")
    assert gain >= MIN_GAIN, (rewards, gain)
    assert all(m > 1e-5 for m in mismatch), mismatch  # bf16 rollout vs bf16 trainer kernels: never identical
    assert all(c > 0 for c in capped) and all(c < 1 for c in capped), capped
    assert all(r["tis_weight_mean"] != 1.0 for r in rows), [r["tis_weight_mean"] for r in rows]
    assert max(routes) > 0 and all(0 <= m < 0.05 for m in routes), routes
    for r in rows:  # decisions are counted per (token, layer): a whole number of tokens x 2 layers
        assert r["moe/route_decisions"] > 0 and r["moe/route_decisions"] % LAYERS == 0, r["moe/route_decisions"]
    assert f"gain: {gain:+.4f}" in proc.stdout + proc.stderr  # the trainer's own summary agrees
    assert wall < TIMEOUT_S / 2, f"{wall:.0f} s: the launch timeout must stay over twice the wall time"
