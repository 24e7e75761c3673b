"""Tier 2, end to end: `megatron-rl train` runs 3 GRPO steps on CPU at world 4 (megatron-core
TP2 x PP2 with shared-prefix packing, vLLM TP1 x 4 replicas, direct weight sync, release and
resume every step) and writes every metric field; after every sync the rollout's log-probs
equal the trainer's on the same tokens (fp32). It runs with the KL to the frozen reference model
(``algorithm.kl_coef > 0``): the KL is 0 while the policy is still the reference (step 0) and
positive after updates, and the reference's forward is timed as its own phase."""
import os

import pytest

from _launch import REPO, torchrun
from megatron_rl.metrics import STEP_FIELDS, read_metrics

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
TIS_CAP = 1.001  # just above 1: fp32's mismatch (< 1e-4) never reaches it, bf16's does (test_grpo_learns.py)


def test_train_three_steps(tiny_models, tmp_path):
    run = tmp_path / "run"
    proc, _ = torchrun(os.path.join(REPO, "megatron_rl", "cli.py"), nproc=4, out_dir=str(tmp_path), timeout=900,
                       args=["train", "--config", "configs/tiny_cpu.yaml", "train.steps=3", "checkpoint.dir=null",
                             f"logging.run_dir={run}", f"model.hf_path={tiny_models['llama']}",
                             "algorithm.kl_coef=0.05", f"algorithm.tis_cap={TIS_CAP}"])
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        missing = [f for f in STEP_FIELDS if r.get(f) is None]
        assert not missing, (r["step"], missing)
        # vLLM sampled these tokens with weights synced from the trainer: same log-probs (fp32)
        assert r["mismatch/abs_max"] < 1e-4, r
        assert r["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert r["tis_clip_frac"] == 0.0, r  # the negative control of tests/test_grpo_learns.py (bf16: > 0)
        assert r["mem/release_mib"] < r["mem/rollout_mib"], r  # releasing vLLM's memory shows in RSS
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["response_len/mean"] > 0
        assert r["time/ref_s"] > 0 and r["mem/ref_mib"] > 0  # the reference's phase (KL on)
    assert rows[0]["kl"] <= 1e-6, rows[0]  # step 0: the policy is still the reference
    assert rows[1]["kl"] > 1e-6 and rows[2]["kl"] > 1e-6, rows  # after updates it has moved away
    out = proc.stdout + proc.stderr
    assert out.count("reward first 20%:") == 1  # rank 0 speaks, once
