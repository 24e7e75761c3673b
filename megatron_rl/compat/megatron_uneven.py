"""Patch 13 of ``megatron_compat`` (CPU): megatron-core's uneven gathers over gloo.

With MoE at ``parallel.tp > 1`` the all-to-all token dispatcher gathers each TP rank's routed
tokens along the first dimension with ``output_split_sizes`` (the ranks route different token
counts), and scatters the gradients back with ``input_split_sizes``. megatron-core does this
with list collectives (``all_gather`` into uneven views, ``reduce_scatter`` of a list), which
NCCL runs and gloo refuses ("ProcessGroupGloo::allgather: invalid tensor size"). Here both go
through equal-size collectives instead: each rank's rows are padded to the largest count,
gathered (or reduce-scattered) as one flat tensor, and trimmed. Values are the same; only
the padding moves. Equal splits and single-rank groups take megatron-core's own path.
"""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

_MARK = "_megatron_rl_uneven"


def gather_uneven(x: torch.Tensor, sizes: list, *, group) -> torch.Tensor:
    """Rows of every rank (``sizes[r]`` of rank r), concatenated in rank order: (sum(sizes), ...)."""
    world, pad = len(sizes), max(sizes)
    padded = x.new_zeros((pad, *x.shape[1:]))
    padded[:x.shape[0]] = x
    out = x.new_empty((pad * world, *x.shape[1:]))
    dist.all_gather_into_tensor(out, padded, group=group)
    return torch.cat([out[r * pad:r * pad + n] for r, n in enumerate(sizes)])


def reduce_scatter_uneven(x: torch.Tensor, sizes: list, *, group) -> torch.Tensor:
    """The sum over ranks of rows ``[sum(sizes[:r]), sum(sizes[:r+1]))`` of ``x``, on rank r."""
    world, pad = len(sizes), max(sizes)
    padded = x.new_zeros((pad * world, *x.shape[1:]))
    for r, chunk in enumerate(torch.split(x, sizes, dim=0)):
        padded[r * pad:r * pad + chunk.shape[0]] = chunk
    out = x.new_empty((pad, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, padded, group=group)
    return out[:sizes[dist.get_rank(group)]].clone()


def apply() -> bool:
    """Route megatron-core's uneven first-dimension gathers through :func:`gather_uneven` and
    :func:`reduce_scatter_uneven`. Idempotent; returns True if applied now."""
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    if getattr(mappings, _MARK, False):
        return False
    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or len(set(output_split_sizes)) == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        return gather_uneven(input_.contiguous(), list(output_split_sizes), group=group)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or len(set(input_split_sizes)) == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        return reduce_scatter_uneven(input_.contiguous(), list(input_split_sizes), group=group)

    _gather_along_first_dim.__wrapped__, _reduce_scatter_along_first_dim.__wrapped__ = gather, scatter
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
    setattr(mappings, _MARK, True)
    return True
