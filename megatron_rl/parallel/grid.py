"""The rank grid: one pure description of where every rank sits, for both frameworks.

Training (megatron-core) lays ranks out in its default order ``tp-cp-ep-dp-pp`` (tp
fastest): ``rank = tp + TP*(cp + CP*(dp + DP*pp))`` for the dense part (megatron's decoder
grid has ep = 1). An MoE model's experts live on megatron's second, expert grid over the same
ranks: expert TP = TP, no CP, ``rank = tp + TP*(ep + EP*(edp + EDP*pp))``; so EP takes its
ranks from CP x DP, and expert parameters are replicated only over the expert-DP ``edp``. Rollout (vLLM with
``external_launcher``) lays ranks out as ``replica x tp`` (tp fastest): ``rank = r*t_v + tp``.
Nothing here touches a process group, so the layout algebra and the planner can use it.

Usage::

    grid = RankGrid(world_size=4, tp=2, pp=2)
    grid.coords(3)            # TrainCoord(tp=1, cp=0, dp=0, pp=1, ep=0)
    grid.rollout_coords(3, rollout_tp=2)   # (replica=1, tp=1)
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.errors import LayoutError

__all__ = ["LayoutError", "RankGrid", "TrainCoord"]  # LayoutError lives in megatron_rl.errors


@dataclass(frozen=True)
class TrainCoord:
    tp: int
    cp: int
    dp: int
    pp: int
    ep: int = 0  # expert-parallel rank (megatron's expert grid); 0 without EP


@dataclass(frozen=True)
class RankGrid:
    """Training degrees over a world; ``dp`` is derived. Validates on construction."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in ("world_size", "tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        mp = self.tp * self.pp * self.cp
        if self.world_size % mp:
            degrees = f"tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = {mp}"
            raise LayoutError(
                f"parallel.{degrees} does not divide the world size {self.world_size}; fix: choose degrees whose "
                "product divides the number of launched ranks", field="parallel.tp/pp/cp",
                problem=f"{degrees} does not divide world size {self.world_size}",
                fix="choose degrees whose product divides the world size")
        if (self.cp * self.dp) % self.ep:
            raise LayoutError.of("parallel.ep", f"{self.ep} does not divide the {self.cp * self.dp} ranks of each "
                                 f"tensor/pipeline shard (world {self.world_size} / tp*pp {self.tp * self.pp})",
                                 "choose a parallel.ep that divides world_size / (tp*pp)")

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert shard: the world over expert TP (= TP) x EP x PP."""
        return self.world_size // (self.tp * self.ep * self.pp)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    def coords(self, rank: int) -> TrainCoord:
        tp = rank % self.tp
        cp = (rank // self.tp) % self.cp
        dp = (rank // (self.tp * self.cp)) % self.dp
        pp = rank // (self.tp * self.cp * self.dp)
        ep = (rank // self.tp) % self.ep  # the expert grid (see the module docstring)
        return TrainCoord(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep)

    def rank(self, *, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def ranks_with(self, *, tp: int, pp: int) -> list[int]:
        """All ranks holding the same (tp, pp) weight shard: the DP x CP replicas of it."""
        return [self.rank(tp=tp, cp=c, dp=d, pp=pp) for d in range(self.dp) for c in range(self.cp)]

    # -- rollout side ---------------------------------------------------------------------------

    def check_rollout_tp(self, rollout_tp: int) -> None:
        """The one rule for rollout.tp and the world: replicas of ``rollout_tp`` ranks fill it."""
        if rollout_tp < 1 or self.world_size % rollout_tp:
            raise LayoutError.of("rollout.tp", f"{rollout_tp} does not divide world size {self.world_size}",
                                 "choose a rollout.tp that divides the world size (replicas fill the rest)")

    def rollout_coords(self, rank: int, *, rollout_tp: int) -> tuple[int, int]:
        """(replica, tp_rank) of ``rank`` in vLLM's external-launcher layout."""
        self.check_rollout_tp(rollout_tp)
        return rank // rollout_tp, rank % rollout_tp

    def rollout_ranks(self, replica: int, *, rollout_tp: int) -> list[int]:
        return [replica * rollout_tp + t for t in range(rollout_tp)]
