"""Tier 2: weight sync from real megatron-core into real vLLM (external_launcher), over gloo.

Each launch creates one vLLM engine (TP = t_v, replicas filling the world) and checks several
Megatron (t_m, p_m) layouts against it. After every sync, each vLLM parameter on every rank
(read back bitwise from vLLM's packed kernels) equals what vLLM holds after loading the HF
checkpoint itself, and greedy generations are identical. The bytes that crossed ranks,
summed over ranks, equal the plan's bytes_moved and lower bound, and a bound computed independently
from element masks (tests/_bounds.py). One case of the world-4 launch (":p2p") syncs through TorchP2P
without gloo coalescing, the per-slice message path NCCL takes, and must be just as exact.

Four launches (a launch with vLLM costs tens of seconds on 2 cores), each shared by the tests
that read it: world 8 (qwen2, t_v=4 x 2 replicas, dummy start, two Megatron layouts), world 4
(qwen3, t_v=2 x 2, then the no-vLLM sweep and the dead-rank fault), world 2 (t_v=1 x 2) and
world 4 for Qwen3-MoE (vLLM's stacked, CPU-prepacked experts): Megatron EP2 -> t_v=2, TP2 x EP2
-> t_v=1 x 4 and PP2 x EP2 -> t_v=4, three engines one after another in the same processes.
"""
import os

import pytest

from _launch import REPO, torchrun

pytestmark = pytest.mark.multirank

MODEL_ROOT = os.path.join(REPO, "runs", "sync", "models")
WORKERS = os.path.join(REPO, "tests", "workers")


@pytest.fixture(scope="module")
def models():
    import sys

    sys.path.insert(0, WORKERS)
    import sync_common

    return {m: sync_common.sync_model(m, MODEL_ROOT) for m in sync_common.MODELS}


def _launch(tmp_path, script, nproc, args, timeout=900):
    _, res = torchrun(os.path.join(WORKERS, script), nproc=nproc, out_dir=str(tmp_path), args=args, timeout=timeout,
                      env={"MODEL_ROOT": MODEL_ROOT})
    assert all(r is not None for r in res), f"missing rank results: {res}"
    return res


# ":p2p": the same sync through TorchP2P(coalesce=False), one message per slice (the NCCL path), over gloo.
Q2_TV4_CASES = ["2x2", "1x1"]  # the uncoalesced (NCCL-style) path runs in the world-4 launch
Q3_TV2_CASES = ["4x1", "2x2", "1x1", "4x1:p2p"]
FAULT_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def q2_tv4_world8(tmp_path_factory, models):
    """World 8: Megatron layouts with DP 2..8 -> vLLM TP4 x 2 replicas, engine started dummy."""
    return _launch(tmp_path_factory.mktemp("q2-tv4-w8"), "sync_exact.py", 8,
                   ["--model", "q2", "--tv", "4", "--cases", ",".join(Q2_TV4_CASES), "--dummy"])


@pytest.fixture(scope="module")
def q3_tv2_then_fault(tmp_path_factory, models):
    """World 4: qwen3 -> vLLM TP2 x 2, then the sweep without vLLM, then rank 3 stalls mid-sync."""
    return _launch(tmp_path_factory.mktemp("q3-tv2-fault"), "sync_exact.py", 4,
                   ["--model", "q3", "--tv", "2", "--cases", ",".join(Q3_TV2_CASES), "--sweep-cases", "2x2,4x1,1x2",
                    "--sweep-tvs", "1,2,4", "--victim", "3", "--timeout", FAULT_TIMEOUT, "--stall", 3 * FAULT_TIMEOUT])


def _flat(r: dict) -> list:
    """One rank's cases over all its engines, each with its engine's vLLM TP as ``tv``."""
    return [dict(c, tv=e["tv"]) for e in r["engines"] for c in e["cases"]]


def _check_exact(res, cases):
    world = len(res)
    for r in res:
        for e in r["engines"]:
            assert e["layout_vs_vllm_loaders"] == [], f"rank {r['rank']} t_v={e['tv']}: our vLLM layout != vLLM's loaders"
            assert e["noise_gen_differs"], "noise weights give the same generations: the generation check is vacuous"
        assert [c["case"] for c in _flat(r)] == cases
        for c in _flat(r):
            where = f"rank {r['rank']} case {c['case']} -> t_v={c['tv']}"
            assert c["mismatched"] == [], f"{where}: not bitwise equal to vLLM's own load: {c['mismatched']}"
            assert c["gen_equal"], f"{where}: greedy generations differ"
            assert len(c["delivered"]) == c["names"], f"{where}: {len(c['delivered'])} of {c['names']} params delivered"
            # the independent bound (tests/_bounds.py, element masks) == what the ops carry == the plan's figures
            assert c["bytes_moved"] == c["lower_bound"] == c["bound"] == c["carried"], (where, c)
            assert c["coalesced"] is (not c["case"].endswith(":p2p")), (where, c["coalesced"])
            assert c["verified"] > 0
    for i, case in enumerate(cases):
        per_rank = [_flat(r)[i] for r in res]
        moved = per_rank[0]["bound"]
        assert sum(c["sent"] for c in per_rank) == moved, f"{case}: measured bytes sent != plan ({moved})"
        assert sum(c["received"] for c in per_rank) == moved, f"{case}: measured bytes received != plan"
    return world


def test_kv_replication_tied_bias_dummy_start_tv4(q2_tv4_world8):
    """qwen2 (2 kv heads < t_v=4: replicated; tied; qkv bias; vocab 250), engine started dummy;
    Megatron 2x2 and 1x1 (DP 2 and 8) into both replicas of the world-8 launch."""
    res = q2_tv4_world8
    _check_exact(res, Q2_TV4_CASES)
    assert all(r["dummy"] and [e["tv"] for e in r["engines"]] == [4] for r in res)
    assert res[0]["engines"][0]["cases"][0]["bytes_moved"] > 0


def test_untied_qk_norm_tm4_tv2(q3_tv2_then_fault):
    """qwen3 (untied lm_head, qk-norm): t_m=4 -> t_v=2 x 2 replicas, reference from a direct HF load."""
    assert _check_exact(q3_tv2_then_fault, Q3_TV2_CASES) == 4


def test_tv1_two_replicas(tmp_path, models):
    """World 2: vLLM TP1 x 2 replicas (every rank holds full tensors)."""
    cases = ["2x1", "1x2"]
    res = _launch(tmp_path, "sync_exact.py", 2, ["--model", "q2", "--tv", "1", "--cases", ",".join(cases)])
    _check_exact(res, cases)


# The three acceptance layouts, one world-4 launch, three vLLM engines one after another:
# Megatron EP2 (x DP2) -> vLLM TP2 x 2, TP2 x EP2 -> vLLM TP1 x 4 replicas, PP2 x EP2 -> vLLM TP4;
# and EP1 x DP4 -> vLLM TP2, where every rank holds every expert whole, so nothing need cross.
MOE_CASES = ["1x1e2@2", "1x1@2", "2x1e2@1", "1x2e2@4"]


def test_moe_experts_three_layouts_world4(tmp_path, models):
    """World 4, Qwen3-MoE (8 experts, moe_intermediate_size 96). After each sync every vLLM parameter
    on every rank, every expert shard (w13[j] / w2[j]) and, read straight from the model, every
    stacked expert tensor vLLM's CPU experts hold (rows padded to vLLM's alignment, then prepacked)
    equals vLLM's own load of the HF checkpoint, and greedy generations are identical. Each rank
    receives exactly the bytes its vLLM shard needs that its Megatron shard lacks, counted from the
    HF config and the rank's coordinates as megatron-core and vLLM report them (tests/_bounds.py:
    moe_rank_bound); its expert part is what the plan carries into the rank's expert slots, so no
    rank receives another rank's expert slice. A corrupted element of one expert is caught, and
    vLLM's own reload of the HF tensors (engine.update_weights, which vLLM 0.32 leaves unpacked on
    CPU without megatron_rl.compat) ends bitwise where its start-up load did."""
    from transformers import AutoConfig

    from _bounds import moe_rank_bound

    res = _launch(tmp_path, "sync_exact.py", 4, ["--model", "qm", "--tv", "2", "--cases", ",".join(MOE_CASES)])
    _check_exact(res, MOE_CASES)
    cfg = AutoConfig.from_pretrained(models["qm"])
    n_layers, n_experts = cfg.num_hidden_layers, cfg.num_experts
    for r in res:
        assert [e["tv"] for e in r["engines"]] == [2, 1, 4]
        assert [len(e["cases"]) for e in r["engines"]] == [2, 1, 1]
        for e in r["engines"]:
            # the stacks themselves (packed), the noise control, and one corrupted element found exactly
            assert len(e["noise_held_differs"]) == n_layers * 2, e["noise_held_differs"]
            assert e["corrupt_found"] == [e["corrupt"]], (r["rank"], e["tv"], e["corrupt_found"])
            # vLLM's own reload (the baseline path; vllm_compat.experts_reload_as_first_load) is exact too
            assert e["reload_mismatched"] == e["reload_held_mismatched"] == [], (r["rank"], e)
            layer = e["corrupt"].split(".")[2]
            assert e["corrupt_held_found"] == [f"model.layers.{layer}.mlp.experts.routed_experts.w2_weight"]
        for c in _flat(r):
            where = (r["rank"], c["case"])
            assert len([n for n in c["delivered"] if ".routed_experts." in n]) == n_layers * n_experts * 2, where
            assert c["held_experts"] == n_layers * 2 and c["held_mismatched"] == [], (where, c)
            ep = int(c["case"].split("@")[0].partition("e")[2] or 1)
            assert c["vllm"]["tp"] == c["tv"] and c["megatron"]["ep"] == ep, (where, c["vllm"], c["megatron"])
            bound = moe_rank_bound(cfg, megatron=c["megatron"], vllm=c["vllm"])
            # nothing arrives beyond the rank's own needs, nothing it already holds crosses
            assert c["received"] == bound["total"] and c["expert_in"] == bound["experts"], (where, c, bound)
            assert (bound["experts"] > 0) is (ep > 1), (where, bound)  # EP1 x DP4: every expert is local
            assert c["received"] + c["local"] == c["own_need"], (where, c)
    for i, case in enumerate(MOE_CASES):  # the plan's total equals the ranks' independent figures summed
        assert _flat(res[0])[i]["bytes_moved"] == sum(
            moe_rank_bound(cfg, megatron=_flat(r)[i]["megatron"], vllm=_flat(r)[i]["vllm"])["total"] for r in res), case
    assert _flat(res[0])[1]["bytes_moved"] == 0 < _flat(res[0])[0]["bytes_moved"]


@pytest.mark.slow
def test_world8_tv4_two_replicas(q2_tv4_world8):
    """World 8: Megatron TP2 x PP2 x DP2 (DP replicas spread the load) -> vLLM TP4 x 2 replicas
    (the 2x2 case of the shared world-8 launch; its other layout, 1x1, has DP 8)."""
    res = q2_tv4_world8
    assert _check_exact(res, Q2_TV4_CASES) == 8 and all(r["world"] == 8 for r in res)


def test_sweep_then_stalled_rank_times_out(q3_tv2_then_fault):
    """No vLLM: t_m x p_m in {2x2, 4x1, 1x2} -> t_v in {1, 2, 4} into a recording receiver, exact;
    then rank 3 stalls mid-sync and every other rank fails within the 4 s timeout naming a peer."""
    timeout = FAULT_TIMEOUT
    res = q3_tv2_then_fault
    assert all(len(r["sweep"]) == 9 for r in res)
    for r in res:
        for s in r["sweep"]:
            assert s["mismatched"] == [] and s["bytes_moved"] == s["lower_bound"] == s["bound"], s
            assert s["calls"] == ["begin", "end"]
    for i in range(len(res[0]["sweep"])):
        assert sum(r["sweep"][i]["sent"] for r in res) == res[0]["sweep"][i]["bound"]
    assert res[3].get("victim")
    survivors = [r["fault"] for r in res[:3]]
    for f in survivors:
        assert f["error"] is not None and "peer rank" in f["error"], f
        assert f["seconds"] < 2 * timeout + 5, f"took {f['seconds']:.1f}s with a {timeout}s timeout"
    assert any("peer rank 3" in f["error"] for f in survivors), survivors
