"""Routing replay (R3) and the route-mismatch metric on one model's megatron-core routers.

megatron-core 0.16.1 (``moe_enable_routing_replay``): every ``TopKRouter`` holds a
``RouterReplay`` (``router.router_replay``) whose ``get_replay_topk(scores, topk, ...,
default_compute_topk)`` its routing calls for the top-k. With the action ``REPLAY_FORWARD`` it
returns the target indices (``set_target_indices``) and their scores, gathered, so the
routing weights still carry gradients; without an action it runs the default top-k.

:class:`RouteControl` drives *this model's* routers only: megatron also lists every instance in
a class-level ``RouterReplay.global_router_replay_instances``, shared by every model of the
process (a reference model or a critic would mix in), so we take ours out of that list and
reach each one through its router. Each instance is wrapped (:class:`LayerReplay`) to count,
while ``counting`` is set, the routing decisions where the rollout's route (the micro-batch's
``LocalBatch.routes``) differs from training's own top-k on the same scores, as expert *sets*
(the order of the k slots is not a decision).

Layout. The router sees exactly the tokens of its rank: the rows of ``LocalBatch`` (shared-prefix
packing, CP chunks), cut to the sequence-parallel slice under ``parallel.sequence_parallel``,
and only this pipeline stage's layers (``router.layer_number``, global and 1-based, picks the
layer of ``routes``). The rows carry their routes from packing on (``attention/plan.py``), so
no second copy of that layout exists.

Recompute: ``train.recompute=full`` re-runs each layer in backward, where megatron would need
``REPLAY_BACKWARD`` (its FIFO of targets) set by the caller; the config refuses that pairing.
``selective`` recomputes core attention only, never a router.

Usage::

    ctl = RouteControl.install(eng.model, replay=True)    # after build_gpt(..., routing_replay=True)
    ctl.load(local_batch, tp_rank=r, tp_size=t, sequence_parallel=True)   # before each forward
    ctl.counting = True; ...; mismatched, decisions = ctl.take_counts()
"""
from __future__ import annotations

import torch


def route_mode(cfg) -> str:
    """What the policy does with the rollout's MoE routes: ``off``, ``count`` (the route-mismatch
    metric only: ``logging.route_mismatch``) or ``replay`` (``algorithm.routing_replay``)."""
    if cfg.algorithm.routing_replay:
        return "replay"
    return "count" if cfg.logging.route_mismatch else "off"


class RouteReplayError(RuntimeError):
    """Routes that do not fit the router (the message names the layer and the shapes)."""


class LayerReplay:
    """One router's ``router_replay``: megatron's instance, plus the mismatch count."""

    def __init__(self, base, *, layer: int, control: "RouteControl"):
        self.base, self.layer, self.control = base, layer, control

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, idx = self.base.get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)
        ctl = self.control
        if ctl.counting and ctl.target is not None:
            own = idx
            if ctl.replay:  # training's own choice on the same scores (idx is the replayed one)
                with torch.no_grad():
                    own = default_compute_topk(scores.detach(), topk, num_groups, group_topk)[1]
            ctl.count(self.layer, own.detach())
        return probs, idx


class RouteControl:
    """Routing replay and mismatch counting for one model's routers (see the module docstring)."""

    def __init__(self, layers: dict, *, replay: bool):
        self.layers = layers  # {layer index (0-based, global): megatron RouterReplay}
        self.replay, self.counting = replay, False
        self.target = None  # (n, L, k) this rank's routes for the current micro-batch
        self.counted = None  # (n,) rows the metric counts
        self._counts = torch.zeros(2, dtype=torch.float64)  # mismatched decisions, decisions

    @classmethod
    def install(cls, chunks: list, *, replay: bool) -> "RouteControl":
        """Wrap every router of ``chunks`` (built with ``moe_enable_routing_replay``) and set
        ``route_control`` on each unwrapped model, where the forward step finds it."""
        # lazy: keeps vLLM/megatron out of CLI start-up
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.transformer.moe.router_replay import RouterReplay

        ctl, layers = cls({}, replay=replay), {}
        for chunk in chunks:
            model = getattr(chunk, "module", chunk)
            for module in model.modules():
                if isinstance(module, TopKRouter):
                    base = module.router_replay
                    if base is None:
                        raise RouteReplayError("the model was built without moe_enable_routing_replay; "
                                               "fix: build_gpt(..., routing_replay=True)")
                    if base in RouterReplay.global_router_replay_instances:
                        RouterReplay.global_router_replay_instances.remove(base)
                    layers[module.layer_number - 1] = base
                    module.router_replay = LayerReplay(base, layer=module.layer_number - 1, control=ctl)
            model.route_control = ctl
        ctl.layers = layers
        return ctl

    def load(self, local, *, tp_rank: int, tp_size: int, sequence_parallel: bool) -> None:
        """This micro-batch's routes (``local.routes`` (T, L, k)), as this rank's routers see them."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction  # lazy: as above

        routes, counted = local.routes, local.route_counted
        if routes is None:
            return self.idle()
        if sequence_parallel and tp_size > 1:
            n = routes.shape[0] // tp_size
            routes, counted = routes[tp_rank * n:(tp_rank + 1) * n], counted[tp_rank * n:(tp_rank + 1) * n]
        self.target, self.counted = routes, counted
        for layer, base in self.layers.items():
            base.clear_indices()
            if self.replay:
                base.set_target_indices(routes[:, layer].contiguous())
                base.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            else:
                base.clear_router_replay_action()

    def idle(self) -> None:
        """No routes for the next forward: every router computes its own top-k."""
        self.target = self.counted = None
        for base in self.layers.values():
            base.clear_indices()
            base.clear_router_replay_action()

    def count(self, layer: int, own: torch.Tensor) -> None:
        """Count the decisions (token, layer) where ``own`` (n, k) and the routes differ as sets."""
        want = self.target[:, layer].to(own.device)
        if want.shape != own.shape:
            raise RouteReplayError(f"layer {layer}: the router saw {tuple(own.shape)} top-k ids but the routes give "
                                   f"{tuple(want.shape)}; the routes are not laid out as this rank's tokens")
        counted = self.counted.to(own.device)
        differ = (own.sort(dim=-1).values != want.sort(dim=-1).values).any(dim=-1) & counted
        # summed on the router's device: no host sync per layer (take_counts reads them once)
        self._counts = self._counts.to(own.device) + torch.stack([differ.sum(), counted.sum()]).double()

    def take_counts(self) -> tuple[float, float]:
        """``(mismatched decisions, decisions)`` counted on this rank since the last call."""
        out = tuple(self._counts.tolist())
        self._counts = torch.zeros(2, dtype=torch.float64)
        return out
