"""Shared-prefix training equals naive packing on real megatron-core models, at every layout.

Two torchrun launches check, per (model, layout): per-token response log-probs of the
shared-prefix path vs the naive path (each ``[P, R_i]`` alone, megatron's own attention) and
vs HF transformers, and every parameter's gradient (relative error). The batch
(tests/workers/prefix_cases.py) has G = 1, 4, 8, unequal and empty responses, and several
groups per micro-batch over two micro-batches. At TP1 it also checks full activation
recompute, one real TrainEngine GRPO step (DDP + megatron optimizer), and a negative control
(responses not restarting their positions at len(P)) that the comparison must catch. At TP2 with
sequence parallelism (tp2sp) and with the distributed optimizer (tp2do) the same GRPO engine step
must match tp1's loss, grad norm and updated weights.
"""
import os
import time

import pytest

from _launch import REPO, torchrun

pytestmark = pytest.mark.multirank

WORKER = os.path.join(REPO, "tests", "workers", "prefix_exact.py")
OUT = os.path.join(REPO, "runs", "h5", "tests")
TOL = 1e-5


@pytest.fixture(scope="module")
def hf_reference(tiny_models):
    from workers.prefix_cases import hf_logprobs, make_groups

    return {m: hf_logprobs(tiny_models[m], make_groups()) for m in ("llama", "qwen2", "qwen3")}


def _check(results, hf_reference, expected_cases):
    from workers.prefix_cases import SPECS

    all_keys = sorted([g, i] for g, (_, lens) in enumerate(SPECS) for i in range(len(lens)))
    seen = set()
    for rank, res in enumerate(results):
        for c in res["cases"]:
            name = f"{c['model']}/{c['layout']} rank {rank}"
            seen.add((c["model"], c["layout"]))
            assert c["micro_batches"] == 2, name
            assert c["max_grad_rel"] < TOL, f"{name}: worst grads {sorted(c['grad_rel'].items(), key=lambda x: -x[1])[:3]}"
            assert all(v > 0 for v in c["grad_norms"].values()), f"{name}: a parameter got no gradient"
            if c["max_logp_diff"] is None:  # not the last pipeline stage
                continue
            assert c["max_logp_diff"] < TOL, name
            assert c["keys_shared"] == c["keys_naive"] == all_keys, name
            hf = hf_reference[c["model"]]
            for key, logp in c["logp_shared"].items():
                g, i = map(int, key.split(","))
                assert len(logp) == len(hf[(g, i)]), name
                assert max([abs(a - b) for a, b in zip(logp, hf[(g, i)])] + [0.0]) < TOL, f"{name} {key} vs HF"
            if c["layout"] == "tp1":
                assert c["control_logp_diff"] > 1e-3, f"{name}: negative control not detected"
                assert c["recompute_max_grad_rel"] < TOL, name
                eng = c["engine"]
                assert eng["tokens"] == eng["naive_tokens"], name
                assert abs(eng["loss"] - eng["naive_loss"]) < TOL * max(1.0, abs(eng["naive_loss"])), f"{name}: {eng}"
                assert eng["weight_change"] > 5e-5, f"{name}: the step must move the weights (control): {eng}"
            if c["layout"] in ("tp2sp", "tp2do"):  # GRPO engine step vs tp1's, same launch
                eng = c["engine_vs_tp1"]
                assert eng["loss_diff"] < TOL and eng["grad_norm_rel"] < TOL, f"{name}: {eng}"
                assert eng["max_weight_diff"] < TOL, f"{name}: {eng}"
    assert seen == expected_cases


def test_shared_prefix_exact_world2(hf_reference):
    t0 = time.time()
    layouts = ["tp1", "tp2", "pp2", "cp2", "tp2sp", "tp2do"]  # tp1 first: tp2sp/tp2do compare with it
    _, results = torchrun(WORKER, nproc=2, out_dir=os.path.join(OUT, "w2"), args=["llama,qwen2", ",".join(layouts)],
                          timeout=600)
    _check(results, hf_reference, {(m, lay) for m in ("llama", "qwen2") for lay in layouts})
    print(f"world 2: {time.time() - t0:.1f} s")


def test_shared_prefix_exact_tp2_cp2(hf_reference):
    _, results = torchrun(WORKER, nproc=4, out_dir=os.path.join(OUT, "w4"), args=["llama,qwen3", "tp2cp2"],
                          timeout=600)
    _check(results, hf_reference, {("llama", "tp2cp2"), ("qwen3", "tp2cp2")})
