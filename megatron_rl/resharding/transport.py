"""Transports for the weight-sync executor: torch.distributed point-to-point, with timeouts.

A transport starts one bucket's sends and receives at once and later waits for them.
Every wait is bounded: a peer that died or stalled makes ``wait`` raise
:class:`WeightSyncError` naming that peer rank, within ``timeout`` seconds.

- :class:`TorchP2P`: ``batch_isend_irecv`` over a process group (gloo on CPU, NCCL on GPU;
  with NCCL every rank of the group must take part in the first batch). Over gloo each message
  is its own TCP send with a fixed cost, so a bucket's transfers to (and from) one peer are
  coalesced into one flat message: both sides list them in plan order, so the receiver knows
  every slice's offset. NCCL already fuses a batch into one group launch and sends them as is.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rl.parallel import collectives as coll


class WeightSyncError(RuntimeError):
    """A weight sync failed; the message names the parameter or the peer rank."""


@dataclass
class Transfer:
    """One point-to-point message: ``tensor`` is sent to / received from ``peer`` (global rank)."""

    peer: int
    tensor: object
    tag: int
    what: str  # the parameter it carries, for error messages


class TorchP2P:
    """Batched isend/irecv over ``group`` (default: the world), every wait bounded by ``timeout`` s."""

    def __init__(self, *, group=None, timeout: float = 60.0, coalesce: Optional[bool] = None):
        self.group = group
        self.timeout = float(timeout)
        self.coalesce = coalesce  # None: coalesce over gloo only (decided at the first start)
        self.buffer_bytes = 0  # bytes of coalescing buffers held by the bucket in flight

    def start(self, sends: list[Transfer], recvs: list[Transfer]):
        if self.coalesce is None:
            self.coalesce = dist.get_backend(self.group) == "gloo"
        unpack = []
        if self.coalesce:
            out = [_coalesce(items, fill=True) for items in _by_peer(sends)]
            sends, packed = [t for t, _ in out], [u for _, u in out if u is not None]
            out = [_coalesce(items, fill=False) for items in _by_peer(recvs)]
            recvs, unpack = [t for t, _ in out], [u for _, u in out if u is not None]
            self.buffer_bytes = sum(f.numel() * f.element_size() for f, _ in packed + unpack)
        works = coll.batch_p2p([(t.tensor, t.peer, t.tag) for t in sends], [(t.tensor, t.peer, t.tag) for t in recvs],
                               group=self.group)
        meta = [("send to", t) for t in sends] + [("receive from", t) for t in recvs]
        return list(zip(works, meta)), unpack

    def wait(self, handle) -> None:
        handle, unpack = handle
        self._wait(handle)
        for flat, parts in unpack:  # scatter each coalesced message into its receive tensors
            for t, off in parts:
                t.tensor.view(-1).copy_(flat[off:off + t.tensor.numel()])

    def _wait(self, handle) -> None:
        timeout = datetime.timedelta(seconds=self.timeout)
        for work, (verb, t) in handle:
            try:
                ok = work.wait(timeout)
            except Exception as e:  # gloo raises on timeout or a closed connection
                raise WeightSyncError(f"weight sync: {verb} peer rank {t.peer} failed ({t.what}) within "
                                      f"{self.timeout:.0f}s timeout: {str(e).splitlines()[0][:200]}") from e
            if ok is False:
                raise WeightSyncError(f"weight sync: {verb} peer rank {t.peer} timed out after {self.timeout:.0f}s "
                                      f"({t.what})")


def _by_peer(items: list[Transfer]) -> list[list[Transfer]]:
    """Transfers grouped by (peer, dtype), each group in its original (plan) order."""
    groups: dict = {}
    for t in items:
        groups.setdefault((t.peer, t.tensor.dtype), []).append(t)
    return list(groups.values())


def _coalesce(items: list[Transfer], *, fill: bool):
    """One flat Transfer for ``items`` (same peer and dtype) and ``(flat, [(transfer, offset)])``
    (None when a single contiguous item is sent as is), which scatters a received message
    back. ``fill`` copies the items in (sends)."""

    if len(items) == 1 and items[0].tensor.is_contiguous():
        return items[0], None
    first = items[0].tensor
    flat = torch.empty(sum(t.tensor.numel() for t in items), dtype=first.dtype, device=first.device)
    parts, off = [], 0
    for t in items:
        n = t.tensor.numel()
        if fill:
            flat[off:off + n].view(t.tensor.shape).copy_(t.tensor)
        parts.append((t, off))
        off += n
    names = ", ".join(t.what for t in items[:2]) + (f" and {len(items) - 2} more" if len(items) > 2 else "")
    return Transfer(items[0].peer, flat, items[0].tag, names), (flat, parts)
