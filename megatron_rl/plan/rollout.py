"""Rollout memory per rank: what vLLM takes, what stays, what sleep gives back.

vLLM (``rollout_tp`` ranks per replica) reserves ``gpu_memory_utilization`` of the device for
itself at start-up, on top of what training already holds (the engine is built first and its
state stays resident): weights at ``rollout.tp``, its profile-run activations, and the KV
cache, which gets the rest of that share. Sleep (``release(["kv_cache", "weights"])``) frees
the KV cache and the weights (``weights_release=offload`` keeps a host copy); what stays is
memory outside vLLM's sleep pool: the CUDA-graph pool (``enforce_eager=false``), estimated as
one profile run's activations.

The weight bytes come from the layout algebra's vLLM shards
(:func:`megatron_rl.resharding.vllm_layout.vllm_rank_tensors`, the shapes the sync writes).
The profile-run terms follow vLLM's defaults for the offline ``LLM`` class: up to
``MAX_BATCHED_TOKENS`` tokens per forward, logits for up to ``MAX_SEQS`` sequences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rl.models.shape import ModelShape
from megatron_rl.plan.shapes import DTYPE_BYTES
from megatron_rl.resharding.vllm_layout import vllm_kv_heads, vllm_padded_vocab, vllm_rank_tensors

MAX_BATCHED_TOKENS = 16384  # vLLM's scheduler budget per step (LLM class, large GPUs)
MAX_SEQS = 256  # vLLM's max_num_seqs default


@dataclass(frozen=True)
class RolloutMemory:
    """One rank's rollout terms (bytes)."""

    budget: int  # gpu_memory_utilization x device memory: all of vLLM's
    weights: int
    activations: int  # the profile run's peak (inside the budget)
    kv_cache: int  # what is left of the budget for the KV cache
    kv_bytes_per_token: int
    residual: int  # what stays through sleep (CUDA graphs)

    @property
    def kv_tokens(self) -> int:
        return max(self.kv_cache, 0) // self.kv_bytes_per_token

    def sequences(self, max_model_len: int) -> int:
        """Full-length sequences the KV cache holds at once (vLLM needs >= 1 to start)."""
        return self.kv_tokens // max_model_len


def rollout_memory(cfg, shape: ModelShape, *, gpu_bytes: int) -> RolloutMemory:
    r = cfg.rollout
    elem = DTYPE_BYTES[cfg.rollout_dtype]
    weights = max(sum(math.prod(lt.shape) for lt in vllm_rank_tensors(shape, tp=r.tp, tp_rank=k).values())
                  for k in range(r.tp)) * elem
    tokens = min(MAX_BATCHED_TOKENS, max(r.max_model_len, MAX_SEQS))
    per_token = 2 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * shape.head_dim // r.tp \
        + 3 * shape.ffn // r.tp
    logits = MAX_SEQS * vllm_padded_vocab(shape.vocab, tp=r.tp) * 4  # gathered over TP, fp32
    activations = tokens * per_token * elem + logits
    kv_heads = len(vllm_kv_heads(shape, tp=r.tp, tp_rank=0))
    per_token_kv = 2 * shape.layers * kv_heads * shape.head_dim * elem
    budget = int(r.gpu_memory_utilization * gpu_bytes)
    return RolloutMemory(budget=budget, weights=weights, activations=activations,
                         kv_cache=budget - weights - activations, kv_bytes_per_token=per_token_kv,
                         residual=0 if r.enforce_eager else activations)
