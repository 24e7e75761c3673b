"""The engine's lifecycle as a pure state machine: which call is legal in which state.

No vLLM, no process group: every transition and every error text is unit-tested here,
and the engine asks this object before touching memory. States per part:

- ``kv_cache``: ``live`` | ``released``
- ``weights``: ``live`` | ``offloaded`` | ``discarded`` (released) | ``awaiting_sync``
  (resumed after a discard, or a dummy start: allocated but not exact until a full sync)

Usage::

    lc = Lifecycle(weights_release="discard", dummy=False)
    lc.check_release(("kv_cache", "weights")); lc.did_release(("kv_cache", "weights"))
    lc.check_generate()   # raises EngineStateError naming the fix
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rl.rollout.base import EngineStateError


@dataclass
class EngineState:
    kv_cache: str = "live"
    weights: str = "live"
    syncing: bool = False
    cycles: int = 0  # completed release -> resume round trips of any tag
    events: list = field(default_factory=list)  # ("release", tags) ... for orchestration tests

    def short(self) -> str:
        return f"kv_cache={self.kv_cache}, weights={self.weights}" + (", syncing" if self.syncing else "")


class Lifecycle:
    """Legal transitions of one engine; ``weights_release`` is ``offload`` or ``discard``."""

    def __init__(self, *, weights_release: str, dummy: bool = False):
        if weights_release not in ("offload", "discard"):
            raise EngineStateError(f"weights_release must be offload or discard, got {weights_release!r}")
        self.mode = weights_release
        self.state = EngineState(weights="awaiting_sync" if dummy else "live")
        self.dummy = dummy

    def set_mode(self, weights_release: str) -> None:
        if weights_release not in ("offload", "discard"):
            raise EngineStateError(f"weights_release must be offload or discard, got {weights_release!r}")
        if self.state.weights in ("offloaded", "discarded"):
            raise EngineStateError("cannot change weights_release while the weights are released")
        self.mode = weights_release

    # -- checks (raise, change nothing) ---------------------------------------------------------

    def check_generate(self) -> None:
        s = self.state
        if s.syncing:
            raise EngineStateError("cannot generate during a weight sync; call end_weight_update() first")
        if s.kv_cache == "released":
            raise EngineStateError("cannot generate: the KV cache is released; call resume(['kv_cache']) first")
        if s.weights in ("offloaded", "discarded"):
            raise EngineStateError(f"cannot generate: the weights are released ({s.weights}); "
                                   "call resume(['weights']) first")
        if s.weights == "awaiting_sync":
            why = ("the engine started with load_format='dummy'" if self.dummy
                   else "the weights were discarded and resumed without a weight sync")
            raise EngineStateError(f"cannot generate: {why}; sync the weights first "
                                   "(begin_weight_update/load_shards/end_weight_update or update_weights)")

    def check_release(self, tags: tuple[str, ...]) -> None:
        s = self.state
        if s.syncing:
            raise EngineStateError("cannot release during a weight sync; call end_weight_update() first")
        if "kv_cache" in tags and s.kv_cache == "released":
            raise EngineStateError("cannot release kv_cache: it is already released")
        if "weights" in tags and s.weights in ("offloaded", "discarded"):
            raise EngineStateError(f"cannot release weights: they are already released ({s.weights})")

    def check_resume(self, tags: tuple[str, ...]) -> None:
        s = self.state
        if s.syncing:
            raise EngineStateError("cannot resume during a weight sync; call end_weight_update() first")
        if "kv_cache" in tags and s.kv_cache != "released":
            raise EngineStateError("cannot resume kv_cache: it is not released")
        if "weights" in tags and s.weights not in ("offloaded", "discarded"):
            raise EngineStateError(f"cannot resume weights: they are not released (weights={s.weights})")

    def check_sync(self) -> None:
        s = self.state
        if s.syncing:
            raise EngineStateError("begin_weight_update() called twice without end_weight_update()")
        if s.weights in ("offloaded", "discarded"):
            raise EngineStateError(f"cannot sync weights: they are released ({s.weights}); "
                                   "call resume(['weights']) first")

    def sync_needs_all(self) -> bool:
        """A sync into unfilled weights must fill every parameter."""
        return self.state.weights == "awaiting_sync"

    # -- transitions ----------------------------------------------------------------------------

    def did_release(self, tags: tuple[str, ...]) -> None:
        self.check_release(tags)
        if "kv_cache" in tags:
            self.state.kv_cache = "released"
        if "weights" in tags:
            exact = self.state.weights == "live"
            self.state.weights = "offloaded" if (self.mode == "offload" and exact) else "discarded"
        self.state.events.append(("release", tags))

    def did_resume(self, tags: tuple[str, ...]) -> None:
        self.check_resume(tags)
        if "kv_cache" in tags:
            self.state.kv_cache = "live"
        if "weights" in tags:
            self.state.weights = "live" if self.state.weights == "offloaded" else "awaiting_sync"
        self.state.cycles += 1
        self.state.events.append(("resume", tags))

    def did_begin_sync(self) -> None:
        self.check_sync()
        self.state.syncing = True
        self.state.events.append(("sync_begin", ()))

    def did_end_sync(self, *, complete: bool) -> None:
        if not self.state.syncing:
            raise EngineStateError("end_weight_update() without begin_weight_update()")
        self.state.syncing = False
        if complete:
            self.state.weights = "live"
            self.dummy = False
        self.state.events.append(("sync_end", ()))
