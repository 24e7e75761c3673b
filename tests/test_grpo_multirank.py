"""Tier 2: the trainer's GRPO step gives the same loss, statistics and updated weights at every
training layout, on naive packing as on shared-prefix packing, and with the KL to a frozen,
offloaded reference model (real megatron-core over gloo, 4 processes, one launch), and the same
for PPO with a critic (``*,ppo``: its choreography, micro-batching invariance and critic offload). The batch and
its rollout log-probs come from a real vLLM engine in bf16 while the trainer is fp32: truncated
importance sampling reweights and caps real mismatch (and a tis_cap=null run shows it off)."""
import os

import pytest

from _launch import REPO, torchrun

pytestmark = pytest.mark.multirank

# (tp, pp, mini_batches[, variant]) on 4 ranks: DP fills the rest. Pairs with equal mini_batches must agree.
LAYOUTS = ["2,2,1", "1,1,1", "2,1,2", "1,2,2", "2,1,2,naive", "2,2,1,kl", "1,1,1,notis",
           "2,2,1,ppo", "1,1,1,ppo", "2,2,1,ppo_naive", "1,1,1,ppo_kl",
           "1,1,1,ppo_distopt"]
PPO_STATS = ("loss", "pg_loss", "clip_frac", "grad_norm", "critic/value_loss", "critic/grad_norm", "critic/clip_frac",
             "critic/explained_var", "mismatch/ratio_q50", "mismatch/tis_capped_frac")
KL_COEF, TIS_CAP = 0.1, 1.002  # tests/workers/grpo_step.py
STATS = ("loss", "pg_loss", "clip_frac", "tis_weight_mean", "mismatch/abs_mean", "grad_norm")


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo_step")
    _, res = torchrun(os.path.join(REPO, "tests", "workers", "grpo_step.py"), nproc=4, out_dir=str(tmp),
                      args=[tiny_models["llama"], *LAYOUTS], timeout=900)
    return res


def test_grpo_step_matches_across_layouts(results):
    out = {spec: results[0][spec]["steps"] for spec in LAYOUTS}
    for spec in [x for x in LAYOUTS if "ppo" not in x]:
        first, second = out[spec]
        # one update later the rollout's log-probs are also stale: the mismatch grows
        assert second["mismatch/abs_mean"] > first["mismatch/abs_mean"] and second["mismatch/kl_k3"] > 0, spec
    for a, b in [("2,2,1", "1,1,1"), ("2,1,2", "1,2,2")]:
        for step in range(2):  # step 1's loss depends on step 0's update: equal weights after it
            for key in STATS:
                x, y = out[a][step][key], out[b][step][key]
                assert x == pytest.approx(y, rel=1e-4, abs=1e-6), (a, b, step, key, x, y)
    assert out["2,1,2"][0]["clip_frac"] > 0  # the second mini-batch is off-policy: the PPO clip bites
    assert out["2,2,1"][0]["clip_frac"] == 0  # on-policy single update: ratio 1, nothing clipped


def test_naive_packing_equals_shared_prefix(results):
    """train.shared_prefix=false (G sequences [P, R_i]) is the same step as shared-prefix packing:
    same layout (TP2 x DP2, two mini-batches, so old log-probs and the clip are exercised)."""
    naive, shared = results[0]["2,1,2,naive"]["steps"], results[0]["2,1,2"]["steps"]
    for step in range(2):
        for key in (*STATS, "mismatch/abs_max", "mismatch/kl_k3", "tis_clip_frac"):
            x, y = naive[step][key], shared[step][key]
            assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (step, key, x, y)


def test_kl_to_reference(results):
    """algorithm.kl_coef > 0: the reference equals the initial policy (KL 0 at step 0, and the same
    step as without KL), differs after an update, and leaves memory when offloaded."""
    kl, plain = results[0]["2,2,1,kl"]["steps"], results[0]["2,2,1"]["steps"]
    assert kl[0]["kl"] <= 1e-6, kl[0]
    for key in STATS:  # the k3 KL and its gradient are exactly 0 where logp == ref_logp
        assert kl[0][key] == pytest.approx(plain[0][key], rel=1e-6, abs=1e-7), (key, kl[0][key], plain[0][key])
    assert kl[1]["kl"] > 1e-6, kl[1]  # one update later the policy has moved away from the reference
    assert kl[1]["pg_loss"] == pytest.approx(plain[1]["pg_loss"], rel=1e-5, abs=1e-7)  # same weights after step 0
    assert kl[1]["loss"] == pytest.approx(kl[1]["pg_loss"] + KL_COEF * kl[1]["kl"], rel=1e-6, abs=1e-9)
    assert results[0]["2,2,1,kl"]["phases"] == ["ref", "ref"]  # timed as its own phase, once per step
    assert results[0]["2,2,1"]["phases"] == []
    for rank, res in enumerate(results):
        c = res["2,2,1,kl"]["checks"]
        assert c["ref_vs_policy_max_abs"] == 0.0, (rank, c)  # initial policy == reference, bitwise
        assert c["ref_bitwise_after_reload"], (rank, c)  # offload + onload changes no bit
        # offload gives back the reference's parameter bytes, onload takes them again (this rank's RSS)
        assert 0.97 <= c["rss_drop"] / c["param_bytes"] <= 1.03, (rank, c)
        assert 0.97 <= c["rss_rise"] / c["param_bytes"] <= 1.03, (rank, c)


def test_tis_acts_on_real_rollout_mismatch(results):
    """vLLM bf16 vs trainer fp32 at the same weights: the mismatch is real, and the TIS weights and
    capped share equal what the two log-prob tables give (computed in the worker, not by the loss).
    Negative control: with algorithm.tis_cap=null every weight is 1 and nothing is capped."""
    lengths = results[0]["rollout"]["lengths"]
    assert len(lengths) == 16 and min(lengths) >= 1, lengths
    for spec in [x for x in LAYOUTS if "ppo" not in x]:
        first, exp = results[0][spec]["steps"][0], results[0][spec]["expected_tis"]
        assert exp["tokens"] == sum(lengths) and exp["abs_mean"] > 1e-3, (spec, exp)  # bf16 vs fp32: real mismatch
        assert first["mismatch/abs_mean"] == pytest.approx(exp["abs_mean"], rel=1e-3), (spec, first, exp)
        if spec.endswith("notis"):
            assert first["tis_clip_frac"] == 0.0 and first["tis_weight_mean"] == 1.0, (spec, first)
            continue
        assert 0.0 < exp["capped_frac"] < 1.0, (spec, exp)  # the cap bites on some tokens, not all
        assert first["tis_clip_frac"] == pytest.approx(exp["capped_frac"], abs=1.5 / exp["tokens"]), (spec, first, exp)
        assert first["tis_weight_mean"] == pytest.approx(exp["weight_mean"], rel=1e-4), (spec, first, exp)
        assert abs(first["tis_weight_mean"] - 1.0) > 1e-4, (spec, first)
    capped, plain = (results[0][s]["steps"][0] for s in ("1,1,1", "1,1,1,notis"))
    assert capped["pg_loss"] != pytest.approx(plain["pg_loss"], rel=1e-6), (capped, plain)  # TIS changes the loss


def _rel_close(x: float, y: float, rel: float = 1e-5) -> bool:
    # explained variance is 1 - a ratio, near 0 here: its floor makes the bound relative to that ratio
    return abs(x - y) <= rel * max(abs(y), 1e-2)


def test_ppo_step_matches_across_layouts_and_packings(results):
    """PPO (critic + GAE, two epochs over the rollout): TP2 x PP2 reproduces TP1 x DP4, and naive
    packing reproduces shared-prefix packing, in policy loss, value loss and both grad norms."""
    tp1, tp2, naive = (results[0][s]["steps"] for s in ("1,1,1,ppo", "2,2,1,ppo", "2,2,1,ppo_naive"))
    for step in range(2):
        for key in PPO_STATS:
            assert _rel_close(tp2[step][key], tp1[step][key]), (step, key, tp2[step][key], tp1[step][key])
            assert _rel_close(naive[step][key], tp2[step][key]), (step, key, naive[step][key], tp2[step][key])
    first, second = tp2
    assert first["critic/explained_var"] == 0.0  # the zero-initialised head predicts 0 for every token
    assert second["critic/explained_var"] != 0.0 and second["critic/value_loss"] < first["critic/value_loss"]
    assert first["clip_frac"] > 0  # the second epoch is off-policy: the PPO clip bites
    assert first["critic/clip_frac"] == 0.0 < second["critic/clip_frac"]  # values start where they were
    assert results[0]["2,2,1,ppo"]["phases"] == ["critic", "train", "critic_train"] * 2


def test_ppo_kl_in_the_rewards(results):
    """PPO with algorithm.kl_coef > 0 (InstructGPT-style: the KL to the frozen reference is a
    per-token reward): its logged KL figures equal those computed from the policy's and the
    reference's own log-prob tables (another code path); at step 0 the reference is the policy,
    so the step equals the KL-free one; after an update the KL moves the critic's returns."""
    kl, plain = results[0]["1,1,1,ppo_kl"], results[0]["1,1,1,ppo"]["steps"]
    assert kl["phases"] == ["critic", "ref", "train", "critic_train"] * 2
    for step, (got, want) in enumerate(zip(kl["steps"], kl["kl_expected"])):
        for key in ("ppo/kl_mean", "ppo/kl_reward"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (step, key, got[key], want[key])
    first, second = kl["steps"]
    assert first["ppo/kl_mean"] == 0.0 and second["ppo/kl_mean"] != 0.0
    for key in PPO_STATS:
        assert first[key] == plain[0][key], (key, first[key], plain[0][key])
    assert second["critic/value_loss"] != plain[1]["critic/value_loss"]  # the KL term reached the returns


def test_ppo_with_the_distributed_optimizer(results):
    """parallel.distributed_optimizer=true (Adam state sharded over DP 4): the parameters are views
    of DDP's buffer, which the critic's offload empties and refills in place (InPlaceStore). Two
    PPO steps, with two critic offload cycles each, equal the plain optimizer's, and the offload
    still returns what the critic holds."""
    plain, sharded = results[0]["1,1,1,ppo"]["steps"], results[0]["1,1,1,ppo_distopt"]["steps"]
    for step in range(2):
        for key in PPO_STATS:
            assert _rel_close(sharded[step][key], plain[step][key]), (step, key, sharded[step][key], plain[step][key])
    assert sharded[1]["critic/value_loss"] != sharded[0]["critic/value_loss"]  # the critic did train
    for rank, res in enumerate(results):
        c = res["1,1,1,ppo_distopt"]["critic"]
        # the parameters did live in DDP's buffers (the in-place path ran); without it, nothing does
        # (DDP pads its buffer a little past the parameters' bytes)
        assert 1.0 <= c["in_place_bytes"] / c["param_bytes"] <= 1.01, c
        assert res["1,1,1,ppo"]["critic"]["in_place_bytes"] == 0
        assert 0.97 <= c["rss_drop"] / c["state_bytes"] <= 1.03, (rank, c)
        assert 0.97 <= c["rss_rise"] / c["state_bytes"] <= 1.03, (rank, c)


def test_ppo_mismatch_distribution(results):
    """The gathered per-token ratios agree with the loss's own TIS sums (two code paths), and
    vLLM bf16 against trainer fp32 puts the median ratio near 1 but not at it."""
    for spec in ("1,1,1,ppo", "2,2,1,ppo"):
        first = results[0][spec]["steps"][0]
        assert first["mismatch/tis_capped_frac"] == pytest.approx(first["tis_clip_frac"], abs=0.012), (spec, first)  # 1.5 tokens
        assert first["mismatch/ratio_q01"] <= first["mismatch/ratio_q50"] <= first["mismatch/ratio_q99"]
        assert 0 < abs(first["mismatch/ratio_q50"] - 1.0) < 0.01, first
        assert 0.0 <= first["mismatch/ratio_outside_frac"] < 0.05, first


def test_micro_batching_leaves_logprobs_equal(results):
    """train.micro_batch_groups 1 (4 micro-batches) vs 4 (one): every log-prob equal to 1e-6 fp32."""
    for spec in ("2,2,1,ppo", "2,2,1,ppo_naive"):
        assert results[0][spec]["microbatch_logp_max_diff"] <= 1e-6, spec


def test_critic_offload_returns_rss(results):
    """Offloading the critic (parameters, Adam state, gradient buffers) frees what it holds (RSS)."""
    for rank, res in enumerate(results):
        for spec in ("1,1,1,ppo", "2,2,1,ppo"):
            c = res[spec]["critic"]
            assert 0.97 <= c["rss_drop"] / c["state_bytes"] <= 1.03, (rank, spec, c)
            assert 0.97 <= c["rss_rise"] / c["state_bytes"] <= 1.03, (rank, spec, c)
