"""The pure weight-sync planner: match two layouts, emit bucketed shard-to-shard copies.

No process group, no device and no I/O: the plan depends only on the two layouts, the
bucket size and the element size, and is cached on them.

Every destination block (a run of a canonical tensor along one dim) is cut at every
boundary of the source runs that cover it; each piece is taken from a source on the same
rank when one exists (a local copy), otherwise from the least-loaded source replica
(DP/CP replicas, and TP ranks for replicated norms, are all candidates). So the bytes the
plan moves between ranks equal, by construction, ``lower_bound``: the destination bytes
that no source holds on the destination's own rank (computed separately from the choice).

Ops are ordered by destination tensor, interleaving ranks, and cut into buckets so that no
rank sends more than ``bucket_bytes``, writes more than ``bucket_bytes``, or holds more than
``bucket_bytes`` of staging and packing buffers per bucket (see :class:`_Budget`).

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

from megatron_rl.errors import LayoutError
from megatron_rl.resharding.layout import Layout, LocalTensor


@dataclass(frozen=True)
class Op:
    """Copy ``length`` slices along ``dim``: src local tensor at ``src_offset`` -> dst at ``dst_offset``."""

    src_rank: int
    src_name: str
    dst_rank: int
    dst_name: str
    dim: int
    src_offset: int
    dst_offset: int
    length: int
    nbytes: int
    canon: str
    canon_start: int

    @property
    def local(self) -> bool:
        return self.src_rank == self.dst_rank


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


@dataclass(frozen=True)
class _Run:
    """A source run: canonical [start, end) along ``dim`` held by (rank, name) from ``local_start``."""

    start: int
    end: int
    rank: int
    name: str
    local_start: int


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


def _raw_ops(src: Layout, dst: Layout, elem_size: int) -> tuple[list[Op], int]:
    index = _source_index(src)
    load: dict[int, int] = defaultdict(int)
    ops: list[Op] = []
    lower = 0
    for rank, name, dim, off, canon, x, y, cands in _dst_pieces(dst, index):
        per_slice = math.prod(s for i, s in enumerate(dst.canon_shapes[canon]) if i != dim) * elem_size
        nbytes = (y - x) * per_slice
        local = [r for r in cands if r.rank == rank]
        if local:
            pick = local[0]
        else:
            lower += nbytes
            pick = min(cands, key=lambda r: (load[r.rank], r.rank))
            load[pick.rank] += nbytes
        src_off = pick.local_start + (x - pick.start)
        prev = ops[-1] if ops else None
        if prev and (prev.src_rank, prev.src_name, prev.dst_rank, prev.dst_name, prev.dim, prev.canon) == \
                (pick.rank, pick.name, rank, name, dim, canon) and prev.src_offset + prev.length == src_off \
                and prev.dst_offset + prev.length == off:
            ops[-1] = Op(prev.src_rank, prev.src_name, rank, name, dim, prev.src_offset, prev.dst_offset,
                         prev.length + y - x, prev.nbytes + nbytes, canon, prev.canon_start)
        else:
            ops.append(Op(pick.rank, pick.name, rank, name, dim, src_off, off, y - x, nbytes, canon, x))
    return ops, lower


def _split(op: Op, max_len: int) -> list[Op]:
    per = op.nbytes // op.length
    out = []
    for s in range(0, op.length, max_len):
        n = min(max_len, op.length - s)
        out.append(Op(op.src_rank, op.src_name, op.dst_rank, op.dst_name, op.dim, op.src_offset + s,
                      op.dst_offset + s, n, n * per, op.canon, op.canon_start + s))
    return out


def _contiguous(shape: tuple[int, ...], dim: int, length: int) -> bool:
    """Is ``narrow(dim, ., length)`` of a contiguous tensor of ``shape`` contiguous?"""
    return math.prod(shape[:dim]) == 1 or length == shape[dim]


class _Budget:
    """Per-rank charges of the bucket being built: bytes sent, bytes written, bytes held.

    "Held" is what the executor allocates for the bucket: the staged destination shards it
    touches (whole shards: the engine takes whole shards; a shard still open from an earlier
    bucket is charged again) plus packed buffers for non-contiguous slices. With double
    buffering two buckets are held at once, so the extra memory stays <= 2 x bucket_bytes
    unless one shard alone is larger than a bucket.
    """

    def __init__(self, bound: int, shard_bytes: dict, src_shapes: dict, dst_shapes: dict):
        self.bound, self.shard_bytes, self.src_shapes, self.dst_shapes = bound, shard_bytes, src_shapes, dst_shapes
        self.open: set[tuple[int, str]] = set()
        self.reset()

    def reset(self) -> None:
        self.sent, self.wrote, self.held = defaultdict(int), defaultdict(int), defaultdict(int)
        for rank, name in self.open:
            self.held[rank] += self.shard_bytes[(rank, name)]

    def held_cost(self, op: Op) -> dict[int, int]:
        cost: dict[int, int] = defaultdict(int)
        if (op.dst_rank, op.dst_name) not in self.open:
            cost[op.dst_rank] += self.shard_bytes[(op.dst_rank, op.dst_name)]
        if not op.local:
            if not _contiguous(self.src_shapes[(op.src_rank, op.src_name)], op.dim, op.length):
                cost[op.src_rank] += op.nbytes
            if not _contiguous(self.dst_shapes[(op.dst_rank, op.dst_name)], op.dim, op.length):
                cost[op.dst_rank] += op.nbytes
        return cost

    def fits(self, op: Op) -> bool:
        s = 0 if op.local else op.nbytes
        if self.sent[op.src_rank] + s > self.bound or self.wrote[op.dst_rank] + op.nbytes > self.bound:
            return False
        return all(c == 0 or self.held[r] + c <= self.bound for r, c in self.held_cost(op).items())

    def add(self, op: Op) -> None:
        for r, c in self.held_cost(op).items():
            self.held[r] += c
        self.sent[op.src_rank] += 0 if op.local else op.nbytes
        self.wrote[op.dst_rank] += op.nbytes
        self.open.add((op.dst_rank, op.dst_name))


def _bucketize(ops: list[Op], bucket_bytes: int, src: Layout, dst: Layout, elem_size: int) -> list[list[Op]]:
    shard_bytes = {(r, n): math.prod(lt.shape) * elem_size for r, t in dst.ranks.items() for n, lt in t.items()}
    budget = _Budget(bucket_bytes, shard_bytes,
                     {(r, n): lt.shape for r, t in src.ranks.items() for n, lt in t.items()},
                     {(r, n): lt.shape for r, t in dst.ranks.items() for n, lt in t.items()})
    pieces: list[Op] = []
    for big in ops:
        per = big.nbytes // big.length
        if per > bucket_bytes:
            raise LayoutError(f"sync.bucket_bytes={bucket_bytes} is smaller than one row ({per} bytes) of "
                              f"{big.dst_name!r}; fix: raise sync.bucket_bytes")
        pieces += _split(big, bucket_bytes // per)
    remaining: dict[tuple[int, str], int] = defaultdict(int)
    for op in pieces:
        remaining[(op.dst_rank, op.dst_name)] += 1
    buckets: list[list[Op]] = [[]]
    for op in pieces:
        if buckets[-1] and not budget.fits(op):
            buckets.append([])
            budget.reset()
        buckets[-1].append(op)
        budget.add(op)
        key = (op.dst_rank, op.dst_name)
        remaining[key] -= 1
        if not remaining[key]:
            budget.open.discard(key)
    return buckets


def _freeze(lay: Layout):
    return (lay.framework, tuple(sorted((c, tuple(s)) for c, s in lay.canon_shapes.items())),
            tuple((r, tuple(lay.ranks[r].items())) for r in sorted(lay.ranks)))


def make_plan(src: Layout, *, dst: Layout, bucket_bytes: int, elem_size: int) -> Plan:
    """The cached plan from ``src`` (training) to ``dst`` (rollout)."""
    if bucket_bytes < 1 or elem_size < 1:
        raise LayoutError(f"sync.bucket_bytes={bucket_bytes} and elem_size={elem_size} must be positive")
    return _cached_plan(_Frozen(src), _Frozen(dst), bucket_bytes, elem_size)


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
def _cached_plan(src: _Frozen, dst: _Frozen, bucket_bytes: int, elem_size: int) -> Plan:
    _check_shapes(src.lay, dst.lay)
    ops, lower = _raw_ops(src.lay, dst.lay, elem_size)
    buckets = _bucketize(ops, bucket_bytes, src.lay, dst.lay, elem_size)
    last = {}
    for k, bucket in enumerate(buckets):
        for op in bucket:
            last[(op.dst_rank, op.dst_name)] = k
    moved = sum(op.nbytes for op in ops if not op.local)
    return Plan(buckets=buckets, bytes_moved=moved, lower_bound=lower,
                local_bytes=sum(op.nbytes for op in ops if op.local), bucket_bytes=bucket_bytes,
                elem_size=elem_size, dst_tensors={r: dict(t) for r, t in dst.lay.ranks.items()},
                src_tensors={r: dict(t) for r, t in src.lay.ranks.items()}, last_bucket=last)
