"""The weight-sync plan at the job's real world size, and its time on the cluster's links.

The plan is the job's own (:func:`megatron_rl.resharding.planner.make_plan`: pure, so 64 or
512 ranks plan on one box) with the config's bucket and staging sizes. Two time figures:

* ``sync_makespan_over_bound``: :func:`~megatron_rl.resharding.planner.sync_cost`, the
  planner's own cost model (a bucket lasts as long as its busiest rank's larger of bytes sent
  and received; buckets run in sequence; the bound is the busiest rank's total);
* ``seconds``: the same buckets on links: ranks ``gpus_per_node`` to a node, NVLink between
  ranks of a node, the NIC between nodes, each direction at its own bandwidth. A rank's part of
  a bucket lasts as long as its slowest of (NVLink out, NVLink in, NIC out, NIC in); a bucket as
  long as its slowest rank. ``bound_seconds``: the busiest link direction of any rank, over
  the whole sync.

``peak_extra_bytes``: the transfer buffers (coalescing buffers on both sides, packed copies
of non-contiguous slices) of two buckets in flight, plus the staging bound when staged shards
are copies (``rollout.weights_release=offload``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from megatron_rl.models.shape import ModelShape
from megatron_rl.parallel.grid import RankGrid
from megatron_rl.plan.shapes import DTYPE_BYTES
from megatron_rl.resharding.layout import megatron_layout
from megatron_rl.resharding.planner import UNBOUNDED, make_plan, sync_cost
from megatron_rl.resharding.schedule import held_bytes
from megatron_rl.resharding.vllm_layout import vllm_layout


@dataclass(frozen=True)
class Links:
    """The cluster's links (bytes per second, each direction) and ranks per node."""

    nvlink: float
    nic: float
    gpus_per_node: int


@dataclass(frozen=True)
class SyncPlan:
    bytes_moved: int
    max_rank_bytes: int  # the busiest rank's larger of bytes sent and received
    buckets: int
    peak_extra_bytes: int
    makespan_over_bound: float  # the planner's cost model (bytes)
    seconds: float  # on the links
    bound_seconds: float


def staging(cfg) -> int:
    """``sync.staging_bytes`` with 0 resolved as the job resolves it (``trainer.staging_bytes``)."""
    if cfg.sync.staging_bytes:
        return cfg.sync.staging_bytes
    return UNBOUNDED if cfg.rollout.weights_release == "discard" else cfg.sync.bucket_bytes // 2


def _bucket_loads(plan, links: Links):
    """Per bucket: {(rank, link, direction): bytes} and {rank: bytes held in buffers}."""
    for bucket in plan.buckets:
        wire: dict = defaultdict(float)  # (rank, link, direction) -> bytes
        held: dict = defaultdict(int)
        for op in bucket:
            if op.local:
                continue
            link = "nvlink" if op.src_rank // links.gpus_per_node == op.dst_rank // links.gpus_per_node else "nic"
            wire[(op.src_rank, link, "out")] += op.nbytes
            wire[(op.dst_rank, link, "in")] += op.nbytes
            src_held, dst_held = held_bytes(op, plan.src_tensors[op.src_rank][op.src_name].shape,
                                            plan.dst_tensors[op.dst_rank][op.dst_name].shape)
            held[op.src_rank] += src_held
            held[op.dst_rank] += dst_held
        yield wire, held


def _seconds(wire: dict, links: Links) -> float:
    return max((n / getattr(links, link) for (_, link, _), n in wire.items()), default=0.0)


def plan_sync(cfg, shape: ModelShape, *, world_size: int, links: Links) -> SyncPlan:
    p = cfg.parallel
    src = megatron_layout(shape, RankGrid(world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp),
                          vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
    dst = vllm_layout(shape, tp=cfg.rollout.tp, world_size=world_size)
    plan = make_plan(src, dst=dst, bucket_bytes=cfg.sync.bucket_bytes, elem_size=DTYPE_BYTES[cfg.rollout_dtype],
                     staging_bytes=staging(cfg))
    cost = sync_cost(plan)
    total: dict = defaultdict(float)
    seconds, prev_held, peak = 0.0, {}, 0
    for wire, held in _bucket_loads(plan, links):
        seconds += _seconds(wire, links)
        for key, n in wire.items():
            total[key] += n
        peak = max([peak] + [held[r] + prev_held.get(r, 0) for r in held])
        prev_held = held
    copies = cfg.rollout.weights_release == "offload"
    return SyncPlan(bytes_moved=plan.bytes_moved, max_rank_bytes=cost["bound_bytes"], buckets=cost["buckets"],
                    peak_extra_bytes=peak + (staging(cfg) if copies else 0),
                    makespan_over_bound=cost["makespan_over_bound"], seconds=seconds,
                    bound_seconds=_seconds(total, links))
