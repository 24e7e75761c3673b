"""Tier 1: the weight-sync planner and the vLLM layout, exhaustively, without processes.

For a sweep of Megatron (t_m, p_m, dp) -> vLLM (t_v, replicas) layouts over every tiny
family (GQA, kv replication, qkv bias, qk-norm, tied and untied, vocab 250):
- running the plan on canonical tensors reproduces every vLLM shard exactly (padding zero);
- every destination element is written exactly once;
- the bytes the ops carry across ranks == bytes_moved == lower_bound == the bound computed
  independently from element masks (tests/_bounds.py; a wasteful plan fails it: negative control);
- no bucket makes a rank send or write more than bucket_bytes.
"""
import dataclasses
import itertools
from collections import defaultdict

import pytest
import torch

from _bounds import check_minimal, element_masks, plan_cross_rank_bytes, sync_lower_bound
from megatron_rl.models.tiny import tiny_hf_config
from megatron_rl.parallel.grid import LayoutError, RankGrid
from megatron_rl.resharding.executor import checksum
from megatron_rl.models.shape import ModelShape
from megatron_rl.resharding.layout import assemble, hf_layout, megatron_layout
from megatron_rl.resharding.planner import make_plan
from megatron_rl.resharding.vllm_layout import vllm_kv_heads, vllm_layout, vllm_padded_vocab

pytestmark = pytest.mark.unit

FAMILIES = [("llama", False), ("qwen2", True), ("qwen3", True)]
# The sweep uses small hand-made shapes with each family's structure (GQA ratio, kv heads,
# bias, qk-norm, tying, vocab 250): element-level checks stay fast.
SWEEP_SHAPES = {
    ("llama", False): ModelShape(hidden=16, heads=8, kv_heads=4, head_dim=4, ffn=32, layers=2, vocab=250),
    ("qwen2", True): ModelShape(hidden=16, heads=8, kv_heads=2, head_dim=4, ffn=32, layers=2, vocab=250, tied=True,
                                qkv_bias=True, arch="Qwen2ForCausalLM"),
    ("qwen3", True): ModelShape(hidden=16, heads=8, kv_heads=4, head_dim=8, ffn=32, layers=2, vocab=250, tied=True,
                                qk_norm=True, arch="Qwen3ForCausalLM"),
}
SOURCES = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (4, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4), (2, 2, 2), (4, 1, 2)]


def _shape(family, tied):
    return ModelShape.from_hf_config(tiny_hf_config(family, tied=tied))


def _canon(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shape.canonical_shapes().items()}


def _read(canon):
    return lambda c, d, s, n: canon[c].narrow(d, s, n)


def _cases():
    for (family, tied), (tm, pm, dp) in itertools.product(FAMILIES, SOURCES):
        world = tm * pm * dp
        for tv in (1, 2, 4, 8):
            if world % tv == 0:
                yield family, tied, tm, pm, dp, tv


def _run_in_memory(plan, src_local, dst):
    """Apply every op to zero-filled shards; count writes per element."""
    out = {r: {n: torch.zeros(lt.shape) for n, lt in t.items()} for r, t in dst.ranks.items()}
    hits = {r: {n: torch.zeros(lt.shape, dtype=torch.int32) for n, lt in t.items()} for r, t in dst.ranks.items()}
    for bucket in plan.buckets:
        for op in bucket:
            piece = src_local[op.src_rank][op.src_name].narrow(op.dim, op.src_offset, op.length)
            out[op.dst_rank][op.dst_name].narrow(op.dim, op.dst_offset, op.length).copy_(piece)
            hits[op.dst_rank][op.dst_name].narrow(op.dim, op.dst_offset, op.length).add_(1)
    return out, hits


@pytest.mark.parametrize("family,tied,tm,pm,dp,tv", list(_cases()))
def test_plan_is_exact_minimal_and_bounded(family, tied, tm, pm, dp, tv):
    shape = SWEEP_SHAPES[(family, tied)]
    world = tm * pm * dp
    try:
        src = megatron_layout(shape, RankGrid(world_size=world, tp=tm, pp=pm))
        dst = vllm_layout(shape, tp=tv, world_size=world)
    except LayoutError:
        pytest.skip("layout impossible for this model (checked in test_impossible_*)")
    bucket = 2048
    plan = make_plan(src, dst=dst, bucket_bytes=bucket, elem_size=4)
    canon = _canon(shape)
    src_local = {r: {n: assemble(lt, _read(canon)) for n, lt in t.items()} for r, t in src.ranks.items()}
    out, hits = _run_in_memory(plan, src_local, dst)
    for rank, tensors in dst.ranks.items():
        for name, lt in tensors.items():
            want = assemble(lt, _read(canon), dtype=torch.float32)
            assert torch.equal(out[rank][name], want), (rank, name)
            covered = assemble(lt, lambda c, d, s, n: torch.ones_like(canon[c].narrow(d, s, n)), dtype=torch.float32)
            assert torch.equal(hits[rank][name].float(), covered), f"{name} on rank {rank}: not written exactly once"
    assert check_minimal(plan, src, dst) == plan.lower_bound  # ops, plan count and the planner's bound
    for b in plan.buckets:
        sent, wrote = defaultdict(int), defaultdict(int)
        for op in b:
            if not op.local:
                sent[op.src_rank] += op.nbytes
            wrote[op.dst_rank] += op.nbytes
        assert max(sent.values(), default=0) <= bucket and max(wrote.values()) <= bucket


def test_vllm_qkv_replicates_kv_heads_like_vllm():
    """QKVParallelLinear: t >= kv_heads -> one kv head per rank, head = rank // (t // kv)."""
    shape = _shape("qwen2", True)
    assert shape.kv_heads == 2 and shape.heads % 4 == 0, "qwen2 tiny must have 2 kv heads for this test"
    assert [vllm_kv_heads(shape, tp=4, tp_rank=r) for r in range(4)] == [[0], [0], [1], [1]]
    assert vllm_kv_heads(shape, tp=1, tp_rank=0) == [0, 1]
    d, nh = shape.head_dim, shape.heads // 4
    lay = vllm_layout(shape, tp=4, world_size=4)
    lt = lay.ranks[3]["model.layers.0.self_attn.qkv_proj.weight"]
    rows = [(b.canon.split(".")[-2], b.local_start // d, b.canon_start // d, b.length // d) for b in lt.blocks]
    # [Q_r | K_r | V_r]: the last nh q heads, then kv head 1 (replicated on ranks 2 and 3)
    assert rows == [("q_proj", 0, 3 * nh, nh), ("k_proj", nh, 1, 1), ("v_proj", nh + 1, 1, 1)]
    assert lt.shape == ((nh + 2) * d, shape.hidden)
    bias = lay.ranks[3]["model.layers.0.self_attn.qkv_proj.bias"]
    assert bias.shape == ((nh + 2) * d,) and [b.canon for b in bias.blocks] == [b.canon.replace("weight", "bias")
                                                                               for b in lt.blocks]


def test_vllm_vocab_padding_and_tied_names():
    shape = _shape("qwen2", True)
    assert shape.vocab == 250 and vllm_padded_vocab(250, tp=4) == 256 and vllm_padded_vocab(250, tp=1) == 256
    lay = vllm_layout(shape, tp=4, world_size=4)
    last = lay.ranks[3]["model.embed_tokens.weight"]
    assert last.shape == (64, shape.hidden) and last.blocks[0].canon_start == 192 and last.blocks[0].length == 58
    assert "lm_head.weight" not in lay.ranks[0]  # tied: one Parameter in vLLM
    untied_shape = _shape("qwen3", False)
    untied = vllm_layout(untied_shape, tp=2, world_size=2)
    assert untied.ranks[1]["lm_head.weight"].blocks[0].canon == "lm_head.weight"
    f = untied_shape.ffn // 2
    gu = untied.ranks[1]["model.layers.0.mlp.gate_up_proj.weight"]
    assert [(b.canon.split(".")[-2], b.local_start, b.canon_start, b.length) for b in gu.blocks] == \
        [("gate_proj", 0, f, f), ("up_proj", f, f, f)]
    down = untied.ranks[1]["model.layers.0.mlp.down_proj.weight"]
    assert down.dim == 1 and down.shape == (untied_shape.hidden, f) and down.blocks[0].canon_start == f


def test_dp_replicas_keep_local_and_spread_load():
    shape = _shape("llama", False)
    src = megatron_layout(shape, RankGrid(world_size=4, tp=2))  # DP2
    plan = make_plan(src, dst=vllm_layout(shape, tp=2, world_size=4), bucket_bytes=1 << 20, elem_size=4)
    assert plan.bytes_moved == 0 and plan.local_bytes > 0  # every shard is already on its rank
    plan = make_plan(src, dst=vllm_layout(shape, tp=4, world_size=4), bucket_bytes=1 << 20, elem_size=4)
    sent = defaultdict(int)
    for op in (op for b in plan.buckets for op in b if not op.local):
        sent[op.src_rank] += op.nbytes
    assert len(sent) == 4 and max(sent.values()) <= 1.25 * min(sent.values()), dict(sent)


def test_minimality_check_fails_on_a_wasteful_plan_or_a_wrong_bound():
    """Negative controls for check_minimal: a plan that fetches a piece it already holds locally
    from a DP replica, and a bound computed for the wrong rank placement, must both fail it."""
    shape = SWEEP_SHAPES[("llama", False)]
    src = megatron_layout(shape, RankGrid(world_size=4, tp=2))  # TP2 x DP2: ranks r and r + 2 hold the same
    dst = vllm_layout(shape, tp=4, world_size=4)
    plan = make_plan(src, dst=dst, bucket_bytes=1 << 20, elem_size=4)
    bound = check_minimal(plan, src, dst)
    needed = sum(int(m.sum()) for canons in element_masks(dst).values() for m in canons.values()) * 4
    assert 0 < bound < needed  # some pieces are local, some are not
    k, i, op = next((k, i, op) for k, b in enumerate(plan.buckets) for i, op in enumerate(b) if op.local)
    peer = (op.src_rank + 2) % 4  # the DP replica holds the same local tensor
    assert op.src_name in plan.src_tensors[peer]
    wasteful = dataclasses.replace(plan, buckets=[list(b) for b in plan.buckets])
    wasteful.buckets[k][i] = dataclasses.replace(op, src_rank=peer)
    assert plan_cross_rank_bytes(wasteful) == bound + op.nbytes
    with pytest.raises(AssertionError, match="independent lower bound"):
        check_minimal(wasteful, src, dst)
    rotated = dataclasses.replace(src, ranks={(r + 1) % 4: t for r, t in src.ranks.items()})
    assert sync_lower_bound(rotated, dst, elem_size=4) != bound
    with pytest.raises(AssertionError, match="independent lower bound"):
        check_minimal(plan, rotated, dst)


def test_plan_is_cached_by_layout_content():
    shape = _shape("qwen3", False)
    a = make_plan(megatron_layout(shape, RankGrid(world_size=2, tp=2)), dst=vllm_layout(shape, tp=1, world_size=2),
                  bucket_bytes=4096, elem_size=4)
    b = make_plan(megatron_layout(shape, RankGrid(world_size=2, tp=2)), dst=vllm_layout(shape, tp=1, world_size=2),
                  bucket_bytes=4096, elem_size=4)
    assert a is b


def test_model_mismatch_names_the_parameter():
    small = _shape("qwen3", False)
    wide = ModelShape.from_hf_config(tiny_hf_config("qwen3", intermediate_size=2 * small.ffn))
    with pytest.raises(LayoutError, match=r"model.layers.0.mlp.(gate|up|down)_proj.weight.*training shape"):
        make_plan(megatron_layout(small, RankGrid(world_size=1)), dst=vllm_layout(wide, tp=1, world_size=1),
                  bucket_bytes=1 << 20, elem_size=4)
    with pytest.raises(LayoutError, match=r"'lm_head.weight': the rollout model has it"):
        make_plan(megatron_layout(_shape("qwen3", True), RankGrid(world_size=1)),
                  dst=vllm_layout(small, tp=1, world_size=1), bucket_bytes=1 << 20, elem_size=4)


def test_impossible_rollout_layouts_name_the_field():
    shape = _shape("qwen2", True)  # 8 heads, 2 kv heads
    with pytest.raises(LayoutError, match=r"rollout.tp=3"):
        vllm_layout(shape, tp=3, world_size=6)
    with pytest.raises(LayoutError, match=r"rollout.tp=16 does not divide num_attention_heads=8"):
        vllm_layout(shape, tp=16, world_size=16)
    with pytest.raises(LayoutError, match=r"bucket_bytes=16 is smaller than one row"):
        make_plan(megatron_layout(shape, RankGrid(world_size=1)), dst=vllm_layout(shape, tp=1, world_size=1),
                  bucket_bytes=16, elem_size=4)


def test_whole_tensor_destination_gathers_column_splits():
    """Gather-to-HF (the benchmark baseline's target) through the same planner."""
    shape = _shape("llama", False)
    src = megatron_layout(shape, RankGrid(world_size=4, tp=4))
    plan = make_plan(src, dst=hf_layout(shape, rank=0), bucket_bytes=1 << 16, elem_size=4)
    canon = _canon(shape, seed=1)
    src_local = {r: {n: assemble(lt, _read(canon)) for n, lt in t.items()} for r, t in src.ranks.items()}
    out, _ = _run_in_memory(plan, src_local, hf_layout(shape, rank=0))
    assert all(torch.equal(out[0][n], canon[n]) for n in canon)
    assert check_minimal(plan, src, hf_layout(shape, rank=0)) == plan.lower_bound > 0


def test_checksum_is_bitwise_and_order_sensitive():
    t = torch.randn(100, 3)
    assert checksum(t) == checksum(t.clone())
    assert checksum(t) != checksum(t.flip(0))
    u = t.clone()
    u.view(torch.int32)[5, 1] ^= 1  # one flipped mantissa bit
    assert checksum(t) != checksum(u)
