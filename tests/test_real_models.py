"""Weight-sync plans for real models (tests/fixtures/models: published config values, no
weights) at realistic cluster layouts: the bytes the plan moves equal a lower bound computed
independently (interval arithmetic over the layouts, itself checked against the element-mask
bound on small layouts), and the shipped GPU configs' plans keep every link busy. megatron-core's
model built on ``meta`` at each layout (as ``megatron-rl plan`` builds it) has the shard shapes the
layout algebra predicts.

The time model (``planner.sync_cost``): a bucket takes as long as its busiest rank's larger of
bytes sent and received; buckets run one after another; the bound is the busiest rank's total.
"""
import os
import types

import pytest
from transformers import AutoConfig

from _bounds import plan_cross_rank_bytes, slab_lower_bound, sync_lower_bound
from megatron_rl.config.schema import ParallelConfig
from megatron_rl.models.shape import ModelShape
from megatron_rl.parallel.grid import RankGrid
from megatron_rl.plan.shapes import _built_shapes, _mismatches
from megatron_rl.resharding.layout import megatron_layout, megatron_rank_tensors
from megatron_rl.resharding.planner import UNBOUNDED, make_plan, sync_cost
from megatron_rl.resharding.vllm_layout import vllm_layout

pytestmark = pytest.mark.unit
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "models")
BUCKET = 64 << 20  # bf16, as the GPU configs

# (model, world, training tp, pp, rollout tp): the layouts users run these models at
LAYOUTS = [
    ("Llama-3.1-8B", 16, 4, 2, 2),
    ("Llama-3.1-70B", 64, 8, 4, 8),   # configs/gpu_70b_64gpu.yaml
    ("Qwen2.5-7B", 8, 4, 1, 2),       # configs/gpu_7b_8gpu.yaml
    ("Qwen2.5-72B", 32, 8, 2, 8),
    ("Qwen3-8B", 16, 8, 1, 4),
    ("Qwen3-32B", 32, 8, 2, 4),
]
SHIPPED = {("Llama-3.1-70B", 64, 8, 4, 8), ("Qwen2.5-7B", 8, 4, 1, 2)}


def shape_of(name: str) -> ModelShape:
    return ModelShape.from_hf_config(AutoConfig.from_pretrained(os.path.join(FIXTURES, name)))


def layouts(name, world, tp, pp, vtp):
    shape = shape_of(name)
    return megatron_layout(shape, RankGrid(world_size=world, tp=tp, pp=pp)), vllm_layout(shape, tp=vtp, world_size=world)


@pytest.mark.parametrize("name", sorted(os.listdir(FIXTURES)))
def test_fixture_is_a_supported_model(name):
    if not os.path.isdir(os.path.join(FIXTURES, name)):
        pytest.skip("not a model folder")
    shape = shape_of(name)
    assert shape.layers >= 28 and shape.vocab > 100_000, shape


@pytest.mark.parametrize("world,tp,pp,vtp", [(4, 2, 2, 1), (8, 4, 1, 2), (8, 2, 2, 4), (4, 1, 4, 2)])
def test_slab_bound_equals_the_mask_bound(world, tp, pp, vtp):
    """The interval bound used at real sizes against the element-mask bound, on a small model."""
    from megatron_rl.models.tiny import tiny_hf_config

    shape = ModelShape.from_hf_config(tiny_hf_config("llama", tied=False))
    src = megatron_layout(shape, RankGrid(world_size=world, tp=tp, pp=pp))
    dst = vllm_layout(shape, tp=vtp, world_size=world)
    assert slab_lower_bound(src, dst, elem_size=2) == sync_lower_bound(src, dst, elem_size=2) > 0
    # another replica order (ranks reversed within each replica): the two bounds still agree
    shifted = vllm_layout(shape, tp=vtp, world_size=world, replica_ranks=[list(reversed(r)) for r in
                          [list(range(i * vtp, (i + 1) * vtp)) for i in range(world // vtp)]])
    if vtp > 1:
        assert slab_lower_bound(src, shifted, elem_size=2) == sync_lower_bound(src, shifted, elem_size=2)


# Qwen2.5-72B's family (qkv bias) plans here at 7B; its 72B shapes are checked on meta below.
@pytest.mark.parametrize("name,world,tp,pp,vtp", [x for x in LAYOUTS if x[0] != "Qwen2.5-72B"])
def test_real_model_plan_moves_exactly_the_bound(name, world, tp, pp, vtp):
    src, dst = layouts(name, world, tp, pp, vtp)
    plan = make_plan(src, dst=dst, bucket_bytes=BUCKET, elem_size=2, staging_bytes=UNBOUNDED)
    bound = slab_lower_bound(src, dst, elem_size=2)
    assert plan_cross_rank_bytes(plan) == bound and plan.bytes_moved == bound, (plan.bytes_moved, bound)
    cost = sync_cost(plan)
    print(f"{name} {world} ranks TP{tp}xPP{pp} -> vLLM TP{vtp}: {bound / 2**30:.1f} GiB moved, "
          f"{cost['buckets']} buckets, makespan/bound {cost['makespan_over_bound']:.3f}")
    if (name, world, tp, pp, vtp) in SHIPPED:
        assert cost["makespan_over_bound"] <= 1.15, cost


def test_sync_cost_sees_a_serial_plan():
    """Negative control for the time model: the same ops, one rank's at a time, cost about the
    number of ranks times the bound."""
    src, dst = layouts("Qwen2.5-7B", 8, 4, 1, 2)
    plan = make_plan(src, dst=dst, bucket_bytes=BUCKET, elem_size=2, staging_bytes=UNBOUNDED)
    ops = [op for b in plan.buckets for op in b if not op.local]
    serial = type(plan)(**{**plan.__dict__, "buckets": [[op] for op in sorted(ops, key=lambda o: o.dst_rank)]})
    assert sync_cost(serial)["makespan_over_bound"] > 4 * sync_cost(plan)["makespan_over_bound"]


def _meta_cfg(world, tp, pp, vtp):
    """What the meta build reads of a job's config, at a fixture's layout (bf16, full recompute)."""
    return types.SimpleNamespace(parallel=ParallelConfig(tp=tp, pp=pp, world_size=world),
                                 rollout=types.SimpleNamespace(tp=vtp), train=types.SimpleNamespace(recompute="full"),
                                 model=types.SimpleNamespace(dtype="bfloat16", make_vocab_size_divisible_by=128))


@pytest.mark.parametrize("name,world,tp,pp,vtp", [x for x in LAYOUTS if x not in SHIPPED])
def test_meta_model_shapes_equal_the_layout_algebra(name, world, tp, pp, vtp):
    """megatron-core's own model, built on ``meta`` as rank (tp, pp) of the real world (the plan's
    fake process group), has exactly the shard shapes the layout algebra predicts: first and last
    stage, first and last TP rank (the shipped layouts: every position, tests/test_plan.py)."""
    hf = AutoConfig.from_pretrained(os.path.join(FIXTURES, name))
    grid = RankGrid(world_size=world, tp=tp, pp=pp)
    for t, p in sorted({(0, 0), (tp - 1, pp - 1)}):
        built = _built_shapes(_meta_cfg(world, tp, pp, vtp), hf, grid=grid, tp=t, pp=p)
        predicted = megatron_rank_tensors(shape_of(name), tp=tp, pp=pp, tp_rank=t, pp_rank=p, vocab_divisible_by=128)
        assert len(built) > 0 and _mismatches(built, predicted) == (), (name, t, p)
        # negative control: the prediction for half the TP degree must disagree with the build
        wrong = megatron_rank_tensors(shape_of(name), tp=tp // 2, pp=pp, tp_rank=0, pp_rank=p, vocab_divisible_by=128)
        assert _mismatches(built, wrong), (name, t, p)
