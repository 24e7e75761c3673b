"""The pure weight-sync planner: match two layouts, emit bucketed shard-to-shard copies.

No process group, no device and no I/O: the plan depends only on the two layouts, the
bucket size, the element size and the staging bound, and is cached on them.

Every destination block (a run of a canonical tensor along one dim) is cut at every
boundary of the source runs that cover it. A piece held on the destination's own rank is a
local copy; otherwise its rows are shared evenly among the identical source replicas that hold
it (DP/CP replicas, and TP ranks for replicated norms), so every replica sends the same share.
The bytes the plan moves between ranks therefore equal ``lower_bound``: the destination bytes
that no source holds on the destination's own rank (summed where the pieces are cut, before
any sender or bucket is chosen).

Buckets keep every link busy (see :class:`_Scheduler`): each destination works its tensors
from four places at once, starting where the senders' demand is lowest, and each bucket is
filled most-urgent-first under a per-rank pace (a quarter bucket sent and received), the
bucket bound on bytes written and on transfer buffers, and the staging bound
(:class:`_Budget`). :func:`sync_cost` gives the plan's time under a simple link model.

Usage::

    plan = make_plan(megatron_layout(shape, grid), dst=vllm_layout(shape, tp=2, world_size=4),
                     bucket_bytes=64 << 20, elem_size=4)
    plan.bytes_moved == plan.lower_bound
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from megatron_rl.errors import LayoutError
from megatron_rl.resharding.layout import Layout, LocalTensor
from megatron_rl.resharding.schedule import PIECE_FRACTION, UNBOUNDED, Op, _bucketize, _Piece, _Run, _shares

__all__ = ["Op", "Plan", "make_plan", "sync_cost", "UNBOUNDED"]


@dataclass
class Plan:
    buckets: list[list[Op]]
    bytes_moved: int            # bytes crossing ranks
    lower_bound: int            # dst bytes not held by any source on the dst rank
    local_bytes: int            # bytes copied within a rank
    bucket_bytes: int
    elem_size: int
    dst_tensors: dict[int, dict[str, LocalTensor]]
    src_tensors: dict[int, dict[str, LocalTensor]]
    # (rank, dst_name) -> index of the last bucket writing it: the shard is complete after it.
    last_bucket: dict[tuple[int, str], int] = field(default_factory=dict)

    @property
    def num_ops(self) -> int:
        return sum(len(b) for b in self.buckets)

    @functools.cached_property
    def fully_written(self) -> frozenset[tuple[int, str]]:
        """(rank, dst_name) of every shard whose elements the ops write all of (every element
        is written at most once), so its staging needs no zero fill; the others hold padding."""
        written: dict[tuple[int, str], int] = defaultdict(int)
        for bucket in self.buckets:
            for op in bucket:
                shape = self.dst_tensors[op.dst_rank][op.dst_name].shape
                written[(op.dst_rank, op.dst_name)] += op.length * (math.prod(shape) // shape[op.dim])
        return frozenset(k for k, n in written.items() if n == math.prod(self.dst_tensors[k[0]][k[1]].shape))

    def rank_ops(self, rank: int, bucket: int) -> list[tuple[int, Op]]:
        """(index in bucket, op) of every op in ``bucket`` that ``rank`` sends or receives."""
        return [(i, op) for i, op in enumerate(self.buckets[bucket]) if rank in (op.src_rank, op.dst_rank)]


def _is_whole(lt: LocalTensor, canon_shape: tuple[int, ...]) -> bool:
    """The local tensor IS the canonical tensor (so it can be sliced along any dim)."""
    return tuple(lt.shape) == tuple(canon_shape) and len(lt.blocks) == 1 and lt.blocks[0].local_start == 0 \
        and lt.blocks[0].canon_start == 0 and lt.blocks[0].length == canon_shape[lt.dim]


def _source_index(src: Layout) -> dict[tuple[str, int], list[_Run]]:
    """(canon, dim) -> source runs. Whole tensors are indexed along every dim."""
    index: dict[tuple[str, int], list[_Run]] = defaultdict(list)
    for rank in sorted(src.ranks):
        for name, lt in src.ranks[rank].items():
            for b in lt.blocks:
                cshape = src.canon_shapes[b.canon]
                dims = range(len(cshape)) if _is_whole(lt, cshape) else (lt.dim,)
                for d in dims:
                    if d == lt.dim:
                        index[(b.canon, d)].append(_Run(b.canon_start, b.canon_start + b.length, rank, name, b.local_start))
                    else:
                        index[(b.canon, d)].append(_Run(0, cshape[d], rank, name, 0))
    return index


def _check_shapes(src: Layout, dst: Layout) -> None:
    for canon, shape in dst.canon_shapes.items():
        if canon not in src.canon_shapes:
            raise LayoutError(f"parameter {canon!r}: the rollout model has it, the training model does not; "
                              "fix: use the same architecture (and tie_word_embeddings) on both sides")
        if tuple(src.canon_shapes[canon]) != tuple(shape):
            raise LayoutError(f"parameter {canon!r}: training shape {tuple(src.canon_shapes[canon])} != rollout "
                              f"shape {tuple(shape)}; fix: load the same model config on both sides")


def _dst_pieces(dst: Layout, index):
    """Yield (dst_rank, name, dim, dst_offset, canon, [x, y), candidates) per elementary piece."""
    for name in _tensor_order(dst):
        for rank in sorted(dst.ranks):
            lt = dst.ranks[rank].get(name)
            if lt is None:
                continue
            for b in lt.blocks:
                dim, a, e, off0 = lt.dim, b.canon_start, b.canon_start + b.length, b.local_start
                cshape = dst.canon_shapes[b.canon]
                if (b.canon, dim) not in index and _is_whole(lt, cshape):
                    # A whole destination tensor can be cut along whatever dim the sources use.
                    dim = next((d for d in range(len(cshape)) if (b.canon, d) in index), dim)
                    a, e, off0 = 0, cshape[dim], 0
                runs = index.get((b.canon, dim), [])
                cover = [r for r in runs if r.start < e and r.end > a]
                cuts = sorted({a, e} | {p for r in cover for p in (r.start, r.end) if a < p < e})
                for x, y in zip(cuts[:-1], cuts[1:]):
                    cands = [r for r in cover if r.start <= x and r.end >= y]
                    if not cands:
                        raise LayoutError(f"parameter {b.canon!r} rows [{x}, {y}) along dim {dim} needed by rollout "
                                          f"{name!r} on rank {rank} are held by no training rank; fix: the layouts "
                                          "describe different models")
                    yield rank, name, dim, off0 + (x - a), b.canon, x, y, cands


def _tensor_order(lay: Layout) -> list[str]:
    """Destination tensor names in first-seen order over ranks (layer order)."""
    seen: dict[str, None] = {}
    for rank in sorted(lay.ranks):
        for name in lay.ranks[rank]:
            seen.setdefault(name, None)
    return list(seen)


def _pieces(src: Layout, dst: Layout, elem_size: int, bucket_bytes: int) -> tuple[dict[int, list[_Piece]], int]:
    """Per destination rank, its pieces in tensor order (each at most one bucket), and the lower
    bound: the bytes of pieces that no source holds on the destination's own rank."""
    index = _source_index(src)
    per_rank: dict[int, list[_Piece]] = defaultdict(list)
    lower, turn = 0, 0
    for rank, name, dim, off, canon, x, y, cands in _dst_pieces(dst, index):
        per = math.prod(s for i, s in enumerate(dst.canon_shapes[canon]) if i != dim) * elem_size
        if per > bucket_bytes:
            raise LayoutError(f"sync.bucket_bytes={bucket_bytes} is smaller than one row ({per} bytes) of "
                              f"{name!r}; fix: raise sync.bucket_bytes")
        local = [r for r in cands if r.rank == rank]
        if not local:
            lower += (y - x) * per
        rows = max(1, bucket_bytes // PIECE_FRACTION // per)  # small pieces: every rank fills its pace evenly
        for run, a, e in _shares(local[:1] or cands, x, y, turn):
            for s in range(a, e, rows):
                n = min(rows, e - s)
                per_rank[rank].append(_Piece(rank, name, dim, off + (s - x), n, n * per, canon, s, (run,)))
        turn += 1
    return per_rank, lower


def _freeze(lay: Layout):
    return (lay.framework, tuple(sorted((c, tuple(s)) for c, s in lay.canon_shapes.items())),
            tuple((r, tuple(lay.ranks[r].items())) for r in sorted(lay.ranks)))


def make_plan(src: Layout, *, dst: Layout, bucket_bytes: int, elem_size: int, staging_bytes: Optional[int] = None) -> Plan:
    """The cached plan from ``src`` (training) to ``dst`` (rollout).

    ``staging_bytes`` (default half of ``bucket_bytes``) bounds the destination shards each rank
    has open (staged, not yet complete) at once; a rank may always open one. With the transfer
    buffers (at most ``bucket_bytes`` per bucket, one bucket in flight while the next is packed)
    that keeps a rank's extra memory near 2 x ``bucket_bytes`` when no shard is larger."""
    if bucket_bytes < 1 or elem_size < 1:
        raise LayoutError(f"sync.bucket_bytes={bucket_bytes} and elem_size={elem_size} must be positive")
    return _cached_plan(_Frozen(src), _Frozen(dst), bucket_bytes, elem_size,
                        bucket_bytes // 2 if staging_bytes is None else staging_bytes)


class _Frozen:
    """Hashable view of a layout (by content), so equal layouts share one cached plan."""

    def __init__(self, lay: Layout):
        self.lay = lay
        self.key = _freeze(lay)

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Frozen) and self.key == other.key


@functools.lru_cache(maxsize=16)
def _cached_plan(src: _Frozen, dst: _Frozen, bucket_bytes: int, elem_size: int, staging_bytes: int) -> Plan:
    _check_shapes(src.lay, dst.lay)
    per_rank, lower = _pieces(src.lay, dst.lay, elem_size, bucket_bytes)
    buckets = _bucketize(per_rank, bucket_bytes, src.lay, dst.lay, elem_size, staging_bytes)
    ops = [op for bucket in buckets for op in bucket]
    last = {}
    for k, bucket in enumerate(buckets):
        for op in bucket:
            last[(op.dst_rank, op.dst_name)] = k
    moved = sum(op.nbytes for op in ops if not op.local)
    return Plan(buckets=buckets, bytes_moved=moved, lower_bound=lower,
                local_bytes=sum(op.nbytes for op in ops if op.local), bucket_bytes=bucket_bytes,
                elem_size=elem_size, dst_tensors={r: dict(t) for r, t in dst.lay.ranks.items()},
                src_tensors={r: dict(t) for r, t in src.lay.ranks.items()}, last_bucket=last)


def sync_cost(plan: Plan) -> dict:
    """The plan's time under a simple model, in bytes: a bucket takes as long as its busiest
    rank's larger of bytes sent and bytes received, and buckets run one after another. The bound
    is the busiest rank's total of the same. ``makespan_over_bound`` near 1 means every bucket
    keeps every link busy; a serial plan gives about the number of ranks."""
    sent_all: dict[int, int] = defaultdict(int)
    recv_all: dict[int, int] = defaultdict(int)
    makespan = 0
    for bucket in plan.buckets:
        sent: dict[int, int] = defaultdict(int)
        recv: dict[int, int] = defaultdict(int)
        for op in bucket:
            if not op.local:
                sent[op.src_rank] += op.nbytes
                recv[op.dst_rank] += op.nbytes
        makespan += max((max(sent[r], recv[r]) for r in set(sent) | set(recv)), default=0)
        for r, n in sent.items():
            sent_all[r] += n
        for r, n in recv.items():
            recv_all[r] += n
    bound = max((max(sent_all[r], recv_all[r]) for r in set(sent_all) | set(recv_all)), default=0)
    return {"makespan_bytes": makespan, "bound_bytes": bound,
            "makespan_over_bound": makespan / bound if bound else 1.0, "buckets": len(plan.buckets)}
