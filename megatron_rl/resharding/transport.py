"""Transports for the weight-sync executor: torch.distributed point-to-point, with timeouts.

A transport starts one bucket's sends and receives at once and later waits for them.
Every wait is bounded: a peer that died or stalled makes ``wait`` raise
:class:`WeightSyncError` naming that peer rank, within ``timeout`` seconds.

- :class:`TorchP2P`: ``batch_isend_irecv`` over a process group (gloo on CPU, NCCL on GPU;
  with NCCL every rank of the group must take part in the first batch).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass


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

    def __init__(self, *, group=None, timeout: float = 60.0):
        self.group = group
        self.timeout = float(timeout)

    def start(self, sends: list[Transfer], recvs: list[Transfer]):
        import torch.distributed as dist

        ops, meta = [], []
        for kind, items in ((dist.isend, sends), (dist.irecv, recvs)):
            for t in items:
                ops.append(dist.P2POp(kind, t.tensor, t.peer, group=self.group, tag=t.tag))
                meta.append(("send to" if kind is dist.isend else "receive from", t))
        works = dist.batch_isend_irecv(ops) if ops else []
        return list(zip(works, meta))

    def wait(self, handle) -> None:
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
