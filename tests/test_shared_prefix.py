"""Shared-prefix packing, CP plan and attention kernels (pure CPU, no processes).

The kernels are checked against a dense masked softmax built from the same visibility rule,
and the rule itself against a hand-written ``[P, R_i]`` causal computation, so a wrong rule
cannot hide behind a matching oracle.
"""
import math

import pytest
import torch

from megatron_rl.attention import Group, PackingError, build_local, pack_groups
from megatron_rl.attention.kernels import reference_attention, task_attention
from megatron_rl.attention.packing import pack_naive

pytestmark = pytest.mark.unit


def _groups(specs, seed=0, vocab=100):
    gen = torch.Generator().manual_seed(seed)
    return [Group(prompt=torch.randint(3, vocab, (p,), generator=gen).tolist(),
                  responses=[torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens],
                  advantages=[float(a) for a in torch.randn(len(lens), generator=gen)])
            for p, lens in specs]


SPECS = [(7, [3, 0, 5, 1]), (2, [4]), (13, [2, 2, 6, 1, 3, 1, 1, 9])]


# -- packing ---------------------------------------------------------------------------------------

def test_positions_restart_and_index_maps():
    groups = _groups(SPECS)
    (mb,) = pack_groups(groups, max_tokens=1000)
    assert mb.num_tokens == sum(len(g.prompt) + sum(map(len, g.responses)) for g in groups)  # pad-free
    for n, (g, i) in enumerate(mb.response_keys):
        group, resp = groups[g], groups[g].responses[i]
        a, b = mb.response_cu[n].item(), mb.response_cu[n + 1].item()
        assert b - a == len(resp)
        tok = mb.token_index[a:b]
        assert mb.tokens[tok].tolist() == resp
        assert mb.targets[a:b].tolist() == resp
        plen = len(group.prompt)
        assert mb.position_ids[tok].tolist() == list(range(plen, plen + len(resp)))
        assert mb.response_id[tok].tolist() == [i] * len(resp)
        if resp:
            start = mb.group_starts[mb.group_indices.index(g)]
            assert mb.logit_index[a].item() == start + plen - 1  # the last prompt token
            assert mb.logit_index[a + 1:b].tolist() == tok[:-1].tolist()
            assert mb.advantages[a:b].tolist() == pytest.approx([group.advantages[i]] * len(resp))
    assert mb.loss_mask.sum().item() == len(set(mb.logit_index.tolist()))


def test_per_token_advantages_and_empty_response():
    g = Group(prompt=[5, 6], responses=[[7, 8, 9], [], [4]], advantages=[[0.1, 0.2, 0.3], [], 2.0])
    (mb,) = pack_groups([g], max_tokens=100)
    parts = mb.split_responses(mb.advantages)
    assert [p.tolist() for p in parts] == [pytest.approx([0.1, 0.2, 0.3]), [], [2.0]]
    # documented handling: an empty response occupies no tokens and yields an empty tensor
    assert mb.num_tokens == 2 + 3 + 1 and parts[1].numel() == 0


def test_greedy_split_keeps_order_and_budget():
    groups = _groups([(10, [5, 5]), (10, [5]), (30, [10]), (3, [1, 1])])
    mbs = pack_groups(groups, max_tokens=40)
    assert [mb.group_indices for mb in mbs] == [[0, 1], [2], [3]]
    assert all(mb.num_tokens <= 40 for mb in mbs)


@pytest.mark.parametrize("group, kwargs, message", [
    (Group(prompt=[], responses=[[1]]), {}, "groups[0].prompt is empty"),
    (Group(prompt=[1], responses=[]), {}, "groups[0].responses is empty"),
    (Group(prompt=[1] * 90, responses=[[2] * 20]), {"max_seq_len": 100}, "> max_seq_len=100"),
    (Group(prompt=[1] * 90, responses=[[2] * 20]), {"max_tokens": 100}, "> max_tokens=100"),
    (Group(prompt=[1], responses=[[2]], advantages=[1.0, 2.0]), {}, "advantages has 2 entries for 1"),
    (Group(prompt=[1], responses=[[2, 3]], advantages=[[1.0]]), {}, "advantages[0] has 1 per-token"),
])
def test_bad_input_is_one_clear_error(group, kwargs, message):
    args = dict(max_tokens=1000)
    args.update(kwargs)
    with pytest.raises(PackingError) as err:
        pack_groups([Group(prompt=[1, 2], responses=[[3]]), group], **args)
    assert message.replace("groups[0]", "groups[1]") in str(err.value)


# -- plans and kernels -----------------------------------------------------------------------------

def _qkv(t, h=4, hk=2, d=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t, n, d, generator=gen) for n in (h, hk, hk)]


def _naive_rows(groups, mb, q, k, v, scale):
    """Ground truth by construction: each [P, R_i] alone, plain causal softmax."""
    out = torch.zeros_like(q)
    rep = q.size(1) // k.size(1)
    for g, start in enumerate(mb.group_starts):
        plen = mb.prompt_lens[g]
        first = start + plen
        for n in mb.response_lens[g]:
            idx = torch.cat([torch.arange(start, start + plen), torch.arange(first, first + n)])
            qq, kk, vv = q[idx], k[idx].repeat_interleave(rep, 1), v[idx].repeat_interleave(rep, 1)
            s = torch.einsum("qhd,khd->hqk", qq, kk) * scale
            s = s.masked_fill(torch.ones(len(idx), len(idx), dtype=torch.bool).triu(1), float("-inf"))
            out[idx] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)
            first += n
    return out


def test_task_attention_matches_naive_and_reference_with_grads():
    groups = _groups(SPECS)
    (mb,) = pack_groups(groups, max_tokens=1000)
    local = build_local(mb, pad_multiple=8)
    t, plan = mb.num_tokens, local.plan
    q, k, v = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, plan.num_queries - t)).requires_grad_() for x in _qkv(t)]
    scale = 1 / math.sqrt(8)
    out = task_attention(q, k, v, tasks=plan.tasks, scale=scale)
    ref = reference_attention(q, k, v, q_meta=plan.q_meta, k_meta=plan.k_meta, scale=scale)
    naive = _naive_rows(groups, mb, q, k, v, scale)
    assert (out[:t] - naive[:t]).abs().max() < 1e-5
    assert (out[:t] - ref[:t]).abs().max() < 1e-5
    w = torch.randn(out.shape)
    w[t:] = 0
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((naive * w).sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        assert (a - b).norm() / b.norm() < 1e-5


def test_task_area_is_split_not_quadratic():
    """The plan scores P^2 (prompt) + G*R*P (responses x prompt) + sum R_i^2 (own), never (P+GR)^2."""
    p, r, g = 1024, 64, 8
    (mb,) = pack_groups([Group(prompt=[1] * p, responses=[[2] * r] * g)], max_tokens=10**6)
    tasks = build_local(mb).plan.tasks
    area = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1, _ in tasks)
    assert area == p * p + g * r * p + g * r * r
    assert area < 0.7 * (p + g * r) ** 2


def cp_rank_inputs(mb, cp, q, k, v):
    """Simulate CP in one process: ``[(local batch, local q, key-space k, v)]`` per rank, the key
    space being the all-gathered prompt slots (in canonical order) followed by the local rows."""
    locals_ = [build_local(mb, cp_size=cp, cp_rank=r, pad_multiple=2) for r in range(cp)]
    rows = lambda x, lb: torch.where((lb.global_index >= 0)[:, None, None], x[lb.global_index.clamp(min=0)], 0.0)  # noqa: E731
    slots = locals_[0].plan.prompt_slots
    gk = torch.cat([rows(k, lb)[:slots] for lb in locals_])
    gv = torch.cat([rows(v, lb)[:slots] for lb in locals_])
    return [(lb, rows(q, lb), torch.cat([gk[lb.plan.gather_index], rows(k, lb)]),
             torch.cat([gv[lb.plan.gather_index], rows(v, lb)])) for lb in locals_]


@pytest.mark.parametrize("cp", [2, 3])
def test_cp_plan_equals_single_rank(cp):
    """Simulate CP in one process: gather the prompt slots, attend per rank, compare to CP=1."""
    groups = _groups(SPECS)
    (mb,) = pack_groups(groups, max_tokens=1000)
    t = mb.num_tokens
    q, k, v = [x.requires_grad_() for x in _qkv(t)]
    scale = 0.3
    full = _naive_rows(groups, mb, q, k, v, scale)
    ranks = cp_rank_inputs(mb, cp, q, k, v)
    assert len({lb.num_tokens for lb, *_ in ranks}) == 1
    # every response (the empty one included) is on exactly one rank
    assert sorted(key for lb, *_ in ranks for key in lb.response_keys) == sorted(mb.response_keys)
    slots = ranks[0][0].plan.prompt_slots
    loss, w = 0.0, torch.randn(full.shape)
    for lb, qq, kk, vv in ranks:
        out = task_attention(qq, kk, vv, tasks=lb.plan.tasks, scale=scale)
        real = lb.global_index >= 0
        assert (out[real] - full[lb.global_index[real]]).abs().max() < 1e-5
        # count each canonical row once: skip query-only copies of the last prompt token
        own = real & ~((torch.arange(lb.num_tokens) >= slots) & (lb.plan.q_meta["resp"] == -1))
        loss = loss + (out[own] * w[lb.global_index[own]]).sum()
    g_cp = torch.autograd.grad(loss, (q, k, v))
    g_ref = torch.autograd.grad((full * w).sum(), (q, k, v))
    for a, b in zip(g_cp, g_ref):
        assert (a - b).norm() / b.norm() < 1e-5


def test_cp_split_is_balanced_and_responses_stay_whole():
    p, cp = 1000, 4
    (mb,) = pack_groups([Group(prompt=[1] * p, responses=[[2] * n for n in (64, 60, 50, 40, 30, 20, 10, 5)])],
                        max_tokens=10**6)
    locals_ = [build_local(mb, cp_size=cp, cp_rank=r) for r in range(cp)]
    prompt_rows = [int((lb.plan.q_meta["resp"][:lb.plan.prompt_slots] == -1).sum()) for lb in locals_]
    assert sum(prompt_rows) == p and max(prompt_rows) - min(prompt_rows) <= 2
    # causal work of the prompt: sum of positions per rank, within 1% of each other
    work = [int(lb.plan.q_meta["pos"][:lb.plan.prompt_slots].sum()) for lb in locals_]
    assert max(work) / min(work) < 1.01
    seen = [key for lb in locals_ for key in lb.response_keys]
    assert sorted(seen) == sorted(mb.response_keys)  # each response on exactly one rank
    resp_tokens = [int((lb.plan.q_meta["resp"] >= 0).sum()) for lb in locals_]
    assert max(resp_tokens) - min(resp_tokens) <= 64
    # the prompt activations per rank fall as 1/CP
    assert max(lb.plan.prompt_slots for lb in locals_) <= p // cp + 2


def test_naive_layout_rows():
    groups = _groups([(3, [2, 0]), (2, [1])])
    tokens, pos, lengths, keys = pack_naive(groups)
    assert keys == [(0, 0), (0, 1), (1, 0)] and lengths == [5, 3, 3]
    assert tokens[0, :5].tolist() == groups[0].prompt + groups[0].responses[0]
