"""The topology: where this rank sits in training and in rollout, and every process group.

:func:`megatron_rl.parallel.init_distributed` builds one :class:`Topology` right after
megatron-core's groups exist and returns it; everything downstream takes it explicitly (the
train engine, the reducers, the rollout engine, the model builder). Nothing else in the
package asks megatron's ``parallel_state`` where a rank is.

* training: the :class:`RankGrid` and this rank's :class:`TrainCoord`;
* rollout: :class:`RolloutGrid` (``replicas x rollout_tp``, tp fastest), whose ranks come
  from :meth:`RankGrid.rollout_coords` / :meth:`RankGrid.rollout_ranks` (the one place the
  formula lives);
* groups: tp, cp, dp, dp x cp, pp, embedding, position embedding (megatron's, also as the
  ``ProcessGroupCollection`` megatron-core takes as ``pg_collection``), and the control
  plane: one gloo group over the whole world, for the rollout engine's object collectives.

Inside megatron-core callbacks (a schedule's ``forward_fn``, ``core_attention``) the groups
come from the model's own ``pg_collection`` (:func:`model_groups`), which is this topology's.
A model's weight shard (:class:`ShardCoord`: tp and pp, degree and rank) comes from
:attr:`Topology.shard`, or from the model's own groups (:func:`model_shard`).

Usage::

    topo = init_distributed(cfg.parallel, rollout_tp=cfg.rollout.tp)
    topo.coord.dp, topo.grid.dp          # this rank's data-parallel rank, the DP degree
    topo.rollout.replica, topo.rollout.tp_rank
    if topo.is_last_stage: ...
    Topology.pure(RankGrid(world_size=8, tp=2, pp=2), rank=5, rollout_tp=4)   # no groups (tests)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_rl.parallel.grid import RankGrid, TrainCoord


@dataclass(frozen=True)
class RolloutGrid:
    """vLLM's external-launcher layout over the world: ``replicas`` replicas of ``tp`` ranks."""

    tp: int
    replicas: int
    replica: int  # this rank's replica
    tp_rank: int  # this rank's tp rank inside its replica
    replica_ranks: tuple  # (replicas,) tuples of tp global ranks, in tp order

    @classmethod
    def of(cls, grid: RankGrid, *, rank: int, rollout_tp: int) -> "RolloutGrid":
        replica, tp_rank = grid.rollout_coords(rank, rollout_tp=rollout_tp)  # validates rollout_tp
        replicas = grid.world_size // rollout_tp
        ranks = tuple(tuple(grid.rollout_ranks(r, rollout_tp=rollout_tp)) for r in range(replicas))
        return cls(tp=rollout_tp, replicas=replicas, replica=replica, tp_rank=tp_rank, replica_ranks=ranks)

    @property
    def leaders(self) -> list[int]:
        """The tp-rank-0 rank of every replica, in replica order."""
        return [ranks[0] for ranks in self.replica_ranks]


@dataclass(frozen=True)
class ShardCoord:
    """Which weight shard a rank holds: its tp, pp (and, for experts, ep) ranks and the degrees."""

    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    ep: int = 1
    ep_rank: int = 0


@dataclass(frozen=True)
class Topology:
    """This rank's place in both grids and its process groups (None in :meth:`pure` topologies)."""

    grid: RankGrid
    rank: int
    rollout: RolloutGrid
    tp_group: Any = None
    cp_group: Any = None
    dp_group: Any = None
    dp_cp_group: Any = None
    pp_group: Any = None
    embd_group: Any = None
    pos_embd_group: Any = None
    control_group: Any = None  # gloo, whole world: the rollout engine's control plane
    pg_collection: Any = None  # megatron-core's ProcessGroupCollection of the groups above

    @classmethod
    def pure(cls, grid: RankGrid, *, rank: int, rollout_tp: int = 1) -> "Topology":
        """The coordinates alone (no process group): for planning and tests."""
        return cls(grid=grid, rank=rank, rollout=RolloutGrid.of(grid, rank=rank, rollout_tp=rollout_tp))

    @classmethod
    def build(cls, grid: RankGrid, *, rank: int, rollout_tp: int, pg_collection, control_group) -> "Topology":
        """The topology over megatron-core's groups (``pg_collection``) and the control group."""
        pg = pg_collection
        return cls(grid=grid, rank=rank, rollout=RolloutGrid.of(grid, rank=rank, rollout_tp=rollout_tp),
                   tp_group=pg.tp, cp_group=pg.cp, dp_group=pg.dp, dp_cp_group=pg.dp_cp, pp_group=pg.pp,
                   embd_group=getattr(pg, "embd", None), pos_embd_group=getattr(pg, "pos_embd", None),
                   control_group=control_group, pg_collection=pg)

    @property
    def coord(self) -> TrainCoord:
        return self.grid.coords(self.rank)

    @property
    def shard(self) -> ShardCoord:
        c = self.coord
        return ShardCoord(tp=self.grid.tp, tp_rank=c.tp, pp=self.grid.pp, pp_rank=c.pp, ep=self.grid.ep, ep_rank=c.ep)

    @property
    def world_size(self) -> int:
        return self.grid.world_size

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp == self.grid.pp - 1

    @property
    def pp_last_rank(self) -> int:
        """Global rank of the last pipeline stage in this rank's pipeline."""
        c = self.coord
        return self.grid.rank(tp=c.tp, cp=c.cp, dp=c.dp, pp=self.grid.pp - 1)

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline, stage order."""
        c = self.coord
        return [self.grid.rank(tp=c.tp, cp=c.cp, dp=c.dp, pp=p) for p in range(self.grid.pp)]


def model_groups(model):
    """The ``ProcessGroupCollection`` a (DDP- or Float16-wrapped) megatron model was built with."""
    while hasattr(model, "module"):
        model = model.module
    return model.pg_collection


def model_shard(model) -> ShardCoord:
    """The weight shard of a megatron model, from the tp and pp groups it was built with."""
    pg = model_groups(model)
    ep = getattr(pg, "ep", None)
    return ShardCoord(tp=group_size(pg.tp), tp_rank=group_rank(pg.tp), pp=group_size(pg.pp), pp_rank=group_rank(pg.pp),
                      ep=group_size(ep), ep_rank=group_rank(ep))


def group_rank(group: Optional[Any]) -> int:
    """This rank's rank in ``group`` (0 for no group or a group of one)."""
    return group.rank() if group is not None and group.size() > 1 else 0


def group_size(group: Optional[Any]) -> int:
    return group.size() if group is not None else 1


__all__ = ["RolloutGrid", "ShardCoord", "Topology", "model_groups", "model_shard", "group_rank", "group_size"]
