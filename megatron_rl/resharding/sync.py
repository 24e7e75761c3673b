"""WeightSync: bind a Megatron model and a rollout engine; plan once, ``sync()`` every step.

Every rank of the SPMD world constructs the object with the same layouts and calls
``sync()`` together. The plan (:mod:`planner`) is built once and cached; each ``sync()``
runs it (:mod:`executor`) over torch.distributed point-to-point and hands this rank's
finished shards to the engine's receiver API::

    engine.begin_weight_update()
    engine.load_shards([(vllm_param_name, shard), ...])   # this rank's shard, vLLM layout
    engine.end_weight_update()                            # vLLM post-load processing

``verify()`` exchanges per-slice checksums of what the sources sent and what the
destinations staged (bitwise, order-sensitive) and raises on any mismatch; it is off by
default and costs one small all-reduce. Mismatched models (shapes, architecture, a missing
parameter) raise :class:`WeightSyncError` at construction, before any byte moves.

Usage::

    src = megatron_layout(shape, grid)
    dst = vllm_layout(shape, tp=cfg.rollout.tp, world_size=world)
    ws = WeightSync(model_chunks, engine, src_layout=src, dst_layout=dst, bucket_bytes=cfg.sync.bucket_bytes,
                    verify=cfg.sync.verify, transport=cfg.sync.transport)
    for step in ...:
        train_step(); ws.sync(); rollout()
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rl.errors import LayoutError
from megatron_rl.resharding.executor import Stats, run_plan, verify_checksums
from megatron_rl.resharding.layout import Layout
from megatron_rl.resharding.planner import Plan, make_plan
from megatron_rl.resharding.transport import TorchP2P, WeightSyncError


def _strip(name: str) -> str:
    while name.startswith("module."):  # DDP / Float16Module wrappers
        name = name[len("module."):]
    return name


def model_tensors(model_chunks) -> dict[str, torch.Tensor]:
    """The parameters of a rank's model chunks by local (unwrapped) name."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) > 1:
        raise WeightSyncError("weight sync: virtual pipeline stages (several model chunks) are not supported yet; "
                              "fix: build one model chunk per rank (no virtual pipeline)")
    return {_strip(n): p for c in chunks for n, p in c.named_parameters()}


# sync.transport -> the transport class (megatron_rl.config.TRANSPORTS lists the same names).
TRANSPORTS = {"p2p": TorchP2P}


def make_transport(transport, *, group=None, timeout: float = 60.0):
    """A transport by its ``sync.transport`` name, or ``transport`` itself when it is one already."""
    if not isinstance(transport, str):
        return transport
    if transport not in TRANSPORTS:
        raise WeightSyncError(f"weight sync: unknown transport {transport!r}; fix: set sync.transport to one of "
                              f"{', '.join(TRANSPORTS)}")
    return TRANSPORTS[transport](group=group, timeout=timeout)


class WeightSync:
    """Plan once, then move each Megatron shard straight into vLLM's shards on every ``sync()``."""

    def __init__(self, model_chunks, engine, *, src_layout: Layout, dst_layout: Layout, bucket_bytes: int = 64 << 20,
                 rank: Optional[int] = None, group=None, timeout: float = 60.0, dst_dtype: Optional[torch.dtype] = None,
                 verify: bool = False, transport="p2p", device=None, staging_bytes: Optional[int] = None):
        self.rank = dist.get_rank() if rank is None else rank
        self.engine = engine
        self.src = model_tensors(model_chunks) if model_chunks is not None else {}
        any_param = next(iter(self.src.values()), None)
        self.dst_dtype = dst_dtype or (any_param.dtype if any_param is not None else torch.float32)
        self.device = device or (any_param.device if any_param is not None else "cpu")
        self.verify_each_step = verify
        self.transport = make_transport(transport or "p2p", group=group, timeout=timeout)
        self.group = group
        self._check_source(src_layout)
        self._check_destination(dst_layout)
        elem = torch.empty((), dtype=self.dst_dtype).element_size()
        try:
            self.plan: Plan = make_plan(src_layout, dst=dst_layout, bucket_bytes=bucket_bytes, elem_size=elem,
                                        staging_bytes=staging_bytes)
        except LayoutError as e:
            raise WeightSyncError(f"weight sync: {e}") from e
        self.last_stats: Optional[Stats] = None
        self.last_seconds = 0.0

    # -- checks before any byte moves ----------------------------------------------------------

    def _check_source(self, lay: Layout) -> None:
        want = lay.local(self.rank)
        for name, lt in want.items():
            p = self.src.get(name)
            if p is None:
                raise WeightSyncError(f"weight sync: training parameter {name!r} (rank {self.rank}) is in the layout but "
                                      f"not in the model; fix: build the layout from the model's config "
                                      f"(model has e.g. {sorted(self.src)[:3]})")
            if tuple(p.shape) != tuple(lt.shape):
                raise WeightSyncError(f"weight sync: training parameter {name!r} has shape {tuple(p.shape)}, the layout "
                                      f"expects {lt.shape}; fix: the training model and the layout disagree")

    def _check_destination(self, lay: Layout) -> None:
        shapes = self.engine.shard_shapes() if hasattr(self.engine, "shard_shapes") else None
        if shapes is None:
            return
        want = lay.local(self.rank)
        for name, lt in want.items():
            if name not in shapes:
                raise WeightSyncError(f"weight sync: rollout parameter {name!r} is not in the vLLM model on rank "
                                      f"{self.rank}; fix: use the same architecture on both sides")
            if tuple(shapes[name]) != tuple(lt.shape):
                raise WeightSyncError(f"weight sync: rollout parameter {name!r} has shape {tuple(shapes[name])} on rank "
                                      f"{self.rank}, the plan expects {lt.shape}; fix: same model config on both sides")
        extra = sorted(set(shapes) - set(want))
        if extra:
            raise WeightSyncError(f"weight sync: vLLM parameter {extra[0]!r} is not produced by the plan; fix: use the "
                                  "same architecture (and tie_word_embeddings) on both sides")

    # -- the step ------------------------------------------------------------------------------

    def sync(self, *, verify: Optional[bool] = None) -> Stats:
        """Move every shard; all ranks call together. Returns this rank's transfer statistics."""
        do_verify = self.verify_each_step if verify is None else verify
        t0 = time.perf_counter()

        def get_src(name: str) -> torch.Tensor:
            return self.src[name]

        def deliver(name: str, shard: torch.Tensor) -> None:
            self.engine.load_shards([(name, shard)], donate=True)  # the executor drops its staging

        self.engine.begin_weight_update()
        # On failure we do NOT call end_weight_update(): it is collective in the engine and a
        # dead peer would turn our bounded error into a hang. The engine stays mid-update
        # (not exact) and the caller aborts or re-syncs.
        stats = run_plan(self.plan, self.rank, get_src=get_src, deliver=deliver, transport=self.transport,
                         dst_dtype=self.dst_dtype, device=self.device, checksums=do_verify)
        self.engine.end_weight_update()
        self.last_stats = stats
        self.last_seconds = time.perf_counter() - t0
        if do_verify:
            self.verify()
        return stats

    def verify(self) -> int:
        """Compare every op's source and destination checksums of the last (checksummed) sync.

        Returns the number of slices checked on this rank; raises WeightSyncError naming the
        first mismatching parameter. All ranks call together (one all-reduce).
        """
        st = self.last_stats
        if st is None or (not st.src_sums and not st.dst_sums and self.plan.num_ops):
            raise WeightSyncError("weight sync: verify() needs a checksummed sync; fix: call sync(verify=True) first")
        return verify_checksums(self.plan, st, rank=self.rank, group=self.group)
