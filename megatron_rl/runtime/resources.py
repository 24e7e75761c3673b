"""Per-rank resource samples in the trainer's step metrics, for leak hunting over long runs.

With ``MEGATRON_RL_SAMPLE_RESOURCES=1`` in the environment, every step the trainer adds what each
rank holds (:func:`megatron_rl.metrics.resource_usage`: RSS, open fds, threads, /dev/shm
segments), gathered to every rank, as ``res/<name>/rank<r>`` keys; without it, nothing (no
collective, no key). ``benchmarks/leaks.py`` sets it and reads the keys back::

    metrics = {..., **resource_metrics()}   # collective when enabled: every rank calls it
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_rl.metrics import resource_usage
from megatron_rl.parallel import collectives as coll


ENV = "MEGATRON_RL_SAMPLE_RESOURCES"
NAMES = ("rss_mib", "fds", "threads", "shm")


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def resource_metrics() -> dict[str, float]:
    """``{"res/<name>/rank<r>": value}`` for every rank (one small all_gather), or {} when disabled."""
    if not enabled():
        return {}


    mine = resource_usage()
    if not (dist.is_available() and dist.is_initialized()):
        rows = [[float(mine[n]) for n in NAMES]]
    else:  # on the default group's device (NCCL: CUDA)
        local = coll.tensor([float(mine[n]) for n in NAMES], dtype=torch.float64)  # (len(NAMES),)
        rows = [row.tolist() for row in coll.all_gather(local)]
    return {f"res/{n}/rank{r}": float(row[i]) for r, row in enumerate(rows) for i, n in enumerate(NAMES)}
