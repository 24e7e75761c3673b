"""Bucket scheduling for the weight-sync planner: which pieces go in which bucket.

The planner (:mod:`.planner`) cuts the destination into pieces and gives each its sender;
this module orders them into buckets so that every rank with work left shares every bucket
(:class:`_Scheduler`), within the per-rank budgets of :class:`_Budget`, and prices a plan
under a simple link model (:func:`sync_cost`). Pure: no process group, no device, no I/O.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Optional

from megatron_rl.resharding.layout import Layout


PIECES_PER_BUCKET = 4  # a rank sends (and receives) at most bucket_bytes / 4 per bucket
PIECE_FRACTION = 16  # pieces of at most bucket_bytes / 16
START_POINTS, START_WINDOWS = 16, 8  # candidate start points per destination; window = 1/8 of its bytes
UNBOUNDED = 1 << 62  # staging_bytes: no bound on open destination shards
STREAMS = 4  # each destination works on this many places of its tensor list at once
LOOKAHEAD = 8  # queued pieces of a destination tried per turn, when its head's senders are full


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


@dataclass(frozen=True)
class _Run:
    """A source run: canonical [start, end) along ``dim`` held by (rank, name) from ``local_start``."""

    start: int
    end: int
    rank: int
    name: str
    local_start: int


@dataclass(frozen=True)
class _Piece:
    """One destination piece still to schedule: ``length`` slices of ``canon`` from
    ``canon_start``, written at ``dst_offset`` of (dst_rank, dst_name), and the source runs that
    hold it (one on the destination's own rank when any: then it is a local copy)."""

    dst_rank: int
    dst_name: str
    dim: int
    dst_offset: int
    length: int
    nbytes: int
    canon: str
    canon_start: int
    cands: tuple

    @functools.cached_property
    def head(self) -> Op:
        """The op from the first candidate sender (the one the scheduler uses), built once."""
        return self.op(self.cands[0])

    def op(self, run: _Run) -> Op:
        return Op(run.rank, run.name, self.dst_rank, self.dst_name, self.dim, run.local_start + (self.canon_start - run.start),
                  self.dst_offset, self.length, self.nbytes, self.canon, self.canon_start)


def _shares(cands: list, x: int, y: int, turn: int) -> list[tuple]:
    """Rows [x, y) split evenly among the candidate senders (identical replicas: DP, CP, or the
    TP ranks of a replicated tensor), the remainder rows going round by ``turn``, so that every
    replica sends the same share and a receiver draws from all of them at once."""
    k = min(len(cands), y - x)
    q, extra = divmod(y - x, k)
    out, a = [], x
    for i in range(k):
        e = a + q + (1 if i < extra else 0)
        out.append((cands[(i + turn) % len(cands)], a, e))
        a = e
    return out


def _boundaries(pieces: list[_Piece], points: int) -> list[int]:
    """About ``points`` evenly spaced piece indices that start a destination tensor."""
    cuts = []
    for i in range(points):
        c = len(pieces) * i // points
        while 0 < c < len(pieces) and pieces[c].dst_name == pieces[c - 1].dst_name:
            c += 1
        if c < len(pieces) and c not in cuts:
            cuts.append(c)
    return cuts or [0]


def _window_demand(pieces: list[_Piece], cut: int, window: int) -> dict[int, float]:
    """Bytes each sender would be asked for by the first ``window`` cross-rank bytes from
    ``cut`` (a piece's bytes shared among its candidate senders)."""
    demand: dict[int, float] = defaultdict(float)
    got, n = 0, len(pieces)
    for k in range(n):
        p = pieces[(cut + k) % n]
        if p.cands[0].rank == p.dst_rank:
            continue
        for c in p.cands:
            demand[c.rank] += p.nbytes / len(p.cands)
        got += p.nbytes
        if got >= window:
            break
    return demand


def _start_points(per_rank: dict[int, list[_Piece]]) -> dict[int, int]:
    """Where each destination starts its (cyclic) queue. Chosen one destination at a time among
    evenly spaced tensor boundaries, so that the senders' first windows of demand are as even
    as possible; the destinations then advance at the same pace and the spread persists. This
    is what makes every bucket busy on every rank: with all queues starting at layer 0, every
    destination would ask the first pipeline stage's ranks at once."""
    load: dict[int, float] = defaultdict(float)
    starts = {}
    for r in sorted(per_rank):
        pieces = per_rank[r]
        remote = sum(p.nbytes for p in pieces if p.cands[0].rank != p.dst_rank)
        window = max(1, remote // START_WINDOWS)
        best = None
        for cut in _boundaries(pieces, START_POINTS):
            d = _window_demand(pieces, cut, window)
            score = max((load[k] + v for k, v in d.items()), default=0.0)
            if best is None or score < best[0]:
                best = (score, cut, d)
        starts[r] = best[1]
        for k, v in best[2].items():
            load[k] += v
    return starts


def _merge(prev: Op, op: Op) -> Optional[Op]:
    """``prev`` and ``op`` as one op when ``op`` continues ``prev`` on both sides."""
    if (prev.src_rank, prev.src_name, prev.dst_rank, prev.dst_name, prev.dim, prev.canon) == \
            (op.src_rank, op.src_name, op.dst_rank, op.dst_name, op.dim, op.canon) and \
            prev.src_offset + prev.length == op.src_offset and prev.dst_offset + prev.length == op.dst_offset:
        return Op(prev.src_rank, prev.src_name, prev.dst_rank, prev.dst_name, prev.dim, prev.src_offset,
                  prev.dst_offset, prev.length + op.length, prev.nbytes + op.nbytes, prev.canon, prev.canon_start)
    return None


class _Scheduler:
    """Fills each bucket from the heads of every destination's queue at once, so that every
    rank with work left shares every bucket.

    Each pass offers the ``LOOKAHEAD`` pieces at the head of every queue, the most urgent first:
    the bytes still left on the piece's receiver plus on its sender, so that the ranks that bound
    the whole sync are served in every bucket and none is left to finish alone. A pass takes
    every offer that still fits; the heads then move on. An offer that did not fit cannot fit
    later in the same bucket (charges only grow), so it is not offered again until the next.
    Every offer of a pass is either taken or refused, so the next pass needs offers only from
    the queues that took something (their heads moved on): the rest would offer only refusals.
    """

    def __init__(self, queues: dict[tuple[int, int], deque], budget: "_Budget"):
        self.queues, self.budget = queues, budget
        self.left: dict[int, int] = defaultdict(int)  # cross-rank bytes each rank still receives
        self.sleft: dict[int, int] = defaultdict(int)  # ... and still sends
        for q in queues.values():
            for p in q:
                if p.cands[0].rank != p.dst_rank:
                    self.left[p.dst_rank] += p.nbytes
                    self.sleft[p.cands[0].rank] += p.nbytes

    def _offers(self, turn: int, refused: set, keys) -> list[tuple]:
        offers = []
        for key in keys:
            q = self.queues[key]
            for j in range(min(LOOKAHEAD, len(q))):
                p = q[j]
                if id(p) in refused:
                    continue
                src, r = p.cands[0].rank, p.dst_rank
                urgency = self.left[r] + self.sleft[src] if src != r else 0
                offers.append((-urgency, (r - turn) % len(self.queues), j, key))
        offers.sort()
        return offers

    def bucket(self, turn: int) -> list[Op]:
        self.budget.reset()
        ops: list[Op] = []
        last: dict[int, int] = {}  # dst rank -> index in ops of its latest op
        refused: set[int] = set()
        keys = list(self.queues)  # the first pass: every queue offers
        while True:
            taken: dict[int, list[int]] = defaultdict(list)
            for _, _, j, r in self._offers(turn, refused, keys):
                piece = self.queues[r][j]
                op = piece.head
                if self.budget.fits(op):
                    self._take(op, ops, last)
                    taken[r].append(j)
                else:
                    refused.add(id(piece))
            if not taken:
                return ops
            for r, js in taken.items():
                q = self.queues[r]
                for j in sorted(js, reverse=True):
                    del q[j]
            keys = [key for key in self.queues if key in taken]  # in queue order, as the first pass

    def _take(self, op: Op, ops: list[Op], last: dict[int, int]) -> None:
        self.budget.add(op)
        if not op.local:
            self.left[op.dst_rank] -= op.nbytes
            self.sleft[op.src_rank] -= op.nbytes
        i = last.get(op.dst_rank)
        merged = _merge(ops[i], op) if i is not None else None
        if merged is not None:
            ops[i] = merged
        else:
            last[op.dst_rank] = len(ops)
            ops.append(op)


@functools.lru_cache(maxsize=None)
def _contiguous(shape: tuple[int, ...], dim: int, length: int) -> bool:
    """Is ``narrow(dim, ., length)`` of a contiguous tensor of ``shape`` contiguous?"""
    return math.prod(shape[:dim]) == 1 or length == shape[dim]


def held_bytes(op: Op, src_shape: tuple[int, ...], dst_shape: tuple[int, ...]) -> tuple[int, int]:
    """The buffers a cross-rank op holds on its (sender, receiver), given the shapes of its
    source and destination tensors: each side's coalescing buffer, plus a packed copy where its
    slice is not contiguous. A local op holds none."""
    if op.local:
        return 0, 0
    n = op.nbytes
    return (n if _contiguous(tuple(src_shape), op.dim, op.length) else 2 * n,
            n if _contiguous(tuple(dst_shape), op.dim, op.length) else 2 * n)


class _Budget:
    """Per-rank charges of the bucket being built.

    - ``sent`` / ``recv``: cross-rank bytes, at most ``pace`` (a quarter bucket) per rank and
      role, the same for every rank, so that no rank's share of a bucket outlasts the others';
    - ``wrote``: every byte written on a rank, local copies included, at most ``bucket_bytes``;
    - ``held``: the buffers the executor and the transport allocate for the bucket: packed
      copies of non-contiguous slices, and the transport's coalescing buffers (a cross-rank
      op's bytes on both sides: over gloo a bucket's messages to one peer travel as one flat
      buffer), at most ``bucket_bytes``. With double buffering two buckets' buffers are alive
      at once: at most 2 x ``bucket_bytes``.

    A rank may always take its first op of a bucket in each role, so nothing can stall. The
    staged destination shards are not charged: they are the rollout weights being rebuilt
    (handed to the engine when complete), and the scheduler keeps each rank's open shards to
    the few at the head of its queue.
    """

    def __init__(self, bound: int, src_shapes: dict, dst_shapes: dict, *, staging: int, shard_bytes: dict,
                 pieces: dict):
        self.bound, self.src_shapes, self.dst_shapes = bound, src_shapes, dst_shapes
        self.pace = bound // PIECES_PER_BUCKET
        self.staging, self.shard_bytes = staging, shard_bytes
        self.pieces0, self.unwritten = dict(pieces), dict(pieces)  # (rank, shard) -> pieces (left)
        self.staged: dict[int, int] = defaultdict(int)  # bytes of the shards open on each rank
        self.reset()

    def reset(self) -> None:
        for key in getattr(self, "done", ()):
            self.staged[key[0]] -= self.shard_bytes[key]
        self.done: list = []
        self.sent, self.recv = defaultdict(int), defaultdict(int)
        self.wrote, self.held = defaultdict(int), defaultdict(int)

    def held_cost(self, op: Op) -> tuple[int, int]:
        return held_bytes(op, self.src_shapes[(op.src_rank, op.src_name)], self.dst_shapes[(op.dst_rank, op.dst_name)])

    def _room(self, rank: int, moved: dict, n: int, limit: int, held: int) -> bool:
        first = rank not in moved
        return first or (moved[rank] + n <= limit and self.held[rank] + held <= self.bound)

    def _opens(self, op: Op) -> int:
        key = (op.dst_rank, op.dst_name)
        return self.shard_bytes[key] if self.unwritten[key] == self.pieces0[key] else 0

    def fits(self, op: Op) -> bool:
        n = op.nbytes
        opens = self._opens(op)
        if opens and self.staged[op.dst_rank] and self.staged[op.dst_rank] + opens > self.staging:
            return False
        if op.dst_rank in self.wrote and self.wrote[op.dst_rank] + n > self.bound:
            return False
        if op.local:
            return True
        src_held, dst_held = self.held_cost(op)
        return self._room(op.dst_rank, self.recv, n, self.pace, dst_held) and \
            self._room(op.src_rank, self.sent, n, self.pace, src_held)

    def add(self, op: Op) -> None:
        key = (op.dst_rank, op.dst_name)
        self.staged[op.dst_rank] += self._opens(op)
        self.unwritten[key] -= 1
        if not self.unwritten[key]:  # complete: handed to the engine after this bucket
            self.done.append(key)
        src_held, dst_held = self.held_cost(op)
        self.held[op.src_rank] += src_held
        self.held[op.dst_rank] += dst_held
        self.wrote[op.dst_rank] += op.nbytes
        if not op.local:
            self.sent[op.src_rank] += op.nbytes
            self.recv[op.dst_rank] += op.nbytes


def _bucketize(per_rank: dict[int, list[_Piece]], bucket_bytes: int, src: Layout, dst: Layout,
               elem_size: int, staging_bytes: int) -> list[list[Op]]:
    shard_bytes = {(r, n): math.prod(lt.shape) * elem_size for r, t in dst.ranks.items() for n, lt in t.items()}
    pieces: dict = defaultdict(int)
    for r, ps in per_rank.items():
        for p in ps:
            pieces[(r, p.dst_name)] += 1
    budget = _Budget(bucket_bytes, {(r, n): lt.shape for r, t in src.ranks.items() for n, lt in t.items()},
                     {(r, n): lt.shape for r, t in dst.ranks.items() for n, lt in t.items()},
                     staging=staging_bytes, shard_bytes=shard_bytes, pieces=pieces)
    ranks = sorted(per_rank)
    starts = _start_points(per_rank)
    queues = {}
    for r in ranks:
        rotated = per_rank[r][starts[r]:] + per_rank[r][:starts[r]]
        cuts = [0] + _boundaries(rotated, STREAMS)[1:] + [len(rotated)]
        for k, (a, e) in enumerate(zip(cuts[:-1], cuts[1:])):
            queues[(r, k)] = deque(rotated[a:e])  # STREAMS cursors per destination, spread over its tensors
    sched = _Scheduler(queues, budget)
    buckets: list[list[Op]] = []
    while any(queues.values()):
        bucket = sched.bucket(len(buckets))
        if not bucket:  # every rank may take a first op, so this is a planner bug, never a hang
            raise AssertionError("weight-sync planner: a bucket took no op")
        buckets.append(bucket)
    return buckets
