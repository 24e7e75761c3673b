"""Tier 2: the trainer's GRPO step gives the same loss, statistics and updated weights at every
training layout (real megatron-core over gloo, 4 processes, one launch)."""
import os

import pytest

from _launch import REPO, torchrun

pytestmark = pytest.mark.multirank

# (tp, pp, mini_batches) on 4 ranks: DP fills the rest. Pairs with equal mini_batches must agree.
LAYOUTS = ["2,2,1", "1,1,1", "2,1,2", "1,2,2"]


def test_grpo_step_matches_across_layouts(tiny_models, tmp_path):
    _, res = torchrun(os.path.join(REPO, "tests", "workers", "grpo_step.py"), nproc=4, out_dir=str(tmp_path),
                      args=[tiny_models["llama"], *LAYOUTS], timeout=900)
    out = res[0]
    for spec in LAYOUTS:
        first, second = out[spec]
        # the "rollout" log-probs are the trainer's own: no mismatch, TIS weights exactly 1
        assert first["mismatch/abs_max"] < 1e-6 and first["tis_weight_mean"] == pytest.approx(1.0, abs=1e-6), spec
        # one update later the same log-probs are stale: the mismatch metrics see it
        assert second["mismatch/abs_mean"] > 1e-3 and second["mismatch/kl_k3"] > 0, (spec, second)
    for a, b in [("2,2,1", "1,1,1"), ("2,1,2", "1,2,2")]:
        for step in range(2):  # step 1's loss depends on step 0's update: equal weights after it
            for key in ("loss", "pg_loss", "clip_frac", "tis_weight_mean", "mismatch/abs_mean", "grad_norm"):
                x, y = out[a][step][key], out[b][step][key]
                assert x == pytest.approx(y, rel=1e-4, abs=1e-6), (a, b, step, key, x, y)
    assert out["2,1,2"][0]["clip_frac"] > 0  # the second mini-batch is off-policy: the PPO clip bites
    assert out["2,2,1"][0]["clip_frac"] == 0  # on-policy single update: ratio 1, nothing clipped
