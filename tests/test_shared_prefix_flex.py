"""FlexAttention path of shared-prefix attention on CPU: forward exactness and compile count.

torch runs the compiled ``flex_attention`` forward on CPU (not its backward; that is
tests/test_shared_prefix_gpu.py). Over 10 micro-batches whose packed lengths all differ, on a
single rank and on simulated CP ranks (key space = gathered prompt + local rows), the bucketed
block mask and the compiled kernel must equal the naive ``[P, R_i]`` computation, and the
kernel and the mask builder must each compile at most twice. The negative control runs the
old scheme (``dynamic=False``, unbucketed lengths) and must see one compile per length, so a
counter that never counts cannot pass.
"""
import math

import pytest
import torch
from torch._dynamo.utils import counters

from megatron_rl.attention import build_local, pack_groups
from megatron_rl.attention import kernels
from megatron_rl.attention.plan import PAD_GROUP
from test_shared_prefix import _groups, _naive_rows, _qkv, cp_rank_inputs

pytestmark = pytest.mark.unit

TOL = 1e-5


def _compiles(fn, *args, **kwargs):
    before = counters["frames"]["ok"]
    out = fn(*args, **kwargs)
    return out, counters["frames"]["ok"] - before


MAX_TOKENS = 480


def _specs(step):
    """Step-dependent GRPO groups (prompt 8-40 tokens, 1-6 responses of 0-25): packed greedily
    into MAX_TOKENS, the first micro-batch's length changes every step, as in training."""
    gen = torch.Generator().manual_seed(100 + step)
    rand = lambda lo, hi, n=1: torch.randint(lo, hi, (n,), generator=gen).tolist()  # noqa: E731
    return [(rand(8, 41)[0], rand(0, 26, rand(1, 7)[0])) for _ in range(12)]


def _rank_cases(step, cp):
    """(query rows, key space k, v, plan, naive rows of the queries, real-row mask) per CP rank."""
    groups = _groups(_specs(step), seed=step)
    mb = pack_groups(groups, max_tokens=MAX_TOKENS)[0]
    groups = [groups[g] for g in mb.group_indices]
    q, k, v = _qkv(mb.num_tokens, d=16, seed=step)
    full = _naive_rows(groups, mb, q, k, v, 1 / math.sqrt(16))
    if cp == 1:
        plan = build_local(mb).plan
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, plan.num_queries - mb.num_tokens))  # noqa: E731
        real = plan.q_meta["group"] != PAD_GROUP
        return [(pad(q), pad(k), pad(v), plan, pad(full), real)], mb.num_tokens
    out = []
    for lb, qq, kk, vv in cp_rank_inputs(mb, cp, q, k, v):
        real = lb.global_index >= 0
        out.append((qq, kk, vv, lb.plan, full[lb.global_index.clamp(min=0)], real))
    return out, mb.num_tokens


@pytest.mark.parametrize("cp", [1, 2])
def test_flex_forward_equals_naive_and_compiles_at_most_twice(cp):
    torch._dynamo.reset()
    lengths, buckets, mask_compiles, attn_compiles, worst = set(), set(), 0, 0, 0.0
    for step in range(10):
        cases, _ = _rank_cases(step, cp)
        for q, k, v, plan, naive, real in cases:
            lengths.add((plan.num_queries, plan.num_keys))
            mask, n_mask = _compiles(kernels.flex_block_mask, plan.q_meta, plan.k_meta, device="cpu")
            buckets.add(mask.seq_lengths)
            out, n_attn = _compiles(kernels.flex_attention_plan, q, k, v, block_mask=mask, scale=1 / math.sqrt(16))
            mask_compiles, attn_compiles = mask_compiles + n_mask, attn_compiles + n_attn
            assert out.shape == q.shape
            worst = max(worst, float((out[real] - naive[real]).abs().max()))
    print(f"cp={cp}: {len(lengths)} (Tq, Tk) shapes in {len(buckets)} buckets {sorted(buckets)}, "
          f"mask compiles {mask_compiles}, kernel compiles {attn_compiles}, max |flex - naive| {worst:.2e}")
    assert len(lengths) >= 8, "the lengths must change from step to step"
    assert worst <= TOL
    assert mask_compiles == attn_compiles == len(buckets) <= 2  # static on CPU: one compile per bucket


def test_bucketed_mask_is_sparse_and_masks_pads():
    """The block mask covers the bucketed lengths, skips blocks of other groups, and a pad key
    row is never attended (changing pad K/V leaves real rows unchanged)."""
    specs = [(100, [60, 40]), (90, [30, 30, 50])]
    (mb,) = pack_groups(_groups(specs), max_tokens=10**6)
    plan = build_local(mb).plan
    mask = kernels.flex_block_mask(plan.q_meta, plan.k_meta, device="cpu")
    t = plan.num_queries
    assert mask.seq_lengths == (kernels.flex_bucket(t), kernels.flex_bucket(t)) and t % 128
    n_blocks = mask.seq_lengths[0] // 128
    assert int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()) < n_blocks * n_blocks
    q, k, v = _qkv(t, d=16)
    out = kernels.flex_attention_plan(q, k, v, block_mask=mask, scale=0.25)
    ref = kernels.task_attention(q, k, v, tasks=plan.tasks, scale=0.25)
    assert (out - ref).abs().max() <= TOL


def test_counter_counts_recompiles_of_the_old_static_scheme():
    """Negative control: dynamic=False on unbucketed lengths compiles once per length."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()
    static = torch.compile(flex_attention, dynamic=False)
    total = 0
    for t in (40, 56, 72):
        mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, t, t, device="cpu")
        q, k, v = [x.permute(1, 0, 2)[None] for x in _qkv(t, hk=4, d=16)]
        _, n = _compiles(static, q, k, v, block_mask=mask)
        total += n
    print(f"old scheme: {total} compiles for 3 lengths")
    assert total == 3
