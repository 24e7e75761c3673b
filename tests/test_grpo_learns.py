"""Tier 2, end to end in bf16: `megatron-rl train` on the demo task (configs/tiny_cpu.yaml, world 4:
megatron-core TP2 x PP2, vLLM TP1 x 4) with ``model.dtype=bfloat16`` on both sides learns: the mean
reward rises by at least ``MIN_GAIN`` within ``STEPS`` steps. In bf16 vLLM's log-probs are not the
trainer's: the logged mismatch is non-zero every step, and truncated importance sampling acts on it
(``tis_clip_frac``, the share of tokens whose weight hits ``algorithm.tis_cap``, is > 0). The cap
``TIS_CAP`` sits just above 1, where fp32 never reaches it (tests/test_grpo_e2e.py asserts 0 there).

Measured: 98 s wall for the launch, 104 s for the test (reward 0.044 -> 0.388, |dlogp| 1.4e-3..2.5e-3,
TIS-capped share 0.16..0.37); the launch timeout (900 s) is over twice that."""
import os
import time

import pytest

from _launch import REPO, torchrun
from megatron_rl.metrics import read_metrics, reward_gain

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

STEPS, MIN_GAIN = 8, 0.2
TIS_CAP = 1.001  # also tests/test_grpo_e2e.py (fp32: nothing capped)
TIMEOUT_S = 900  # the launch; the wall time must stay under half of it (asserted)


def test_reward_rises_in_bf16_with_tis_acting(tiny_models, tmp_path):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    proc, _ = torchrun(os.path.join(REPO, "megatron_rl", "cli.py"), nproc=4, out_dir=str(tmp_path), timeout=TIMEOUT_S,
                       args=["train", "--config", "configs/tiny_cpu.yaml", f"train.steps={STEPS}", "checkpoint.dir=null",
                             "model.dtype=bfloat16", f"algorithm.tis_cap={TIS_CAP}", f"logging.run_dir={run}",
                             f"model.hf_path={tiny_models['llama']}"])
    wall = time.perf_counter() - t0
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(STEPS))
    rewards = [r["reward/mean"] for r in rows]
    first, last, gain = reward_gain(rewards)
    mismatch = [r["mismatch/abs_mean"] for r in rows]
    capped = [r["tis_clip_frac"] for r in rows]
    print(f"bf16 GRPO: reward {first:.3f} -> {last:.3f} (gain {gain:+.3f}); |dlogp| mean per step "
          f"{['%.1e' % m for m in mismatch]}; TIS-capped share {['%.3f' % c for c in capped]}; wall {wall:.0f} s")
    assert gain >= MIN_GAIN, (rewards, gain)
    assert all(m > 1e-5 for m in mismatch), mismatch  # bf16 rollout vs bf16 trainer kernels: never identical
    assert all(c > 0 for c in capped) and all(c < 1 for c in capped), capped
    assert all(r["tis_weight_mean"] != 1.0 for r in rows), [r["tis_weight_mean"] for r in rows]
    assert f"gain: {gain:+.4f}" in proc.stdout + proc.stderr  # the trainer's own summary agrees
    assert wall < TIMEOUT_S / 2, f"{wall:.0f} s: the launch timeout must stay over twice the wall time"
