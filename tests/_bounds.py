"""Independent figures for weight-sync plans, from element masks (never from the planner).

- :func:`sync_lower_bound`: for each destination rank, the canonical elements its layout needs
  that the source layout does not already place on that same rank, times the element size.
  No plan can move fewer bytes between ranks.
- :func:`plan_cross_rank_bytes`: the bytes a plan's cross-rank ops really carry, counted from
  each op's slice shape (not from ``Plan.bytes_moved``, which the planner sums itself).
- :func:`check_minimal`: both, against a plan; raises AssertionError naming the figures.

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


def sync_lower_bound(src, dst, *, elem_size: int) -> int:
    """Bytes that must cross ranks: per destination rank, needed elements not held there by ``src``."""
    held, needed = element_masks(src), element_masks(dst)
    total = 0
    for rank, canons in needed.items():
        for canon, need in canons.items():
            have = held.get(rank, {}).get(canon)
            missing = need if have is None else need & ~have
            total += int(missing.sum()) * elem_size
    return total


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
