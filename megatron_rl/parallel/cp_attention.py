"""Context-parallel core attention without Transformer Engine: all-gather K/V over the CP group.

megatron-core splits each sequence over the CP ranks with a load-balanced layout: the
sequence is cut into ``2*CP`` equal chunks and CP rank ``r`` holds chunks ``r`` and
``2*CP-1-r`` (so every rank does the same amount of causal work). Rotary embeddings already
follow this layout (``get_pos_emb_on_this_cp_rank``). This module provides

- :func:`split_for_cp` / :func:`cp_positions`: that split, for batches and positions;
- :class:`AllGatherCP`: all-gather along the sequence dim in forward, reduce-scatter in
  backward (a bypass when the group has one rank);
- :class:`CPDotProductAttention`: a drop-in ``core_attention`` for megatron's layer spec.
  Each rank gathers the whole K/V, then attends from its local queries with the causal mask
  written in *global* positions. With CP=1 it is plain causal (or masked) attention.

Usage::

    spec.submodules.self_attention.submodules.core_attention = CPDotProductAttention
    tokens = split_for_cp(tokens, seq_dim=1, cp_size=cp, cp_rank=r)      # (B, S/CP)
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_rl.parallel import collectives as coll


def cp_chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two of ``2*cp_size`` sequence chunks held by ``cp_rank``."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def split_for_cp(t: torch.Tensor, *, seq_dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This CP rank's part of ``t`` along ``seq_dim`` (megatron's load-balanced split)."""
    if cp_size == 1:
        return t
    s = t.size(seq_dim)
    if s % (2 * cp_size):
        raise ValueError(f"sequence length {s} is not divisible by 2*cp={2 * cp_size}; "
                         "fix: pad sequences to a multiple of 2*parallel.cp")
    t = t.view(*t.shape[:seq_dim], 2 * cp_size, s // (2 * cp_size), *t.shape[seq_dim + 1:])  # (.., 2CP, S/2CP, ..)
    idx = torch.tensor(cp_chunk_ids(cp_size, cp_rank), device=t.device)
    t = t.index_select(seq_dim, idx)  # (.., 2, S/2CP, ..)
    return t.reshape(*t.shape[:seq_dim], -1, *t.shape[seq_dim + 2:])  # (.., S/CP, ..)


def cp_positions(local_len: int, *, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions (0..S-1) of the ``local_len`` tokens held by ``cp_rank``."""
    if cp_size == 1:
        return torch.arange(local_len, device=device)
    c = local_len // 2
    a, b = cp_chunk_ids(cp_size, cp_rank)
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device), torch.arange(b * c, (b + 1) * c, device=device)])


class AllGatherCP(torch.autograd.Function):
    """All-gather along dim 0 over ``group`` (rank order); backward reduce-scatters (sums)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        n = torch.distributed.get_world_size(group)
        if n == 1:
            return x
        x = x.contiguous()
        out = torch.empty((n * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)
        coll.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = torch.distributed.get_world_size(ctx.group)
        if n == 1:
            return grad, None
        grad = grad.contiguous()
        out = torch.empty((grad.size(0) // n, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        coll.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def all_gather_cp(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or torch.distributed.get_world_size(group) == 1:
        return x
    return AllGatherCP.apply(x, group)


def gathered_positions(local_len: int, *, cp_size: int, device=None) -> torch.Tensor:
    """Global positions of the all-gathered sequence (rank 0's tokens, then rank 1's, ...)."""
    return torch.cat([cp_positions(local_len, cp_size=cp_size, cp_rank=r, device=device) for r in range(cp_size)])


def attend(query, key, value, *, keep: torch.Tensor, scale: float, fp32_softmax: bool = True) -> torch.Tensor:
    """Attention with a boolean ``keep`` mask broadcastable to (B, np, sq, sk).

    query (sq, B, np, hn); key/value (sk, B, ng, hn) with np a multiple of ng (GQA).
    Returns (sq, B, np*hn).
    """
    sq, b, np_, hn = query.shape
    ng = key.size(2)
    if np_ != ng:
        key = key.repeat_interleave(np_ // ng, dim=2)  # (sk, B, np, hn)
        value = value.repeat_interleave(np_ // ng, dim=2)
    q = query.permute(1, 2, 0, 3)  # (B, np, sq, hn)
    k = key.permute(1, 2, 3, 0)  # (B, np, hn, sk)
    v = value.permute(1, 2, 0, 3)  # (B, np, sk, hn)
    scores = torch.matmul(q, k) * scale  # (B, np, sq, sk)
    if fp32_softmax:
        scores = scores.float()
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, v)  # (B, np, sq, hn)
    return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # (sq, B, np*hn)


def cp_group_of(pg_collection, *, cp_size: int, who: str):
    """The cp group megatron-core hands a ``core_attention`` in ``pg_collection`` (None at CP = 1)."""
    group = getattr(pg_collection, "cp", None)
    if cp_size > 1 and group is None:
        raise ValueError(f"{who}: context_parallel_size={cp_size} needs a pg_collection with a cp group; fix: "
                         "build the model with megatron_rl.models.build_gpt (megatron-core passes it)")
    return group if cp_size > 1 else None


class CPDotProductAttention(torch.nn.Module):
    """``core_attention`` for megatron's local spec that supports context parallelism.

    Same constructor and forward signature as ``megatron.core.transformer.DotProductAttention``.
    ``attention_mask`` (optional) follows megatron's convention (True = masked out) and is
    indexed in global key positions: shape broadcastable to (B, 1, sq_local, sk_global).
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__()
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("CPDotProductAttention: attention_dropout must be 0; fix: set attention_dropout=0")
        self.cp_group = cp_group_of(pg_collection, cp_size=config.context_parallel_size, who="CPDotProductAttention")
        self.cp_size = config.context_parallel_size

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("CPDotProductAttention: packed sequences / attention bias are not supported")
        sq = query.size(0)
        cp_rank = torch.distributed.get_rank(self.cp_group) if self.cp_size > 1 else 0
        key = all_gather_cp(key, self.cp_group)  # (sk = sq*CP, B, ng, hn)
        value = all_gather_cp(value, self.cp_group)
        if attention_mask is not None:
            keep = ~attention_mask.bool()
        else:
            q_pos = cp_positions(sq, cp_size=self.cp_size, cp_rank=cp_rank, device=query.device)
            k_pos = gathered_positions(sq, cp_size=self.cp_size, device=query.device)
            keep = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, sq, sk)
        return attend(query, key, value, keep=keep, scale=self.softmax_scale,
                      fp32_softmax=self.config.attention_softmax_in_fp32)
