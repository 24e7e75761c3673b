"""Independent figures for weight-sync plans, from element masks (never from the planner).

- :func:`sync_lower_bound`: for each destination rank, the canonical elements its layout needs
  that the source layout does not already place on that same rank, times the element size.
  No plan can move fewer bytes between ranks.
- :func:`plan_cross_rank_bytes`: the bytes a plan's cross-rank ops really carry, counted from
  each op's slice shape (not from ``Plan.bytes_moved``, which the planner sums itself).
- :func:`check_minimal`: both, against a plan; raises AssertionError naming the figures.
- :func:`moe_rank_bound`: one rank's share of the bound for a Qwen3-MoE checkpoint, from the HF
  config and the rank's Megatron and vLLM coordinates alone (no layout, no masks, no plan).

Masks are torch bool tensors over each canonical tensor: a block marks ``length`` slices along
its ``dim`` from ``canon_start`` (every other dim whole), exactly as the layout docstring defines.

    bound = sync_lower_bound(src_layout, dst_layout, elem_size=4)
    check_minimal(plan, src_layout, dst_layout)
"""
import math
from collections import defaultdict

import torch


def element_masks(layout) -> dict:
    """rank -> canon -> bool mask (canonical shape) of the elements the rank's local tensors hold."""
    masks: dict = defaultdict(dict)
    for rank, tensors in layout.ranks.items():
        for lt in tensors.values():
            for b in lt.blocks:
                m = masks[rank].setdefault(b.canon, torch.zeros(layout.canon_shapes[b.canon], dtype=torch.bool))
                m.narrow(lt.dim, b.canon_start, b.length).fill_(True)
    return masks


def rank_lower_bounds(src, dst, *, elem_size: int) -> dict:
    """rank -> bytes that must cross into it: the elements its ``dst`` layout needs that ``src`` does
    not already place on that same rank."""
    held, needed = element_masks(src), element_masks(dst)
    out = {}
    for rank, canons in needed.items():
        out[rank] = 0
        for canon, need in canons.items():
            have = held.get(rank, {}).get(canon)
            missing = need if have is None else need & ~have
            out[rank] += int(missing.sum()) * elem_size
    return out


def sync_lower_bound(src, dst, *, elem_size: int) -> int:
    """Bytes that must cross ranks: per destination rank, needed elements not held there by ``src``."""
    return sum(rank_lower_bounds(src, dst, elem_size=elem_size).values())


def plan_cross_rank_bytes(plan) -> int:
    """Bytes of every op whose source rank differs from its destination rank, from the op's shape."""
    total = 0
    for bucket in plan.buckets:
        for op in bucket:
            if op.src_rank != op.dst_rank:
                shape = plan.dst_tensors[op.dst_rank][op.dst_name].shape
                total += op.length * (math.prod(shape) // shape[op.dim]) * plan.elem_size
    return total


def check_minimal(plan, src, dst) -> int:
    """Assert the plan moves exactly the independent lower bound (its ops and its own count); return it."""
    bound = sync_lower_bound(src, dst, elem_size=plan.elem_size)
    carried = plan_cross_rank_bytes(plan)
    assert carried == bound, f"plan ops carry {carried} bytes across ranks; the independent lower bound is {bound}"
    assert plan.bytes_moved == bound, f"plan.bytes_moved={plan.bytes_moved} != independent lower bound {bound}"
    return bound


def _slabs(layout) -> dict:
    """rank -> canon -> [(dim, start, end)]: the slabs (``dim`` cut, every other dim whole) held."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for rank, tensors in layout.ranks.items():
        for lt in tensors.values():
            for b in lt.blocks:
                out[rank][b.canon].append((lt.dim, b.canon_start, b.canon_start + b.length))
    return out


def _union(intervals: list) -> list:
    merged: list = []
    for a, e in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([a, e])
    return merged


def slab_lower_bound(src, dst, *, elem_size: int) -> int:
    """The same figure as :func:`sync_lower_bound`, by interval arithmetic instead of masks, so
    real model sizes fit in memory: per destination rank and canonical tensor, the needed slabs
    minus those held on that rank. A held slab along another dim counts only when it is the whole
    tensor (the layouts never mix cuts otherwise; anything else raises)."""
    held, needed = _slabs(src), _slabs(dst)
    total = 0
    for rank, canons in needed.items():
        for canon, slabs in canons.items():
            shape = dst.canon_shapes[canon]
            (dim,) = {d for d, _, _ in slabs}
            have = []
            for d, a, e in held.get(rank, {}).get(canon, []):
                if d == dim:
                    have.append((a, e))
                elif (a, e) == (0, shape[d]):
                    have.append((0, shape[dim]))
                else:
                    raise AssertionError(f"{canon}: held along dim {d}, needed along dim {dim}")
            need = _union([(a, e) for _, a, e in slabs])
            have = _union(have)
            rows = sum(e - a for a, e in need)
            for a, e in need:
                rows -= sum(max(0, min(e, y) - max(a, x)) for x, y in have)
            total += rows * (math.prod(shape) // shape[dim]) * elem_size
    return total


# -- from shapes alone: one rank's bytes, an MoE (Qwen3-MoE) checkpoint -------------------------


def _run(total: int, parts: int, index: int, valid: int) -> list:
    """Rows [index*n, (index+1)*n) of ``total`` split in ``parts``, clipped to the ``valid`` ones."""
    n = total // parts
    return [(index * n, min((index + 1) * n, valid))] if index * n < valid else []


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _moe_rank_tensors(cfg, *, tp: int, tp_rank: int, layers, experts, vocab_padded: int, embed: bool, head: bool,
                      kv_heads: list) -> dict:
    """HF name -> (split dim, [row intervals]) that one rank holds; ``None`` dim = the whole tensor."""
    h, hd, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    nq, ffn = cfg.num_attention_heads // tp, cfg.moe_intermediate_size // tp
    out = {}
    if embed:
        out["model.embed_tokens.weight"] = (0, _run(vocab_padded, tp, tp_rank, v))
    if head:
        out["model.norm.weight"] = (None, [(0, h)])
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = (0, _run(vocab_padded, tp, tp_rank, v))
    for i in layers:
        p = f"model.layers.{i}."
        q = [(tp_rank * nq * hd, (tp_rank + 1) * nq * hd)]
        kv = [(k * hd, (k + 1) * hd) for k in kv_heads]
        out.update({p + "self_attn.q_proj.weight": (0, q), p + "self_attn.k_proj.weight": (0, kv),
                    p + "self_attn.v_proj.weight": (0, kv), p + "self_attn.o_proj.weight": (1, q)})
        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate"):
            out[p + n + ".weight"] = (None, [(0, 1)])
        rows = [(tp_rank * ffn, (tp_rank + 1) * ffn)]
        for e in experts:
            x = f"{p}mlp.experts.{e}."
            out.update({x + "gate_proj.weight": (0, rows), x + "up_proj.weight": (0, rows), x + "down_proj.weight": (1, rows)})
    return out


def moe_rank_bound(cfg, *, megatron: dict, vllm: dict, elem_size: int = 4, megatron_vocab_divisible_by: int = 128) -> dict:
    """The bytes one rank must receive for its vLLM shard that its Megatron shard does not hold,
    from the HF config and the rank's coordinates alone (megatron-core: ``tp/tp_rank, pp/pp_rank,
    ep/ep_rank``; vLLM: ``tp/tp_rank``), never from a layout or a plan. Returns ``total`` and the
    ``experts`` part. The facts: Megatron pads the vocab to a multiple of 128 x tp, splits its
    layers evenly over pp (embedding on the first stage, final norm and head on the last), gives
    EP rank k experts [k E/ep, (k+1) E/ep) and splits each expert's ffn rows over tp; vLLM pads the
    vocab to 64, holds every layer and every expert split over its tp, and one kv head per rank
    once tp >= kv heads."""
    m, w, nl, kvh = megatron, vllm, cfg.num_hidden_layers, cfg.num_key_value_heads
    per = cfg.num_experts // m["ep"]
    held = _moe_rank_tensors(
        cfg, tp=m["tp"], tp_rank=m["tp_rank"], layers=range(m["pp_rank"] * nl // m["pp"], (m["pp_rank"] + 1) * nl // m["pp"]),
        experts=range(m["ep_rank"] * per, (m["ep_rank"] + 1) * per),
        vocab_padded=_pad(cfg.vocab_size, megatron_vocab_divisible_by * m["tp"]), embed=m["pp_rank"] == 0,
        head=m["pp_rank"] == m["pp"] - 1,
        kv_heads=range(m["tp_rank"] * kvh // m["tp"], (m["tp_rank"] + 1) * kvh // m["tp"]))
    vkv = [w["tp_rank"] // (w["tp"] // kvh)] if w["tp"] >= kvh else \
        range(w["tp_rank"] * kvh // w["tp"], (w["tp_rank"] + 1) * kvh // w["tp"])
    need = _moe_rank_tensors(cfg, tp=w["tp"], tp_rank=w["tp_rank"], layers=range(nl), experts=range(cfg.num_experts),
                             vocab_padded=_pad(cfg.vocab_size, 64), embed=True, head=True, kv_heads=vkv)
    out = dict(total=0, experts=0)
    for name, (dim, rows) in need.items():
        shape = _hf_shape(cfg, name)
        have = held.get(name, (dim, []))[1]
        if dim is None:
            missing = 0 if have else math.prod(shape)
        else:
            left = sum(e - a for a, e in rows) - sum(max(0, min(e, y) - max(a, x)) for a, e in rows for x, y in have)
            missing = left * (math.prod(shape) // shape[dim])
        out["total"] += missing * elem_size
        out["experts"] += missing * elem_size if ".mlp.experts." in name else 0
    return out


def _hf_shape(cfg, name: str) -> tuple:
    h, hd, ffn = cfg.hidden_size, cfg.head_dim, cfg.moe_intermediate_size
    leaf = name.rsplit(".", 2)[-2]
    return {"embed_tokens": (cfg.vocab_size, h), "lm_head": (cfg.vocab_size, h), "norm": (h,),
            "input_layernorm": (h,), "post_attention_layernorm": (h,), "q_norm": (hd,), "k_norm": (hd,),
            "gate": (cfg.num_experts, h), "q_proj": (cfg.num_attention_heads * hd, h),
            "k_proj": (cfg.num_key_value_heads * hd, h), "v_proj": (cfg.num_key_value_heads * hd, h),
            "o_proj": (h, cfg.num_attention_heads * hd), "gate_proj": (ffn, h), "up_proj": (ffn, h),
            "down_proj": (h, ffn)}[leaf]
