"""The one place that calls ``torch.distributed`` collectives.

The rule: every tensor handed to a collective lives on the device of its group's backend
(NCCL: the current CUDA device; gloo: the host). NCCL rejects host tensors, and gloo groups
here carry host tensors only. Package code creates such tensors with :func:`zeros` /
:func:`tensor` (which place them on the group's device) and calls the wrappers below, which
check the device before the call and name the group and the fix when it is wrong. A test
(``tests/test_collectives.py``) scans the package and fails if any other module calls a
``torch.distributed`` collective.

Usage::

    from megatron_rl.parallel import collectives as coll

    acc = coll.zeros(2, dtype=torch.float64, group=dp_group)   # on the group's device
    coll.all_reduce(acc, group=dp_group)
    loss_sum, tokens = acc.tolist()
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megatron_rl.compat import megatron_uneven

__all__ = ["backend_device", "device_for_backend", "check_on_device", "CollectiveDeviceError", "zeros", "tensor",
           "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "all_gather_object", "broadcast_object", "barrier", "batch_p2p", "isend", "irecv", "sum_max", "gather_flags",
           "gather_uneven", "reduce_scatter_uneven"]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class CollectiveDeviceError(RuntimeError):
    """A tensor handed to a collective is not on its group's device."""


def device_for_backend(backend: str) -> torch.device:
    """NCCL groups carry tensors on the current CUDA device; every other backend on the host."""
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_device(group=None) -> torch.device:
    """The device that tensors handed to ``group`` (None: the default group) must live on."""
    return device_for_backend(dist.get_backend(group))


def check_on_device(t: torch.Tensor, group=None, *, what: str = "collective") -> None:
    want = backend_device(group)
    if t.device.type != want.type:
        raise CollectiveDeviceError(
            f"{what}: tensor on {t.device} but group backend {dist.get_backend(group)} needs {want.type}; "
            "fix: create it with megatron_rl.parallel.collectives.zeros/tensor(group=...) or move it there")


def zeros(*shape: int, dtype=torch.float32, group=None) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=backend_device(group))


def tensor(data, *, dtype=None, group=None) -> torch.Tensor:
    return torch.tensor(data, dtype=dtype, device=backend_device(group))


def all_reduce(t: torch.Tensor, *, op: str = "sum", group=None) -> torch.Tensor:
    check_on_device(t, group, what="all_reduce")
    dist.all_reduce(t, op=_OPS[op], group=group)
    return t


def broadcast(t: torch.Tensor, *, src: int, group=None) -> torch.Tensor:
    """``src`` is a global rank, as in torch.distributed."""
    check_on_device(t, group, what="broadcast")
    dist.broadcast(t, src=src, group=group)
    return t


def all_gather(t: torch.Tensor, *, group=None) -> list:
    """Every rank's copy of ``t`` (same shape and dtype on every rank), in group-rank order."""
    check_on_device(t, group, what="all_gather")
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def all_gather_into_tensor(out: torch.Tensor, x: torch.Tensor, *, group=None) -> torch.Tensor:
    check_on_device(x, group, what="all_gather_into_tensor")
    check_on_device(out, group, what="all_gather_into_tensor")
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def reduce_scatter_tensor(out: torch.Tensor, x: torch.Tensor, *, group=None) -> torch.Tensor:
    check_on_device(x, group, what="reduce_scatter_tensor")
    check_on_device(out, group, what="reduce_scatter_tensor")
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


def all_gather_object(obj, *, group=None) -> list:
    """Picklable objects from every rank of ``group`` (torch stages them on the right device)."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, *, src: int = 0, group=None):
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group=None) -> None:
    dist.barrier(group=group)


def batch_p2p(sends: Sequence[tuple], recvs: Sequence[tuple], *, group=None) -> list:
    """Post ``(tensor, peer, tag)`` sends and receives as one batch; returns the works to wait on."""
    ops = []
    for fn, items in ((dist.isend, sends), (dist.irecv, recvs)):
        for t, peer, tag in items:
            check_on_device(t, group, what="batch_isend_irecv")
            ops.append(dist.P2POp(fn, t, peer, group=group, tag=tag))
    return dist.batch_isend_irecv(ops) if ops else []


def isend(t: torch.Tensor, *, dst: int, group=None):
    check_on_device(t, group, what="isend")
    return dist.isend(t, dst, group=group)


def irecv(t: torch.Tensor, *, src: int, group=None):
    check_on_device(t, group, what="irecv")
    return dist.irecv(t, src, group=group)


def sum_max(sums: Sequence[float], maxes: Sequence[float], *, group=None) -> tuple[list, list]:
    """Global sums and maxima of two short float lists, on every rank (created on the group's device)."""
    s = tensor(list(sums), dtype=torch.float64, group=group)
    m = tensor(list(maxes), dtype=torch.float64, group=group)
    if len(s):
        all_reduce(s, group=group)
    if len(m):
        all_reduce(m, op="max", group=group)
    return s.tolist(), m.tolist()


def gather_flags(flag: bool, *, group=None) -> list:
    """One int per rank of ``group``: cheap agreement checks (errors travel separately)."""
    return [int(f) for f in all_gather(tensor([1 if flag else 0], dtype=torch.int64, group=group), group=group)]


def gather_uneven(x: torch.Tensor, sizes: list, *, group) -> torch.Tensor:
    """Rows of every rank (``sizes[r]`` of rank r), concatenated in rank order: (sum(sizes), ...)."""
    world, pad = len(sizes), max(sizes)
    padded = x.new_zeros((pad, *x.shape[1:]))
    padded[:x.shape[0]] = x
    out = x.new_empty((pad * world, *x.shape[1:]))
    all_gather_into_tensor(out, padded, group=group)
    return torch.cat([out[r * pad:r * pad + n] for r, n in enumerate(sizes)])


def reduce_scatter_uneven(x: torch.Tensor, sizes: list, *, group) -> torch.Tensor:
    """The sum over ranks of rows ``[sum(sizes[:r]), sum(sizes[:r+1]))`` of ``x``, on rank r."""
    world, pad = len(sizes), max(sizes)
    padded = x.new_zeros((pad * world, *x.shape[1:]))
    for r, chunk in enumerate(torch.split(x, sizes, dim=0)):
        padded[r * pad:r * pad + chunk.shape[0]] = chunk
    out = x.new_empty((pad, *x.shape[1:]))
    reduce_scatter_tensor(out, padded, group=group)
    return out[:sizes[dist.get_rank(group)]].clone()


megatron_uneven.register(gather=gather_uneven, reduce_scatter=reduce_scatter_uneven)  # compat patch 13's collectives
