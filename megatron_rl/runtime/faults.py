"""Test seam for fault injection: named points in production code call :func:`fire`, which does
nothing unless a test (or a test worker, e.g. tests/workers/ckpt_fault_cli.py) has installed a
hook for that point, or the point's default hook finds its test setting. Production code never
reads a fault setting itself: every one is read here.

Points:

- ``"checkpoint:after_shards"`` (``step=, rank=``): every rank has written its dist checkpoint
  shards, nothing else of the step's save exists yet. No default hook.
- ``"rank:phase"`` (``step=, phase=, rank=, attempt=``): a rank enters a phase
  (:meth:`megatron_rl.runtime.rank.RankRuntime.phase`). Default hook: with
  ``MEGATRON_RL_RANK_FAULT=<step>:<phase>:<rank>`` that rank SIGKILLs itself on entering that
  phase of that step, in the first attempt only (torchrun restarts). The environment is how a
  test reaches the ranks that a launch script starts.
- ``"train:end"`` (``rollout=, tokenizer=, rank=``): the last step is done and saved, and the
  rollout engine holds its weights (the last sync), awake. No default hook
  (tests/workers/ckpt_fault_cli.py records greedy generations there).
"""
from __future__ import annotations

import os
import signal
from typing import Callable

RANK_FAULT_ENV = "MEGATRON_RL_RANK_FAULT"

_hooks: dict[str, Callable[..., None]] = {}


def install(point: str, hook: Callable[..., None]) -> None:
    """Call ``hook(**kwargs)`` whenever production code reaches ``point``."""
    _hooks[point] = hook


def clear() -> None:
    _hooks.clear()


def fire(point: str, **kwargs) -> None:
    hook = _hooks.get(point, _DEFAULTS.get(point))
    if hook is not None:
        hook(**kwargs)


def _rank_fault_from_env(*, step: int, phase: str, rank: int, attempt: int) -> None:
    want = os.environ.get(RANK_FAULT_ENV)
    if not want or attempt > 0:
        return
    s, p, r = want.split(":")
    if (int(s), p, int(r)) == (step, phase, rank):
        os.kill(os.getpid(), signal.SIGKILL)  # its status stays "running" in this phase and step


_DEFAULTS: dict[str, Callable[..., None]] = {"rank:phase": _rank_fault_from_env}
