"""Routing replay (R3) for MoE models: the rollout's routes per (request, position), packed as the
tokens are, replayed by megatron-core's routers, and the route-mismatch metric.

Unit tests (hand-built inputs): the capture store's flat-batch -> (request, position) map and the
prefix-cache fill, the packing and per-rank layout of routes (shared prefix, naive, CP), the
replay wrapper on megatron's own ``RouterReplay``, and the config refusals.

One 4-process launch (``tests/workers/route_replay.py``): vLLM's captured routes equal HF
transformers' top-k (an independent reference) on every decision, prefix-cached prompts
included; training at TP2 x EP2 with sequence parallelism, at PP2 x EP2 and at CP2 x EP2 replays them.
"""
import os

import pytest
import torch

from _launch import REPO, torchrun
from megatron_rl.attention import Group, make_batches, pack_groups
from megatron_rl.attention.plan import build_local
from megatron_rl.rollout.routes import RouteError, RouteStore, route_mask

# -- capture: flat batch -> (request, position) ----------------------------------------------------


def _ids(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.unit
def test_store_maps_flat_rows_to_requests_and_positions():
    s = RouteStore(layers=2, topk=2)
    # forward 1: prefill of a (4 tokens) and b (2 tokens), one padding row at the end
    l0 = _ids([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [7, 7]])
    l1 = _ids([[6, 7], [5, 6], [4, 5], [3, 4], [2, 3], [1, 2], [7, 7]])
    s.add_forward(["a", "b"], [0, 4, 6], torch.tensor([0, 1, 2, 3, 0, 1, 0]), [l0, l1])
    # forward 2: one decode step each, b first
    s.add_forward(["b", "a"], [0, 1, 2], torch.tensor([2, 4]), [_ids([[0, 7], [1, 7]]), _ids([[2, 7], [3, 7]])])
    a = s.assemble("a", [10, 11, 12, 13, 14, 15])  # 4 prompt + 2 sampled: positions 0..4 ran
    assert a.tolist() == [[[0, 1], [6, 7]], [[1, 2], [5, 6]], [[2, 3], [4, 5]], [[3, 4], [3, 4]],
                          [[1, 7], [3, 7]], [[0, 1], [0, 1]]]  # last: the fill, never routed
    b = s.assemble("b", [20, 21, 22, 23])
    assert b.tolist() == [[[4, 5], [2, 3]], [[5, 6], [1, 2]], [[0, 7], [2, 7]], [[0, 1], [0, 1]]]


@pytest.mark.unit
def test_store_fills_prefix_cached_positions_from_the_request_that_computed_them():
    s = RouteStore(layers=1, topk=2)
    s.add_forward(["a"], [0, 3], torch.tensor([0, 1, 2]), [_ids([[1, 2], [3, 4], [5, 6]])])
    s.assemble("a", [7, 8, 9])
    # c shares a's first two tokens (cached: it computed positions 2.. only); d does not
    s.add_forward(["c", "d"], [0, 1, 2], torch.tensor([2, 2]), [_ids([[0, 3], [0, 4]])])
    assert s.assemble("c", [7, 8, 5, 6]).tolist() == [[[1, 2]], [[3, 4]], [[0, 3]], [[0, 1]]]
    assert s.served == 2
    with pytest.raises(RouteError, match="request d: no route captured for position 1 of 4"):
        s.assemble("d", [7, 1, 5, 6])  # same token 0 (filled), another token 1: a's route 1 does not apply
    s.clear()  # a prefix-cache reset forgets them
    s.add_forward(["e"], [0, 1], torch.tensor([2]), [_ids([[0, 3]])])
    with pytest.raises(RouteError):
        s.assemble("e", [7, 8, 5, 6])


# -- packing: routes travel as the tokens do --------------------------------------------------------

L, K = 2, 2


def _routes_of(tokens: list) -> torch.Tensor:
    """Routes that name their token: route[t, l] = (tok + l, tok + l + 100)."""
    t = torch.tensor(tokens, dtype=torch.long)
    return torch.stack([torch.stack([t + l, t + l + 100], -1) for l in range(L)], 1)


def _groups() -> list:
    spec = [([5, 6, 7, 8, 9], [[11, 12], [13, 14, 15]]), ([21, 22, 23], [[31], [32, 33, 34, 35], [36, 37]])]
    return [Group(prompt=p, responses=rs, advantages=[1.0] * len(rs), prompt_routes=_routes_of(p),
                  response_routes=[_routes_of(r) for r in rs]) for p, rs in spec]


@pytest.mark.unit
def test_packed_routes_follow_the_tokens_and_mark_final_tokens():
    packed = pack_groups(_groups(), max_tokens=64)[0]
    assert torch.equal(packed.routes, _routes_of(packed.tokens.tolist()))
    # invalid exactly at each response's final token: 12, 15 | 31, 35, 37
    assert [int(t) for t, v in zip(packed.tokens, packed.route_valid) if not v] == [12, 15, 31, 35, 37]


@pytest.mark.unit
@pytest.mark.parametrize("cp", [1, 2, 3])
def test_local_routes_per_cp_rank_and_each_decision_counted_once(cp):
    packed = pack_groups(_groups(), max_tokens=64)[0]
    counted = 0
    for r in range(cp):
        local = build_local(packed, cp_size=cp, cp_rank=r, pad_multiple=2)
        real = local.global_index >= 0
        assert torch.equal(local.routes[real], _routes_of(local.tokens[real].tolist())), (cp, r)
        assert torch.equal(local.routes[~real], torch.arange(K).expand(int((~real).sum()), L, K)), (cp, r)
        counted += int(local.route_counted.sum())
    assert counted == int(packed.route_valid.sum()) == packed.num_tokens - 5  # CP copies not counted twice


@pytest.mark.unit
def test_naive_packing_carries_routes():
    for batch in make_batches(_groups(), max_tokens=64, shared_prefix=False, pad_multiple=4):
        local = batch["locals"][0]
        real = local.global_index >= 0
        assert torch.equal(local.routes[real], _routes_of(local.tokens[real].tolist()))


@pytest.mark.unit
def test_routes_on_some_groups_only_is_refused():
    g = _groups()
    bad = [g[0], Group(prompt=g[1].prompt, responses=g[1].responses)]
    with pytest.raises(ValueError, match=r"groups\[1\]: routes on some groups only"):
        pack_groups(bad, max_tokens=64)
    short = Group(prompt=[1, 2], responses=[[3]], prompt_routes=_routes_of([1]), response_routes=[_routes_of([3])])
    with pytest.raises(ValueError, match=r"routes cover \[1, 1\] tokens"):
        pack_groups([short], max_tokens=64)


# -- the replay wrapper on megatron's RouterReplay --------------------------------------------------


class _Local:
    def __init__(self, routes, counted):
        self.routes, self.route_counted = routes, counted


@pytest.mark.unit
def test_layer_replay_returns_targets_and_counts_own_choice():
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from megatron_rl.train.routing import LayerReplay, RouteControl

    base = RouterReplay()
    RouterReplay.global_router_replay_instances.remove(base)
    ctl = RouteControl({0: base}, replay=True)
    layer = LayerReplay(base, layer=0, control=ctl)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.0, 0.2, 0.3, 0.8], [0.4, 0.6, 0.0, 0.1], [1.0, 0.0, 0.0, 0.9]])
    target = torch.tensor([[[2, 0]], [[3, 2]], [[0, 3]], [[1, 2]]])  # own: {0,2} {3,2} {1,0} {0,3}
    # rows 0-3 of an 8-row batch at TP2 with SP: TP rank 0 sees the first half
    routes = torch.cat([target, torch.zeros(4, 1, 2, dtype=torch.long)])
    ctl.load(_Local(routes, torch.tensor([True, True, True, False] + [True] * 4)), tp_rank=0, tp_size=2,
             sequence_parallel=True)
    ctl.counting = True
    probs, idx = layer.get_replay_topk(scores, 2, default_compute_topk=lambda s, k, *a: torch.topk(s, k, dim=1))
    assert torch.equal(idx, target[:, 0]) and torch.equal(probs, scores.gather(1, target[:, 0]))
    assert ctl.take_counts() == (1.0, 3.0)  # row 2 differs; row 3 ({0,3} vs {1,2}) is not counted
    ctl.replay = False
    ctl.load(_Local(routes, torch.ones(8, dtype=torch.bool)), tp_rank=0, tp_size=2, sequence_parallel=True)
    probs, idx = layer.get_replay_topk(scores, 2, default_compute_topk=lambda s, k, *a: torch.topk(s, k, dim=1))
    assert torch.equal(idx, torch.topk(scores, 2, dim=1).indices)  # replay off: the router's own
    assert ctl.take_counts() == (2.0, 4.0)


# -- config --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_config_refusals(tiny_models):
    from transformers import AutoConfig

    from megatron_rl.config import load_config
    from megatron_rl.errors import ConfigError

    dense, moe = tiny_models["llama"], tiny_models["qwen3-moe"]
    for key in ("algorithm.routing_replay", "logging.route_mismatch"):
        cfg = load_config(overrides=[f"model.hf_path={dense}", f"{key}=true"])
        with pytest.raises(ConfigError, match=f"{key}: needs an MoE model.*fix: set {key}=false"):
            cfg.validate(world_size=1, hf_config=AutoConfig.from_pretrained(dense), files=False)
        with pytest.raises(ConfigError, match=f"{key}: with train.recompute=full"):
            load_config(overrides=[f"model.hf_path={moe}", f"{key}=true", "train.recompute=full"])
    cfg = load_config(overrides=[f"model.hf_path={moe}", "algorithm.routing_replay=true"])
    cfg.validate(world_size=1, hf_config=AutoConfig.from_pretrained(moe), files=False)
    from megatron_rl.train.routing import route_mode

    assert route_mode(cfg) == "replay"
    assert route_mode(load_config(overrides=["logging.route_mismatch=true"])) == "count"
    assert route_mode(load_config()) == "off"


# -- one launch: vLLM capture vs HF, replay at TP2 x EP2 + SP ----------------------------------------

DIFF_TOL = 0.005  # share of decisions vLLM and HF may route differently (fp32 near-ties); measured 0


@pytest.fixture(scope="module")
def launch(tiny_models, tmp_path_factory):
    _, res = torchrun(os.path.join(REPO, "tests", "workers", "route_replay.py"), nproc=4,
                      out_dir=str(tmp_path_factory.mktemp("route_replay")), args=[tiny_models["qwen3-moe"]],
                      timeout=600)
    return res


def _max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for k in a for x, y in zip(a[k], b[k]))


@pytest.mark.multirank
def test_vllm_routes_equal_hf_topk_prefix_cache_included(launch):
    for call in launch[0]["capture"]["calls"]:  # call 1 is served from the prefix cache too
        assert call["shapes_ok"] and call["last_fill"], call
        assert call["differ"] <= DIFF_TOL * call["decisions"], call
        assert call["differ_other_layer"] >= 0.5 * call["decisions"], call  # the comparison can fail
    assert all(r["served"] >= 128 for r in launch), [r["served"] for r in launch]  # one CPU KV block


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2_ep2_sp", "pp2_ep2", "cp2_ep2"])
def test_training_replays_routes(launch, layout):
    res = launch[0]
    t, plens, rlens = res["train"][layout], res["prompt_lens"], res["response_lens"]
    dp, layers = 2, 2  # every layout: DP2; every DP replica forwards every group (CP ranks split its rows)
    decisions = dp * layers * (sum(plens) + sum(rlens) - len(rlens))  # final tokens never routed
    for name in ("off", "replay_vllm", "replay_hf", "replay_shifted"):
        assert t[name]["decisions"] == decisions, (name, t[name]["decisions"], decisions)
    assert t["off"]["mismatched"] <= DIFF_TOL * decisions  # training's own top-k vs vLLM's
    assert _max_diff(t["off"]["logp"], res["rollout_logp"]) <= 1e-5  # fp32 both sides
    for name in ("replay_vllm", "replay_hf"):  # the routes training would choose: the same log-probs
        assert _max_diff(t[name]["logp"], t["off"]["logp"]) <= 1e-6, name
    # negative control: layer 1's response routes moved; exactly those decisions differ, log-probs change
    assert t["replay_shifted"]["mismatched"] == dp * sum(n - 1 for n in rlens)
    assert _max_diff(t["replay_shifted"]["logp"], t["off"]["logp"]) > 1e-3
    off, rep = t["steps"]["off"], t["steps"]["replay_hf"]  # the backward through replayed routes
    assert rep["loss"] == pytest.approx(off["loss"], rel=1e-6) and rep["grad_norm"] == pytest.approx(
        off["grad_norm"], rel=1e-6)
