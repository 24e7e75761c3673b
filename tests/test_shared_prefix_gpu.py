"""GPU path of shared-prefix attention: FlexAttention over the plan's block mask (CUDA only).

Forward and backward must equal the dense masked reference built from the same plan, for a
single rank and for a simulated CP=2 rank (key space = gathered prompt + local rows).
"""
import pytest
import torch

from megatron_rl.attention import build_local, pack_groups
from megatron_rl.attention.kernels import flex_attention_plan, flex_block_mask, reference_attention
from megatron_rl.attention.plan import PAD_GROUP
from test_shared_prefix import SPECS, _groups

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("cp", [1, 2])
def test_flex_matches_reference_with_grads(cp):
    (mb,) = pack_groups(_groups(SPECS), max_tokens=1000)
    plan = build_local(mb, cp_size=cp, cp_rank=cp - 1, pad_multiple=8).plan
    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    q = torch.randn(plan.num_queries, 4, 16, generator=gen).to(dev).requires_grad_()
    k = torch.randn(plan.num_keys, 2, 16, generator=gen).to(dev).requires_grad_()
    v = torch.randn(plan.num_keys, 2, 16, generator=gen).to(dev).requires_grad_()
    mask = flex_block_mask(plan.q_meta, plan.k_meta, device=dev)
    out = flex_attention_plan(q, k, v, block_mask=mask, scale=0.25)
    qm = {n: t.to(dev) for n, t in plan.q_meta.items()}
    km = {n: t.to(dev) for n, t in plan.k_meta.items()}
    ref = reference_attention(q, k, v, q_meta=qm, k_meta=km, scale=0.25)
    real = qm["group"] != PAD_GROUP
    assert (out[real] - ref[real]).abs().max() < 1e-4
    w = torch.randn(out.shape, device=dev) * real[:, None, None]
    g_flex = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g_flex, g_ref):
        assert (a - b).norm() / b.norm() < 1e-4
