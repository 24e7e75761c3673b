"""Shapes: the job's own model, built on the ``meta`` device for every distinct rank position.

Each (tp, pp) position of the training grid (EP is 1: no MoE architecture is supported) is
built once with :func:`megatron_rl.models.build_gpt`, inside
:func:`megatron_rl.parallel.fake_rank` (this process pretends to be that rank of the real
world, so megatron-core builds the real shard shapes and no memory is allocated). The built
parameters are checked against the layout algebra's prediction
(:func:`megatron_rl.resharding.layout.megatron_rank_tensors`)::

    ranks = build_shapes(cfg, hf_config, world_size=64)
    ranks[0].numel, ranks[0].bytes, ranks[0].mismatches      # () when model and algebra agree
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_rl.models.shape import ModelShape
from megatron_rl.parallel.grid import RankGrid
from megatron_rl.resharding.layout import megatron_rank_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class RankShapes:
    """One training rank position's parameters, as the job builds them."""

    tp: int
    pp: int
    shapes: dict  # parameter name -> shape
    elem_bytes: int
    mismatches: tuple  # "name: built X, layout Y" lines (empty when the two agree)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def bytes(self) -> int:
        return self.numel * self.elem_bytes

    @property
    def label(self) -> str:
        return f"tp{self.tp}/pp{self.pp}"


def _built_shapes(cfg, hf_config, *, grid: RankGrid, tp: int, pp: int) -> dict:
    # lazy: keeps megatron out of CLI start-up
    from megatron_rl.models import build_gpt
    from megatron_rl.parallel import fake_rank  # lazy: as above

    rank = grid.rank(tp=tp, pp=pp)
    with fake_rank(cfg.parallel, world_size=grid.world_size, rank=rank, rollout_tp=cfg.rollout.tp) as topo:
        with torch.device("meta"):
            chunks = build_gpt(hf_config, parallel=cfg.parallel, topo=topo, dtype=DTYPES[cfg.model.dtype],
                               vocab_divisible_by=cfg.model.make_vocab_size_divisible_by,
                               recompute=cfg.train.recompute, backend="local")
        return {n: tuple(p.shape) for c in chunks for n, p in c.named_parameters()}


def _mismatches(built: dict, predicted: dict) -> tuple:
    out = [f"{n}: built {built.get(n)}, layout {lt.shape if lt else None}"
           for n, lt in ((n, predicted.get(n)) for n in sorted(set(built) | set(predicted)))
           if lt is None or built.get(n) != tuple(lt.shape)]
    return tuple(out)


def build_shapes(cfg, hf_config, *, world_size: int) -> list[RankShapes]:
    """Every distinct (tp, pp) position's parameters (DP and CP replicas hold the same)."""
    shape = ModelShape.from_hf_config(hf_config)
    p = cfg.parallel
    grid = RankGrid(world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp)
    out = []
    for pp in range(p.pp):
        for tp in range(p.tp):
            built = _built_shapes(cfg, hf_config, grid=grid, tp=tp, pp=pp)
            predicted = megatron_rank_tensors(shape, tp=p.tp, pp=p.pp, tp_rank=tp, pp_rank=pp,
                                              vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
            out.append(RankShapes(tp=tp, pp=pp, shapes=built, elem_bytes=DTYPE_BYTES[cfg.model.dtype],
                                  mismatches=_mismatches(built, predicted)))
    return out
