"""Tier 1: the tiny Qwen3-MoE family, its shape, and the expert layout algebra (HF <-> Megatron)."""
import json
import os

import pytest
import torch

from megatron_rl.models.tiny import make_tiny_model

pytestmark = pytest.mark.unit


def test_tiny_moe_checkpoint_is_per_expert_and_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = make_tiny_model(str(tmp_path / "a"), family="qwen3_moe", seed=0)
    b = make_tiny_model(str(tmp_path / "b"), family="qwen3_moe", seed=0)
    c = make_tiny_model(str(tmp_path / "c"), family="qwen3_moe", seed=1)
    cfg = json.load(open(os.path.join(a, "config.json")))
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_hidden_layers"] == 2
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"]) == (8, 2, True)
    assert cfg["head_dim"] >= 32  # vLLM CPU attention's smallest head size
    sa, sb, sc = (load_file(os.path.join(p, "model.safetensors")) for p in (a, b, c))
    # HF writes one tensor per expert and projection (its fused in-memory gate_up_proj is not on disk)
    experts = sorted(k for k in sa if ".mlp.experts." in k and k.startswith("model.layers.1."))
    assert len(experts) == 8 * 3 and "model.layers.1.mlp.experts.7.gate_proj.weight" in experts
    assert tuple(sa["model.layers.0.mlp.experts.0.gate_proj.weight"].shape) == (128, 256)
    assert tuple(sa["model.layers.0.mlp.experts.0.down_proj.weight"].shape) == (256, 128)
    assert tuple(sa["model.layers.0.mlp.gate.weight"].shape) == (8, 256)
    e0, e1 = (sa[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] for e in (0, 1))
    assert e0.std() > 0.01 and not torch.equal(e0, e1)  # random, distinct experts (no symmetric init)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.gate.weight"], sc["model.layers.0.mlp.gate.weight"])  # seed matters


def _shape():
    from megatron_rl.models.shape import ModelShape
    from megatron_rl.models.tiny import tiny_hf_config

    return ModelShape.from_hf_config(tiny_hf_config("qwen3_moe"))


def _canon(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shape.canonical_shapes().items()}


@pytest.mark.parametrize("tp,pp,ep,world", [(1, 1, 1, 1), (2, 1, 1, 2), (1, 1, 2, 2), (1, 2, 2, 4), (2, 1, 2, 4),
                                            (2, 2, 2, 8), (1, 1, 8, 8)])
def test_moe_round_trip_hf_megatron_hf_is_bitwise(tp, pp, ep, world):
    """HF -> every Megatron rank's local tensors -> HF gives back every tensor bitwise, and every
    rank holds exactly its share of experts."""
    from megatron_rl.parallel.grid import RankGrid
    from megatron_rl.resharding.layout import assemble, disassemble, megatron_layout

    shape = _shape()
    canon = _canon(shape)
    lay = megatron_layout(shape, RankGrid(world_size=world, tp=tp, pp=pp, ep=ep))
    rebuilt = {n: torch.full_like(t, float("nan")) for n, t in canon.items()}
    for tensors in lay.ranks.values():
        for lt in tensors.values():
            local = assemble(lt, lambda c, d, s, n: canon[c].narrow(d, s, n))
            disassemble(lt, local, lambda c, d, s, run: rebuilt[c].narrow(d, s, run.shape[d]).copy_(run))
    for n in canon:
        assert torch.equal(rebuilt[n], canon[n]), n
    # each rank holds num_experts/ep experts per layer, two tensors each, plus the router
    per_rank = {len([k for k in t if ".mlp.experts." in k]) for t in lay.ranks.values()}
    assert per_rank == {2 * (8 // ep) * (shape.layers // pp)}


def test_expert_parallel_rank_holds_its_experts_as_gate_then_up():
    """Megatron EP2, rank with ep_rank 1: local expert 0 is HF expert 4, fc1 = [gate; up], fc2 = down.
    Expected values are read straight from the HF tensors (not through the layout)."""
    from megatron_rl.resharding.layout import assemble, megatron_rank_tensors

    shape = _shape()
    canon = _canon(shape)
    local = megatron_rank_tensors(shape, tp=1, pp=1, tp_rank=0, pp_rank=0, ep=2, ep_rank=1)
    read = lambda c, d, s, n: canon[c].narrow(d, s, n)  # noqa: E731
    fc1 = assemble(local["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"], read)
    fc2 = assemble(local["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"], read)
    hf = "model.layers.1.mlp.experts."
    assert torch.equal(fc1, torch.cat([canon[hf + "4.gate_proj.weight"], canon[hf + "4.up_proj.weight"]]))
    assert torch.equal(fc2, canon[hf + "7.down_proj.weight"])
    assert torch.equal(assemble(local["decoder.layers.1.mlp.router.weight"], read), canon["model.layers.1.mlp.gate.weight"])
    other = megatron_rank_tensors(shape, tp=1, pp=1, tp_rank=0, pp_rank=0, ep=2, ep_rank=0)  # negative control
    fc1_0 = assemble(other["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"], read)
    assert not torch.equal(fc1_0, fc1)
    # TP2 splits each expert's ffn: rank 1 holds [gate rows 64:128; up rows 64:128]
    tp_local = megatron_rank_tensors(shape, tp=2, pp=1, tp_rank=1, pp_rank=0, ep=2, ep_rank=1)
    fc1_t = assemble(tp_local["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"], read)
    assert torch.equal(fc1_t, torch.cat([canon[hf + "4.gate_proj.weight"][64:], canon[hf + "4.up_proj.weight"][64:]]))


def test_rank_grid_expert_coords_equal_megatron_rank_generator():
    """Our ep coordinate against megatron-core's own (pure) RankGenerator for the expert grid."""
    from megatron.core.parallel_state import RankGenerator

    from megatron_rl.parallel.grid import RankGrid

    for world, tp, pp, cp, ep in [(8, 2, 1, 1, 2), (8, 1, 2, 1, 2), (8, 1, 1, 2, 4), (8, 2, 2, 1, 2), (4, 1, 1, 1, 4)]:
        grid = RankGrid(world_size=world, tp=tp, pp=pp, cp=cp, ep=ep)
        gen = RankGenerator(tp=tp, ep=ep, dp=world // (tp * ep * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        got = {}
        for group in gen.get_ranks("ep"):
            for i, r in enumerate(group):
                got[r] = i
        assert {r: grid.coords(r).ep for r in range(world)} == got, (world, tp, pp, cp, ep)
        assert grid.expert_dp == len(gen.get_ranks("dp")[0])


def test_impossible_expert_layouts_are_one_line_errors():
    from megatron_rl.config import ParallelConfig, load_config
    from megatron_rl.errors import ConfigError, LayoutError
    from megatron_rl.models import check_moe_parallel
    from megatron_rl.models.shape import ModelShape
    from megatron_rl.models.tiny import tiny_hf_config
    from megatron_rl.parallel.grid import RankGrid
    from megatron_rl.resharding.layout import megatron_layout

    shape = _shape()
    cases = [
        (lambda: megatron_layout(shape, RankGrid(world_size=3, ep=3)), "parallel.ep=3 does not divide num_experts=8"),
        (lambda: megatron_layout(ModelShape.from_hf_config(tiny_hf_config("qwen3")), RankGrid(world_size=2, ep=2)),
         "parallel.ep=2 needs a mixture-of-experts model (Qwen3ForCausalLM is dense); fix: set parallel.ep=1"),
        (lambda: RankGrid(world_size=4, tp=2, ep=4), "parallel.ep=4 does not divide the 2 ranks"),
        (lambda: check_moe_parallel(ParallelConfig(tp=2)), "parallel.sequence_parallel=false"),
        (lambda: ParallelConfig(ep=0), "parallel.ep"),
        # the same rule in the config check, before any process group: one config line
        (lambda: load_config(overrides=["parallel.tp=2", "parallel.pp=1"]).check_hf_config(
            tiny_hf_config("qwen3_moe")), "config error: parallel.sequence_parallel: false"),
    ]
    for make, message in cases:
        with pytest.raises((LayoutError, ConfigError)) as e:
            make()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    check_moe_parallel(ParallelConfig(tp=1))
    check_moe_parallel(ParallelConfig(tp=2, sequence_parallel=True))  # TP with SP: gloo too (compat patch 13)
    megatron_layout(shape, RankGrid(world_size=8, ep=8))
