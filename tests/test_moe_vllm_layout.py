"""Tier 1: the vLLM layout of an MoE model's experts, against vLLM's own expert weight loaders.

The expected shards come from vLLM 0.32's ``RoutedExperts._load_w13`` / ``_load_w2`` (the code
vLLM runs when it loads an HF checkpoint: gate into rows ``[0, I/t)``, up into ``[I/t, 2I/t)``,
down narrowed along its input dim, each at ``tp_rank``), run on small random tensors, never from
the layout algebra. A plan from Megatron PP2 x EP2 into vLLM TP4 moves the independent lower
bound (tests/_bounds.py), and each rank receives exactly the elements it serves.
"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from _bounds import check_minimal, element_masks
from megatron_rl.errors import LayoutError
from megatron_rl.models.shape import ModelShape
from megatron_rl.models.tiny import tiny_hf_config
from megatron_rl.parallel.grid import RankGrid
from megatron_rl.resharding.layout import assemble, megatron_layout
from megatron_rl.resharding.planner import make_plan
from megatron_rl.resharding.vllm_layout import vllm_layout, vllm_rank_tensors

pytestmark = pytest.mark.unit

SHAPE = ModelShape.from_hf_config(tiny_hf_config("qwen3_moe", moe_intermediate_size=96, hidden_size=64,
                                                 num_hidden_layers=2))
EXPERTS = "model.layers.{i}.mlp.experts.routed_experts."


def _canon(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPE.canonical_shapes().items()}


def _vllm_loaded(hf, *, layer, tp, tp_rank):
    """vLLM's stacked (w13 [E, 2I/t, H], w2 [E, H, I/t]) after its own loaders ran on ``hf``."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # lazy: vLLM imports slowly

    e, f, h = SHAPE.moe.experts, SHAPE.moe.ffn // tp, SHAPE.hidden
    self = SimpleNamespace(moe_config=SimpleNamespace(is_act_and_mul=True,
                                                      moe_parallel_config=SimpleNamespace(tp_size=tp)),
                           _get_hidden_dim=RoutedExperts._get_hidden_dim,
                           _narrow_expert_data_for_padding=RoutedExperts._narrow_expert_data_for_padding)
    w13, w2 = torch.full((e, 2 * f, h), float("nan")), torch.full((e, h, f), float("nan"))
    src = f"model.layers.{layer}.mlp.experts."
    for x in range(e):  # SHARD_ID_TO_SHARDED_DIM: w1/w3 -> 0, w2 -> 1 (per expert, not transposed)
        RoutedExperts._load_w13(self, w13[x], 0, "w1", hf[f"{src}{x}.gate_proj.weight"], tp_rank)
        RoutedExperts._load_w13(self, w13[x], 0, "w3", hf[f"{src}{x}.up_proj.weight"], tp_rank)
        RoutedExperts._load_w2(self, w2[x], 1, hf[f"{src}{x}.down_proj.weight"], tp_rank)
    return w13, w2


def _ours(hf, *, tp, tp_rank):
    lay = vllm_rank_tensors(SHAPE, tp=tp, tp_rank=tp_rank)
    return {n: assemble(lt, lambda c, d, s, k: hf[c].narrow(d, s, k)) for n, lt in lay.items()}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_expert_shards_equal_vllms_own_loaders(tp):
    hf = _canon()
    for tp_rank in range(tp):
        ours = _ours(hf, tp=tp, tp_rank=tp_rank)
        assert torch.equal(ours["model.layers.1.mlp.gate.weight"], hf["model.layers.1.mlp.gate.weight"])  # replicated
        for layer in range(SHAPE.layers):
            w13, w2 = _vllm_loaded(hf, layer=layer, tp=tp, tp_rank=tp_rank)
            for x in range(SHAPE.moe.experts):
                p = EXPERTS.format(i=layer)
                assert torch.equal(ours[f"{p}w13_weight[{x}]"], w13[x]), (tp, tp_rank, layer, x)
                assert torch.equal(ours[f"{p}w2_weight[{x}]"], w2[x]), (tp, tp_rank, layer, x)
        if tp > 1:  # negative control: another rank's loaders give other values
            w13, _ = _vllm_loaded(hf, layer=0, tp=tp, tp_rank=(tp_rank + 1) % tp)
            assert not torch.equal(ours[EXPERTS.format(i=0) + "w13_weight[0]"], w13[0])


def test_gate_up_swapped_is_caught():
    """Negative control: stacking [up; gate] (the order a wrong layout would use) differs from vLLM's."""
    hf = _canon()
    w13, _ = _vllm_loaded(hf, layer=0, tp=2, tp_rank=0)
    swapped = torch.cat([w13[3, 48:], w13[3, :48]])  # (2f, H) with f = 96 / 2
    assert not torch.equal(_ours(hf, tp=2, tp_rank=0)[EXPERTS.format(i=0) + "w13_weight[3]"], swapped)


def test_plan_pp2_ep2_to_vllm_tp4_is_minimal_and_per_rank_exact():
    """Megatron PP2 x EP2 (world 4) -> vLLM TP4: bytes moved equal the element-mask bound, and each
    destination rank receives exactly the elements of its own layout (no other rank's expert slice)."""
    src = megatron_layout(SHAPE, RankGrid(world_size=4, pp=2, ep=2))
    dst = vllm_layout(SHAPE, tp=4, world_size=4)
    plan = make_plan(src, dst=dst, bucket_bytes=1 << 16, elem_size=4)
    assert check_minimal(plan, src, dst) > 0
    need = {r: int(sum(m.sum() for m in masks.values())) * 4 for r, masks in element_masks(dst).items()}
    got = {r: 0 for r in need}
    for bucket in plan.buckets:
        for op in bucket:
            shape = plan.dst_tensors[op.dst_rank][op.dst_name].shape
            got[op.dst_rank] += op.length * (torch.Size(shape).numel() // shape[op.dim]) * 4
    assert got == need


def test_rollout_tp_refusals_name_the_field():
    moe = SHAPE.moe
    cases = [(dataclasses.replace(SHAPE, moe=dataclasses.replace(moe, experts=4)), 8,
              "rollout.tp=8 is greater than num_experts=4"),
             (dataclasses.replace(SHAPE, moe=dataclasses.replace(moe, ffn=100)), 8,
              "rollout.tp=8 does not divide moe_intermediate_size=100")]
    for shape, tp, message in cases:
        with pytest.raises(LayoutError) as e:
            vllm_layout(shape, tp=tp, world_size=tp)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("tp,pp,ep,tv", [(1, 1, 2, 2), (2, 1, 2, 1), (1, 2, 2, 4)])
def test_rank_bound_from_shapes_equals_element_masks(tp, pp, ep, tv):
    """The per-rank bound from shapes alone (tests/_bounds.py:moe_rank_bound, used by the real-process
    test) equals the element-mask bound of the layouts, rank by rank, for the three acceptance layouts."""
    from _bounds import moe_rank_bound, rank_lower_bounds

    cfg = tiny_hf_config("qwen3_moe", moe_intermediate_size=96, hidden_size=64, num_hidden_layers=2)
    shape = ModelShape.from_hf_config(cfg)
    grid = RankGrid(world_size=4, tp=tp, pp=pp, ep=ep)
    masks = rank_lower_bounds(megatron_layout(shape, grid), vllm_layout(shape, tp=tv, world_size=4), elem_size=4)
    for rank in range(4):
        c = grid.coords(rank)
        mine = moe_rank_bound(cfg, megatron=dict(tp=tp, tp_rank=c.tp, pp=pp, pp_rank=c.pp, ep=ep, ep_rank=c.ep),
                              vllm=dict(tp=tv, tp_rank=rank % tv))
        assert mine["total"] == masks[rank] > 0, (rank, mine, masks[rank])
        assert 0 < mine["experts"] <= mine["total"]
        # control: the held experts count: the same rank holding every expert (EP1) needs fewer expert bytes
        all_experts = moe_rank_bound(cfg, megatron=dict(tp=tp, tp_rank=c.tp, pp=pp, pp_rank=c.pp, ep=1, ep_rank=0),
                                     vllm=dict(tp=tv, tp_rank=rank % tv))
        assert all_experts["experts"] < mine["experts"], (rank, all_experts, mine)
