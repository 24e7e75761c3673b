"""Run a weight-sync :class:`~megatron_rl.resharding.planner.Plan` on one rank, bucket by bucket.

Every rank calls :func:`run_plan` with the same plan. Per bucket the rank sends the slices it
owns and receives the slices it needs, over a transport (see :mod:`transport`), and copies
same-rank slices locally. Destination shards are staged (zero-filled where no op writes, so
vLLM's vocab padding is zero) and handed to ``deliver(name, shard)`` as soon as their last
bucket lands; the executor then drops the staging (the receiver may keep it). No rank ever
holds more of a parameter than its own shard.

Double buffering: bucket k+1 is packed (and its staging allocated) while bucket k is in
flight. Slices that are contiguous (splits along dim 0) are sent straight from the source
parameter and received straight into the staged shard; only column splits (dim 1) and
dtype conversions go through a packed buffer. ``Stats.peak_extra_bytes`` measures the most
bytes held at once in staging and buffers.

:func:`verify_checksums` compares, after a checksummed run, what every source sent with what
every destination staged (one all-reduce); live sync and checkpoint conversion both call it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_rl.parallel import collectives as coll
from megatron_rl.resharding.planner import Op, Plan
from megatron_rl.resharding.transport import Transfer, WeightSyncError


@dataclass
class Stats:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_local: int = 0
    peak_extra_bytes: int = 0
    live_extra_bytes: int = 0
    buckets: int = 0
    # op id -> checksum (only when checksums are requested)
    src_sums: dict[int, int] = field(default_factory=dict)
    dst_sums: dict[int, int] = field(default_factory=dict)

    def alloc(self, n: int) -> None:
        self.live_extra_bytes += n
        self.peak_extra_bytes = max(self.peak_extra_bytes, self.live_extra_bytes)

    def free(self, n: int) -> None:
        self.live_extra_bytes -= n


def checksum(t: torch.Tensor) -> int:
    """A bitwise, order-sensitive checksum: sum of (raw bits x (position % 8191 + 1))."""
    flat = t.contiguous().reshape(-1)  # (numel,)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(ints)
    total, chunk = 0, 1 << 20
    for s in range(0, bits.numel(), chunk):
        part = bits[s:s + chunk].to(torch.int64)
        w = (torch.arange(s, s + part.numel(), dtype=torch.int64, device=part.device) % 8191) + 1
        total = (total + int((part * w).sum())) % (1 << 61)  # int64 sums wrap deterministically
    return total


@dataclass
class _Bucket:
    sends: list[Transfer]
    recvs: list[Transfer]
    unpack: list[tuple[torch.Tensor, torch.Tensor]]  # (received temp, staged view)
    local: list[tuple[int, Op]]  # (index in bucket, op)
    extra: int  # bytes of packed/temp buffers owned by this bucket


class _RankRun:
    """One rank's execution state over a plan."""

    def __init__(self, plan: Plan, rank: int, *, get_src: Callable[[str], torch.Tensor], dst_dtype: torch.dtype,
                 device, checksums: bool):
        self.plan, self.rank, self.get_src = plan, rank, get_src
        self.dst_dtype, self.device, self.checksums = dst_dtype, device, checksums
        self.staged: dict[str, torch.Tensor] = {}
        self.stats = Stats()
        self.op_base = []  # global op id of each bucket's first op
        n = 0
        for b in plan.buckets:
            self.op_base.append(n)
            n += len(b)

    def _src_view(self, op: Op) -> torch.Tensor:
        return self.get_src(op.src_name).detach().narrow(op.dim, op.src_offset, op.length)

    def _dst_view(self, op: Op) -> torch.Tensor:
        buf = self.staged.get(op.dst_name)
        if buf is None:
            shape = self.plan.dst_tensors[self.rank][op.dst_name].shape
            fill = torch.empty if (self.rank, op.dst_name) in self.plan.fully_written else torch.zeros  # padding: 0
            buf = self.staged[op.dst_name] = fill(shape, dtype=self.dst_dtype, device=self.device)
            self.stats.alloc(buf.numel() * buf.element_size())
        return buf.narrow(op.dim, op.dst_offset, op.length)

    def prepare(self, k: int) -> _Bucket:
        b = _Bucket([], [], [], [], 0)
        for i, op in self.plan.rank_ops(self.rank, k):
            what = f"{op.canon} -> {op.dst_name}"
            if op.local:
                self._dst_view(op)  # allocate staging now, copy later
                b.local.append((i, op))
            elif op.src_rank == self.rank:
                view = self._src_view(op)
                if view.dtype != self.dst_dtype or not view.is_contiguous():
                    view = view.to(self.dst_dtype).contiguous()
                    b.extra += view.numel() * view.element_size()
                if self.checksums:
                    self.stats.src_sums[self.op_base[k] + i] = checksum(view)
                b.sends.append(Transfer(op.dst_rank, view, i, what))
            else:
                view = self._dst_view(op)
                if not view.is_contiguous():
                    tmp = torch.empty(view.shape, dtype=self.dst_dtype, device=self.device)
                    b.extra += tmp.numel() * tmp.element_size()
                    b.unpack.append((tmp, view))
                    view = tmp
                b.recvs.append(Transfer(op.src_rank, view, i, what))
        self.stats.alloc(b.extra)
        return b

    def finish(self, k: int, b: _Bucket, deliver) -> None:
        for tmp, view in b.unpack:
            view.copy_(tmp)
        self.stats.free(b.extra)
        self.stats.bytes_sent += sum(t.tensor.numel() * t.tensor.element_size() for t in b.sends)
        self.stats.bytes_received += sum(t.tensor.numel() * t.tensor.element_size() for t in b.recvs)
        if self.checksums:
            for i, op in self.plan.rank_ops(self.rank, k):
                if op.dst_rank == self.rank:
                    self.stats.dst_sums[self.op_base[k] + i] = checksum(self._dst_view(op))
        for name in [n for n in self.staged if self.plan.last_bucket[(self.rank, n)] == k]:
            buf = self.staged.pop(name)
            deliver(name, buf)
            self.stats.free(buf.numel() * buf.element_size())

    def local_copies(self, k: int, b: _Bucket) -> None:
        for i, op in b.local:
            src = self._src_view(op)
            if self.checksums:
                self.stats.src_sums[self.op_base[k] + i] = checksum(src.to(self.dst_dtype))
            self._dst_view(op).copy_(src)
            self.stats.bytes_local += op.nbytes


def run_plan(plan: Plan, rank: int, *, get_src: Callable[[str], torch.Tensor],
             deliver: Callable[[str, torch.Tensor], None], transport, dst_dtype: torch.dtype,
             device=None, checksums: bool = False, after_bucket: Optional[Callable[[int], None]] = None) -> Stats:
    """Execute ``plan`` on ``rank``; every rank of the plan must call this together."""
    run = _RankRun(plan, rank, get_src=get_src, dst_dtype=dst_dtype, device=device or "cpu", checksums=checksums)
    nb = len(plan.buckets)
    current = run.prepare(0) if nb else None
    for k in range(nb):
        handle = transport.start(current.sends, current.recvs)   # bucket k in flight
        in_flight = getattr(transport, "buffer_bytes", 0)         # a transport's own coalescing buffers
        run.stats.alloc(in_flight)
        run.local_copies(k, current)
        nxt = run.prepare(k + 1) if k + 1 < nb else None          # pack k+1 meanwhile
        transport.wait(handle)
        run.stats.free(in_flight)
        run.finish(k, current, deliver)
        run.stats.buckets += 1
        if after_bucket is not None:
            after_bucket(k)
        current = nxt
    # Shards that no op writes (all vocab padding at a large TP) are zeros.
    for name, lt in plan.dst_tensors.get(rank, {}).items():
        if (rank, name) not in plan.last_bucket:
            deliver(name, torch.zeros(lt.shape, dtype=dst_dtype, device=device or "cpu"))
    if run.staged:
        raise WeightSyncError(f"weight sync: shards {sorted(run.staged)} on rank {rank} were never completed")
    return run.stats


def verify_checksums(plan: Plan, stats: Stats, *, rank: int, group=None, what: str = "weight sync") -> int:
    """Compare every op's source and destination checksums of a checksummed :func:`run_plan`.

    Returns the number of slices checked on ``rank``; raises :class:`WeightSyncError` naming the
    first mismatching destination tensor. All ranks of the plan call together (one all-reduce).
    """
    n = plan.num_ops
    sums = torch.zeros(2, n, dtype=torch.int64)  # (src, dst) x op; filled on the host
    for i, v in stats.src_sums.items():
        sums[0, i] = v
    for i, v in stats.dst_sums.items():
        sums[1, i] = v
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        sums = coll.all_reduce(sums.to(coll.backend_device(group)), group=group).cpu()
    flat = [op for b in plan.buckets for op in b]
    checked = 0
    for i, op in enumerate(flat):
        if op.dst_rank != rank:
            continue
        checked += 1
        if int(sums[0, i]) != int(sums[1, i]):
            raise WeightSyncError(f"{what} verify: rank {rank} parameter {op.dst_name!r} slice "
                                  f"[{op.dst_offset}:{op.dst_offset + op.length}] along dim {op.dim} (from "
                                  f"{op.canon} on rank {op.src_rank}) differs from its source")
    return checked
