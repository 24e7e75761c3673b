"""Shared-prefix packing and attention for GRPO training on megatron-core.

A GRPO group ``[P, R1, ..., RG]`` runs the prompt once instead of G times; the result
(log-probs and gradients) equals the naive ``[P, R_i]`` computation. Pieces:

- :mod:`.packing`: groups -> pad-free micro-batches (positions, index maps, weights);
- :mod:`.plan`: one rank's rows and the attention plan, with the context-parallel split;
- :mod:`.kernels`: blocked flash attention with log-sum-exp merge (CPU), FlexAttention (GPU);
- :mod:`.core`: megatron-core core attention + per-token RoPE hook;
- :mod:`.step`: engine micro-batches, forward step, per-response log-probs.

Usage::

    from megatron_rl.attention import Group, SharedPrefixCoreAttention, enable_shared_prefix, make_batches
    chunks = build_gpt(hf, parallel=par, core_attention=SharedPrefixCoreAttention)
    enable_shared_prefix(chunks)
"""
from megatron_rl.attention.core import (PositionRotary, SharedPrefixCoreAttention, SharedPrefixParams,
                                        enable_shared_prefix)
from megatron_rl.attention.packing import Group, PackedBatch, PackingError, pack_groups, pack_naive
from megatron_rl.attention.plan import AttentionPlan, LocalBatch, build_local
from megatron_rl.attention.step import (collect_logprobs, make_batches, make_forward_fn, padded, pg_loss,
                                        response_logprobs)

__all__ = ["Group", "PackedBatch", "PackingError", "pack_groups", "pack_naive", "AttentionPlan", "LocalBatch",
           "build_local", "SharedPrefixCoreAttention", "SharedPrefixParams", "PositionRotary",
           "enable_shared_prefix", "make_batches", "make_forward_fn", "response_logprobs", "padded", "pg_loss",
           "collect_logprobs"]
