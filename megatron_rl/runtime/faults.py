"""Test seam for fault injection: named points in production code call :func:`fire`, which does
nothing unless a test (or a test worker, e.g. tests/workers/ckpt_fault_cli.py) has installed a
hook for that point. Production code never reads a fault setting itself.

Points: ``"checkpoint:after_shards"`` (``step=, rank=``): every rank has written its dist
checkpoint shards, nothing else of the step's save exists yet.
"""
from __future__ import annotations

from typing import Callable

_hooks: dict[str, Callable[..., None]] = {}


def install(point: str, hook: Callable[..., None]) -> None:
    """Call ``hook(**kwargs)`` whenever production code reaches ``point``."""
    _hooks[point] = hook


def clear() -> None:
    _hooks.clear()


def fire(point: str, **kwargs) -> None:
    hook = _hooks.get(point)
    if hook is not None:
        hook(**kwargs)
