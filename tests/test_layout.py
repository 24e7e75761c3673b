"""Tier 1: the layout algebra round-trips every canonical tensor exactly, at every layout."""
import itertools

import pytest
import torch

from megatron_rl.models.tiny import tiny_hf_config
from megatron_rl.parallel.grid import LayoutError, RankGrid
from megatron_rl.models.shape import ModelShape, padded_vocab
from megatron_rl.resharding.layout import assemble, disassemble, megatron_layout

pytestmark = pytest.mark.unit


def _canon(shape: ModelShape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shape.canonical_shapes().items()}


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen3", False)])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (2, 4)])
def test_megatron_layout_round_trip(family, tied, tp, pp):
    shape = ModelShape.from_hf_config(tiny_hf_config(family, tied=tied))
    if shape.kv_heads % tp:
        pytest.skip("tp does not divide kv heads")
    canon = _canon(shape)
    lay = megatron_layout(shape, RankGrid(world_size=tp * pp, tp=tp, pp=pp))
    rebuilt = {n: torch.full_like(t, float("nan")) for n, t in canon.items()}
    for rank, tensors in lay.ranks.items():
        for lt in tensors.values():
            local = assemble(lt, lambda c, d, s, n: canon[c].narrow(d, s, n))
            assert tuple(local.shape) == lt.shape

            def write(c, d, s, run):
                rebuilt[c].narrow(d, s, run.shape[d]).copy_(run)
            disassemble(lt, local, write)
    for n in canon:
        assert torch.equal(rebuilt[n], canon[n]), n


def test_qkv_interleave_by_query_group():
    """Megatron's fused QKV at TP1: per group g, [q heads of g | k_g | v_g], by hand."""
    shape = ModelShape(hidden=4, heads=4, kv_heads=2, head_dim=1, ffn=4, layers=1, vocab=8)
    lt = megatron_layout(shape, RankGrid(world_size=1)).ranks[0]["decoder.layers.0.self_attention.linear_qkv.weight"]
    rows = []
    for b in lt.blocks:
        proj = b.canon.split(".")[-2][0]
        rows += [f"{proj}{b.canon_start + i}" for i in range(b.length)]
    assert rows == ["q0", "q1", "k0", "v0", "q2", "q3", "k1", "v1"]


def test_vocab_padding_is_tp_independent_and_zero_filled():
    assert padded_vocab(250, divisible_by=128, tp=1) == padded_vocab(250, divisible_by=128, tp=4) == 256
    assert padded_vocab(250, divisible_by=1, tp=3) == 252
    shape = ModelShape.from_hf_config(tiny_hf_config("llama"))
    lay = megatron_layout(shape, RankGrid(world_size=2, tp=2))
    emb = lay.ranks[1]["embedding.word_embeddings.weight"]
    assert emb.shape == (128, shape.hidden) and emb.blocks[0].length == 250 - 128
    local = assemble(emb, lambda c, d, s, n: torch.ones(n, shape.hidden))
    assert local[122:].abs().sum() == 0 and local[:122].sum() == 122 * shape.hidden


def test_impossible_layouts_name_the_field():
    shape = ModelShape.from_hf_config(tiny_hf_config("qwen2"))  # 2 kv heads
    with pytest.raises(LayoutError, match=r"parallel.tp=4 does not divide num_query_groups=2"):
        megatron_layout(shape, RankGrid(world_size=4, tp=4))
    with pytest.raises(LayoutError, match=r"parallel.pp=3 does not divide"):
        megatron_layout(shape, RankGrid(world_size=3, pp=3))
    with pytest.raises(LayoutError, match=r"does not divide the world size"):
        RankGrid(world_size=6, tp=4)
