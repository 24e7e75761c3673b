"""Patch 13 of ``megatron_compat`` (CPU): megatron-core's uneven gathers over gloo.

With MoE at ``parallel.tp > 1`` the all-to-all token dispatcher gathers each TP rank's routed
tokens along the first dimension with ``output_split_sizes`` (the ranks route different token
counts), and scatters the gradients back with ``input_split_sizes``. megatron-core does this
with list collectives (``all_gather`` into uneven views, ``reduce_scatter`` of a list), which
NCCL runs and gloo refuses ("ProcessGroupGloo::allgather: invalid tensor size"). Here both go
through equal-size collectives instead: each rank's rows are padded to the largest count,
gathered (or reduce-scattered) as one flat tensor, and trimmed. Values are the same; only
the padding moves. Equal splits and single-rank groups take megatron-core's own path. The
padded collectives are :func:`megatron_rl.parallel.collectives.gather_uneven` and
``reduce_scatter_uneven`` (registered here when that module is imported).
"""
from __future__ import annotations

import importlib

_MARK = "_megatron_rl_uneven"


_IMPL: dict = {}  # "gather", "reduce_scatter": set by megatron_rl.parallel.collectives at import


def register(*, gather, reduce_scatter) -> None:
    """The equal-size implementations (they live with the other collectives, which check every
    tensor's device; compat cannot import them without an import cycle through the parallel package)."""
    _IMPL.update(gather=gather, reduce_scatter=reduce_scatter)


def _impl(name: str):
    if name not in _IMPL:
        raise RuntimeError("megatron_uneven: no collectives registered; fix: import megatron_rl.parallel.collectives "
                           "before running megatron-core (init_distributed does)")
    return _IMPL[name]


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
        return _impl("gather")(input_.contiguous(), list(output_split_sizes), group=group)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or len(set(input_split_sizes)) == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        return _impl("reduce_scatter")(input_.contiguous(), list(input_split_sizes), group=group)

    _gather_along_first_dim.__wrapped__, _reduce_scatter_along_first_dim.__wrapped__ = gather, scatter
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
    setattr(mappings, _MARK, True)
    return True
