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
