"""The rollout engine protocol: what the trainer may ask of any inference engine.

The trainer's per-step memory choreography is written once against this interface::

    out = engine.generate(prompts, sampling=Sampling(max_new_tokens=32))   # every rank
    engine.release(["kv_cache", "weights"])     # memory goes to training
    ...train...
    engine.resume(["weights"])
    engine.begin_weight_update(); engine.load_shards(shards); engine.end_weight_update()
    engine.resume(["kv_cache"])                 # the prefix cache is reset on every resume/sync

Every call is collective: all ranks call it together, with the same arguments.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

TAGS = ("kv_cache", "weights")


class EngineStateError(RuntimeError):
    """An illegal lifecycle transition (the message names the state and the fix)."""


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Validate and normalise release/resume tags to a sorted tuple."""
    if isinstance(tags, str):
        raise EngineStateError(f"tags must be a list such as ['kv_cache'], got the string {tags!r}")
    out = tuple(sorted(set(tags)))
    bad = [t for t in out if t not in TAGS]
    if bad or not out:
        raise EngineStateError(f"unknown or empty tags {list(tags)!r}; use a non-empty subset of {list(TAGS)}")
    return out


@dataclass(frozen=True)
class Sampling:
    """How to sample. ``seed`` None draws a fresh, rank-consistent seed per call."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    prompt_logprobs: bool = False  # also return log p(prompt token | prefix) (bypasses the prefix cache)
    stop_token_ids: tuple[int, ...] = ()
    routes: bool = False  # also return each token's MoE routes (Generation.routes; an MoE model only)


@dataclass
class Generation:
    """One prompt's result: response tokens with their log-probs (same length).

    ``routes`` (with ``Sampling(routes=True)``): ``(P + R, num_moe_layers, topk)`` int16, the
    experts each token of ``prompt + tokens`` was routed to in every MoE layer; the final token
    was never fed to the model and holds ``0..k-1`` (see :mod:`megatron_rl.rollout.routes`).
    """

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    prompt_logprobs: Optional[list[Optional[float]]] = None  # first entry None (no prefix)
    finish_reason: str = ""
    routes: Optional[torch.Tensor] = None


@dataclass
class MemoryReport:
    """Bytes held per phase. ``rss`` on CPU; on GPU ``allocated``/``reserved`` (torch's allocator)
    and ``device_used`` (the driver's view: total - free, which also sees vLLM's CuMem pool
    that sleep releases and torch's counters do not), else 0."""

    phase: str
    kv_cache_bytes: int
    weight_bytes: int
    rss: int = 0
    allocated: int = 0
    reserved: int = 0
    device_used: int = 0
    extra: dict = field(default_factory=dict)

    def as_metrics(self, prefix: str = "rollout/mem") -> dict:
        return {f"{prefix}/{self.phase}/{k}": v for k, v in
                (("kv_cache_bytes", self.kv_cache_bytes), ("weight_bytes", self.weight_bytes),
                 ("rss", self.rss), ("allocated", self.allocated), ("reserved", self.reserved),
                 ("device_used", self.device_used))}


class RolloutEngine(abc.ABC):
    """A narrow engine: generate, release/resume memory, take new weights."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], *, sampling: Sampling) -> list[Generation]:
        """All prompts in, all results out (on every rank); replicas split the work."""

    @abc.abstractmethod
    def release(self, tags: Iterable[str]) -> MemoryReport:
        """Give the memory of ``tags`` back (weights: offload or discard per config)."""

    @abc.abstractmethod
    def resume(self, tags: Iterable[str]) -> MemoryReport:
        """Take the memory of ``tags`` again. Discarded weights then await a sync."""

    @abc.abstractmethod
    def update_weights(self, hf_named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors (the engine slices them); the baseline sync."""

    @abc.abstractmethod
    def begin_weight_update(self) -> None:
        """Start a sharded sync: :meth:`load_shards` may follow any number of times."""

    @abc.abstractmethod
    def load_shards(self, shards: Iterable[tuple[str, torch.Tensor]], *, donate: bool = False) -> int:
        """This rank's shards, in the engine's own names and TP layout. ``donate=True``: the
        caller gives the tensors up (it never reads or writes them again), so the engine may
        keep them instead of copying."""

    @abc.abstractmethod
    def end_weight_update(self) -> None:
        """Finish a sync: post-load processing, then reset the prefix cache."""

    @abc.abstractmethod
    def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks (stale after any weight or KV change)."""

    @property
    @abc.abstractmethod
    def state(self):
        """The lifecycle state (see :class:`megatron_rl.rollout.lifecycle.EngineState`)."""

    @abc.abstractmethod
    def memory(self, phase: str = "now") -> MemoryReport:
        """Bytes held now, labelled ``phase`` for the trainer's metrics."""
