"""Process groups and megatron-core's parallel state, built from one :class:`RankGrid` into one :class:`Topology`.

:func:`init_distributed` validates the layout *before* any process group exists, then
initialises torch.distributed (gloo on CPU, NCCL on CUDA), applies megatron's compatibility
patches (all of them when CUDA is absent, the sequence-parallel norm patch always), builds megatron-core's groups in the grid's order (tp-cp-ep-dp-pp)
with the configured timeout on every group, adds the gloo control-plane group over the world,
and seeds megatron's RNG tracker. It returns the :class:`Topology` (both grids, every group),
which callers pass on explicitly. Megatron's parallel state is module-global upstream; this
module is the only one in the package that reads it.

Usage (under torchrun)::

    from megatron_rl.config import ParallelConfig
    from megatron_rl.parallel import init_distributed, destroy_distributed

    topo = init_distributed(ParallelConfig(tp=2, pp=2), rollout_tp=2)
    topo.coord, topo.grid.dp, topo.rollout.replica
    ...
    destroy_distributed()
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from datetime import timedelta
from typing import Optional

import torch

from megatron_rl.compat import megatron_compat
from megatron_rl.parallel import collectives  # noqa: F401  (registers compat patch 13's padded collectives)
from megatron_rl.parallel.grid import LayoutError, RankGrid, TrainCoord
from megatron_rl.parallel.topology import RolloutGrid, Topology


__all__ = ["init_distributed", "destroy_distributed", "check_layout", "RankGrid", "TrainCoord", "LayoutError",
           "RolloutGrid", "Topology", "rollout_topology", "fake_rank"]


_OWNED: list = []  # the process groups init_distributed created, newest last
_CONTROL: list = []  # the control-plane group: one per world, it outlives layout rebuilds


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


def check_layout(parallel, *, world_size: int) -> RankGrid:
    """Validate ``parallel`` (a ParallelConfig) against the world. The model's rules (heads,
    layers, vocab against the degrees) are the layout builders', run by ``config.validate``.

    Pure: no process group. Raises :class:`LayoutError` naming the field and the fix.
    """
    if parallel.world_size is not None and parallel.world_size != world_size:
        raise LayoutError(f"parallel.world_size={parallel.world_size} but the launch has {world_size} ranks; "
                          f"fix: launch {parallel.world_size} processes or set parallel.world_size={world_size}")
    grid = RankGrid(world_size=world_size, tp=parallel.tp, pp=parallel.pp, cp=parallel.cp, ep=parallel.ep)
    if parallel.sequence_parallel and parallel.tp == 1:
        raise LayoutError("parallel.sequence_parallel needs parallel.tp > 1; fix: set tp >= 2 or disable it")
    return grid


def _backend(parallel) -> str:
    if parallel.backend != "auto":
        if parallel.backend == "nccl" and not torch.cuda.is_available():
            raise LayoutError("parallel.backend=nccl but CUDA is not available; fix: use parallel.backend=gloo or auto")
        return parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(parallel, *, world_size: Optional[int] = None, seed: int = 1234,
                     rollout_tp: int = 1) -> Topology:
    """Build torch.distributed and megatron-core's parallel state for ``parallel``; return the topology.

    ``rollout_tp`` (``rollout.tp``) lays out the rollout grid; it must divide the world.
    Idempotent for torch.distributed (an existing default group is reused). Megatron's
    parallel state must not already exist: call :func:`destroy_distributed` between layouts.
    """
    world_size, rank = _world_from_env(world_size)
    grid = check_layout(parallel, world_size=world_size)
    grid.check_rollout_tp(rollout_tp)
    backend = _backend(parallel)
    timeout = timedelta(seconds=parallel.timeout_s)

    from megatron.core import parallel_state, tensor_parallel  # lazy: keeps megatron out of CLI start-up
    # lazy: keeps vLLM/megatron out of CLI start-up
    from megatron.core.process_groups_config import ProcessGroupCollection

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

    megatron_compat.apply_for(cuda=torch.cuda.is_available())  # the SP norm patch is needed on GPU too
    before = set(_live_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp, expert_model_parallel_size=parallel.ep,
        distributed_timeout_minutes=parallel.timeout_s / 60.0, order="tp-cp-ep-dp-pp")
    _OWNED.extend(g for g in _live_groups() if g not in before)  # freed by destroy_distributed
    control = _control_group(timeout)
    topo = Topology.build(grid, rank=torch.distributed.get_rank(), rollout_tp=rollout_tp,
                          pg_collection=ProcessGroupCollection.use_mpu_process_groups(), control_group=control)
    _check_ranks(topo, parallel_state)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return topo


def _control_group(timeout: timedelta):
    """The gloo control-plane group over the whole world (collective on first use).

    It belongs to the world, not to a layout: a rollout engine keeps it while training
    layouts are torn down and rebuilt (``destroy_distributed(keep_process_group=True)``)."""
    if not _CONTROL or _CONTROL[0] not in _live_groups():
        _CONTROL[:] = [torch.distributed.new_group(backend="gloo", timeout=timeout)]
    return _CONTROL[0]


def rollout_topology(*, rollout_tp: int, timeout_s: float = 300.0) -> Topology:
    """The topology of a rollout-only world (torch.distributed up, no megatron groups): the
    world's grid, the rollout grid and the control group. Collective on first use."""
    grid = RankGrid(world_size=torch.distributed.get_world_size())
    topo = Topology.pure(grid, rank=torch.distributed.get_rank(), rollout_tp=rollout_tp)
    return dataclasses.replace(topo, control_group=_control_group(timedelta(seconds=timeout_s)))


def _check_ranks(topo: Topology, parallel_state) -> None:
    """Our topology and megatron's groups must agree on every coordinate of this rank."""
    c = topo.coord
    got = TrainCoord(tp=parallel_state.get_tensor_model_parallel_rank(),
                     cp=parallel_state.get_context_parallel_rank(),
                     dp=parallel_state.get_data_parallel_rank(),
                     pp=parallel_state.get_pipeline_model_parallel_rank(),
                     ep=parallel_state.get_expert_model_parallel_rank())
    if got != c:
        raise RuntimeError(f"rank grid {c} disagrees with megatron's parallel state {got}")
    pp = torch.distributed.get_process_group_ranks(topo.pp_group)
    stages = (parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage())
    if (pp != topo.pp_ranks or parallel_state.get_pipeline_model_parallel_last_rank() != topo.pp_last_rank
            or stages != (topo.is_first_stage, topo.is_last_stage)):
        raise RuntimeError(f"topology pipeline {topo.pp_ranks} disagrees with megatron's {pp}")


@contextlib.contextmanager
def fake_rank(parallel, *, world_size: int, rank: int, rollout_tp: int = 1):
    """Be rank ``rank`` of a ``world_size`` world inside this one process, for planning.

    torch's fake process-group backend (every collective a no-op, no other process) under
    megatron-core's own group construction: a model built inside the block (on the ``meta``
    device) has exactly the shard shapes that rank builds in the job. Yields the
    :class:`Topology`; tears everything down on exit. Refuses a live process group.
    """
    # lazy: keeps megatron out of CLI start-up; the import registers torch's "fake" backend
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection  # lazy: as above
    from torch.testing._internal.distributed.fake_pg import FakeStore  # lazy: as above

    if torch.distributed.is_initialized():
        raise RuntimeError("fake_rank needs a process without torch.distributed (it plans, it does not run)")
    grid = check_layout(parallel, world_size=world_size)
    grid.check_rollout_tp(rollout_tp)
    megatron_compat.apply_for(cuda=torch.cuda.is_available())
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
            context_parallel_size=parallel.cp, expert_model_parallel_size=parallel.ep, order="tp-cp-ep-dp-pp",
            create_gloo_process_groups=False)
        topo = Topology.build(grid, rank=rank, rollout_tp=rollout_tp,
                              pg_collection=ProcessGroupCollection.use_mpu_process_groups(), control_group=None)
        _check_ranks(topo, parallel_state)
        yield topo
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def destroy_distributed(*, keep_process_group: bool = False) -> None:
    """Tear down megatron's parallel state and (unless ``keep_process_group``) torch.distributed.

    ``keep_process_group=True`` lets one process build several layouts in turn.
    """
    from megatron.core import parallel_state  # lazy: keeps vLLM/megatron out of CLI start-up

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # megatron only drops its references: free the groups it built (each gloo group holds
    # threads and sockets; a process that builds many layouts would otherwise pile them up).
    while _OWNED:
        group = _OWNED.pop()
        if group in _live_groups():
            torch.distributed.destroy_process_group(group)
    if not keep_process_group and torch.distributed.is_initialized():
        if _CONTROL and _CONTROL[0] in _live_groups():
            torch.distributed.destroy_process_group(_CONTROL[0])
        _CONTROL.clear()
        torch.distributed.destroy_process_group()
