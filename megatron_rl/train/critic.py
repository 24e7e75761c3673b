"""PPO's value model (critic): a trainable megatron-core GPTModel with a scalar head, offloaded
between uses through the KL reference's device seam (:func:`megatron_rl.train.reference.make_store`).

The critic is a :class:`~megatron_rl.train.engine.TrainEngine` built with ``value_head=True``
(:mod:`megatron_rl.models.value_head`) at the policy's layout on the same ranks, loaded from
HF weights (``algorithm.critic_hf_path``, by default ``model.hf_path``), with its own Adam and
learning rate (``algorithm.critic_lr``). It is never synced to vLLM. It runs on the policy's
packed micro-batches (shared-prefix packing included: a prompt runs once per group).

Unlike the frozen reference its weights change, so every offload stores them afresh:

* parameters and optimizer state (Adam moments, fp32 master copies, step counters) go through
  ``make_store``: a file written and privately mapped on CPU, a pinned host copy on CUDA. The
  set of tensors is taken at each offload (Adam's state appears at the first step); on CUDA the
  pinned buffers are refilled in place once that set stops changing (no new pinned memory);
* the DDP gradient buffers are freed with megatron-core's own ``offload_to_cpu(move_params=False)``
  (``storage().resize_(0)``, views stay valid; gradients are zeroed before every step anyway);
* under the distributed optimizer the parameters are views of DDP's parameter buffers and the
  fp32 optimizer shards views of those: the buffers go through
  :class:`~megatron_rl.train.reference.InPlaceStore` (emptied and refilled in place, so every
  view stays valid), and only the tensors that own their storage go through ``make_store``.

Usage::

    critic = Critic(hf_config, cfg=cfg, topo=topo, store_dir=run_dir + "/critic")   # starts offloaded
    with critic.onloaded():
        metrics = critic.forward(batches, forward_fn=make_forward_fn(loss, values=True))
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from megatron_rl.rollout.cpu_memory import return_memory_to_os
from megatron_rl.train.engine import TrainEngine
from megatron_rl.train.reference import InPlaceStore, Offloadable, _rng_untouched, _unique_params, make_store


def optimizer_tensors(optimizer) -> list:
    """Every tensor a megatron optimizer holds: its param groups' (master) parameters and state."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            out += [p for p in group["params"] if isinstance(p, torch.Tensor)]
        for state in inner.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.numel() > 0]
    return out


def _dedupe(tensors: list) -> list:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def critic_path(cfg) -> str:
    """The weights the critic starts from: ``algorithm.critic_hf_path`` or the policy's."""
    return cfg.algorithm.critic_hf_path or cfg.model.hf_path


class Critic(Offloadable):
    """The value model; see the module docstring. ``eng`` is its :class:`TrainEngine`."""

    def __init__(self, hf_config, *, cfg, topo, store_dir: str, dtype=torch.float32):
        from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix  # lazy: CLI start-up

        a = cfg.algorithm
        train = dataclasses.replace(cfg.train, lr=a.critic_lr or cfg.train.lr)
        with _rng_untouched():  # the policy's RNG streams are not the critic's business
            self.eng = TrainEngine(hf_config, parallel=cfg.parallel, train=train, topo=topo, dtype=dtype,
                                   hf_path=critic_path(cfg), core_attention=SharedPrefixCoreAttention,
                                   vocab_divisible_by=cfg.model.make_vocab_size_divisible_by, value_head=True)
        enable_shared_prefix(self.eng.model)
        self.model, self.optimizer, self.topo = self.eng.model, self.eng.optimizer, topo
        self.path = os.path.join(store_dir, f"critic-rank{topo.rank}.bin")
        self.param_bytes = sum(p.numel() * p.element_size() for p in _unique_params(self.model))
        self.store, self.flat_store, self.resident = None, None, True
        self.offload()

    def _buffers(self) -> list:
        return [b for m in self.model for b in (*m.buffers, *getattr(m, "expert_parallel_buffers", []))]

    def _tensors(self) -> list:
        """What the store re-points: parameters and optimizer state, except views of the DDP
        parameter buffers (under the distributed optimizer), which :class:`InPlaceStore` offloads."""
        held = {b.param_data.untyped_storage().data_ptr() for b in self._buffers() if b.param_data is not None}
        return [t for t in _dedupe(_unique_params(self.model) + optimizer_tensors(self.optimizer))
                if t.untyped_storage().data_ptr() not in held]

    def state_bytes(self) -> int:
        """Bytes an offload frees: parameters, optimizer state and gradient buffers."""
        flat = sum(x.numel() * x.element_size() for b in self._buffers() for x in (b.grad_data, b.param_data)
                   if x is not None)
        return sum(t.numel() * t.element_size() for t in self._tensors()) + flat

    def offload(self) -> None:
        if not self.resident:
            return
        # the current bytes: a new file on CPU, the same pinned buffers on CUDA once Adam's state exists
        self.store = make_store(self._tensors(), path=self.path, reuse=self.store)
        self.store.offload()
        if self.flat_store is None:
            self.flat_store = InPlaceStore([b.param_data for b in self._buffers() if b.param_data is not None],
                                           path=self.path + ".buffers")
        self.flat_store.offload()
        for buf in self._buffers():
            buf.offload_to_cpu(move_params=False, move_grads=True)
        return_memory_to_os()
        self.resident = False

    def onload(self) -> None:
        if self.resident:
            return
        for buf in self._buffers():
            buf.reload_from_cpu(move_params=False, move_grads=True)
        self.flat_store.onload()
        self.store.onload()
        self.resident = True

    def _check(self, what: str) -> None:
        if not self.resident:
            raise RuntimeError(f"Critic.{what} while offloaded; fix: run it inside `with critic.onloaded():`")

    def forward(self, batches: list, *, forward_fn: Callable) -> list:
        self._check("forward")
        return self.eng.forward(batches, forward_fn=forward_fn)

    def step(self, batches: list, *, forward_fn: Callable) -> dict:
        self._check("step")
        return self.eng.step(batches, forward_fn=forward_fn)


__all__ = ["Critic", "critic_path", "optimizer_tensors"]
