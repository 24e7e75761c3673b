"""Process groups and megatron-core's parallel state, built from one :class:`RankGrid`.

:func:`init_distributed` validates the layout *before* any process group exists, then
initialises torch.distributed (gloo on CPU, NCCL on CUDA), applies megatron's compatibility
patches (all of them when CUDA is absent, the sequence-parallel norm patch always), builds megatron-core's groups in the grid's order (tp-cp-ep-dp-pp)
with the configured timeout on every group, and seeds megatron's RNG tracker. Megatron's
parallel state is module-global upstream; this module is the only one that touches it.

Usage (under torchrun)::

    from megatron_rl.config import ParallelConfig
    from megatron_rl.parallel import init_distributed, destroy_distributed

    grid = init_distributed(ParallelConfig(tp=2, pp=2))
    coords = grid.coords(torch.distributed.get_rank())
    ...
    destroy_distributed()
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch

from megatron_rl.parallel.grid import LayoutError, RankGrid, TrainCoord

__all__ = ["init_distributed", "destroy_distributed", "check_layout", "RankGrid", "TrainCoord", "LayoutError"]


_OWNED: list = []  # the process groups init_distributed created, newest last


def _live_groups() -> list:
    """Every process group torch.distributed currently holds (the default one included)."""
    if not torch.distributed.is_initialized():
        return []
    return list(torch.distributed.distributed_c10d._world.pg_map)


def _world_from_env(world_size: Optional[int]) -> tuple[int, int]:
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world_size, rank


def check_layout(parallel, *, world_size: int, hf_config=None) -> RankGrid:
    """Validate ``parallel`` (a ParallelConfig) against the world and, optionally, the model.

    Pure: no process group. Raises :class:`LayoutError` naming the field and the fix.
    """
    if parallel.world_size is not None and parallel.world_size != world_size:
        raise LayoutError(f"parallel.world_size={parallel.world_size} but the launch has {world_size} ranks; "
                          f"fix: launch {parallel.world_size} processes or set parallel.world_size={world_size}")
    grid = RankGrid(world_size=world_size, tp=parallel.tp, pp=parallel.pp, cp=parallel.cp)
    if parallel.sequence_parallel and parallel.tp == 1:
        raise LayoutError("parallel.sequence_parallel needs parallel.tp > 1; fix: set tp >= 2 or disable it")
    if hf_config is not None:
        from megatron_rl.resharding.layout import ModelShape, megatron_rank_tensors

        shape = ModelShape.from_hf_config(hf_config)
        megatron_rank_tensors(shape, tp=parallel.tp, pp=parallel.pp, tp_rank=0, pp_rank=0)  # raises on bad tp/pp
    return grid


def _backend(parallel) -> str:
    if parallel.backend != "auto":
        if parallel.backend == "nccl" and not torch.cuda.is_available():
            raise LayoutError("parallel.backend=nccl but CUDA is not available; fix: use parallel.backend=gloo or auto")
        return parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(parallel, *, world_size: Optional[int] = None, hf_config=None, seed: int = 1234) -> RankGrid:
    """Build torch.distributed and megatron-core's parallel state for ``parallel``.

    Idempotent for torch.distributed (an existing default group is reused). Megatron's
    parallel state must not already exist: call :func:`destroy_distributed` between layouts.
    """
    world_size, rank = _world_from_env(world_size)
    grid = check_layout(parallel, world_size=world_size, hf_config=hf_config)
    backend = _backend(parallel)
    timeout = timedelta(seconds=parallel.timeout_s)

    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is already initialised; call destroy_distributed() first")
    if not torch.distributed.is_initialized():
        kw = {}
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            # Eager NCCL init: with a bound device every communicator (and every new_group's)
            # connects at creation, so a first collective that some ranks skip (a sync bucket
            # with no ops on them) cannot wait on a lazy init that never comes.
            kw["device_id"] = device
        torch.distributed.init_process_group(backend=backend, timeout=timeout, world_size=world_size, rank=rank, **kw)
    elif torch.distributed.get_world_size() != world_size:
        raise LayoutError(f"torch.distributed already has world size {torch.distributed.get_world_size()}, "
                          f"not {world_size}; fix: pass world_size={torch.distributed.get_world_size()}")
    from megatron_rl.compat import megatron_compat  # lazy: keeps megatron out of CLI start-up

    megatron_compat.apply_for(cuda=torch.cuda.is_available())  # the SP norm patch is needed on GPU too
    before = set(_live_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp, distributed_timeout_minutes=parallel.timeout_s / 60.0,
        order="tp-cp-ep-dp-pp")
    _OWNED.extend(g for g in _live_groups() if g not in before)  # freed by destroy_distributed
    _check_ranks(grid, parallel_state)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return grid


def _check_ranks(grid: RankGrid, parallel_state) -> None:
    """Our grid and megatron's groups must agree on every coordinate of this rank."""
    c = grid.coords(torch.distributed.get_rank())
    got = TrainCoord(tp=parallel_state.get_tensor_model_parallel_rank(),
                     cp=parallel_state.get_context_parallel_rank(),
                     dp=parallel_state.get_data_parallel_rank(),
                     pp=parallel_state.get_pipeline_model_parallel_rank())
    if got != c:
        raise RuntimeError(f"rank grid {c} disagrees with megatron's parallel state {got}")


def destroy_distributed(*, keep_process_group: bool = False) -> None:
    """Tear down megatron's parallel state and (unless ``keep_process_group``) torch.distributed.

    ``keep_process_group=True`` lets one process build several layouts in turn.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # megatron only drops its references: free the groups it built (each gloo group holds
    # threads and sockets; a process that builds many layouts would otherwise pile them up).
    while _OWNED:
        group = _OWNED.pop()
        if group in _live_groups():
            torch.distributed.destroy_process_group(group)
    if not keep_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
