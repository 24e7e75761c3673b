"""Shared-prefix attention inside megatron-core: a core-attention module and a rotary hook.

Megatron's ``SelfAttention`` computes Q/K/V (TP-sharded heads, qk-norm, biases), applies
RoPE and calls ``core_attention(query, key, value, mask, ..., packed_seq_params=...)``. We
plug in at exactly those two points, so TP, PP, SP and recompute work unchanged:

* :class:`SharedPrefixCoreAttention` goes into the layer spec
  (``build_gpt(..., core_attention=SharedPrefixCoreAttention)``). Given
  :class:`SharedPrefixParams` as ``packed_seq_params`` it attends by the micro-batch's
  ``AttentionPlan`` (CP: the prompt K/V are all-gathered over the CP group, the backward
  reduce-scatters their gradients). Without them it is plain causal attention, so the
  same model also runs naive batches.
* :class:`PositionRotary` replaces ``GPTModel.rotary_pos_emb`` (:func:`enable_shared_prefix`):
  for a shared-prefix batch it returns the RoPE table *per token* (``emb[position_ids]``),
  so every response sees positions ``len(P), len(P)+1, ...`` exactly as the naive sequence
  does; otherwise it defers to megatron's table. It carries no parameters or state-dict keys.

Metadata travels in ``packed_seq_params`` (``qkv_format="sbhd"``: megatron passes it
through every layer and recompute untouched), never in globals.

Usage::

    chunks = build_gpt(hf_config, parallel=par, core_attention=SharedPrefixCoreAttention)
    enable_shared_prefix(chunks)
    params = SharedPrefixParams.from_local(local_batch, device=dev)
    logits = chunks[0](tokens, position_ids, attention_mask=None, packed_seq_params=params)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_rl.attention import kernels
from megatron_rl.attention.plan import AttentionPlan, LocalBatch
from megatron_rl.parallel.cp_attention import CPDotProductAttention, all_gather_cp, cp_group_of


@dataclass
class SharedPrefixParams(PackedSeqParams):
    """``packed_seq_params`` carrying one micro-batch's plan and per-token positions (device)."""

    plan: Optional[AttentionPlan] = None
    position_ids: Optional[torch.Tensor] = None  # (T_local,)
    gather_index: Optional[torch.Tensor] = None  # (sum P,) on device, CP only
    block_mask: Any = None                       # FlexAttention mask, built lazily (CUDA)
    kernel: str = "auto"                         # "auto" | "tasks" | "flex"

    @classmethod
    def from_local(cls, local: LocalBatch, *, device, kernel: str = "auto") -> "SharedPrefixParams":
        if kernel not in ("auto", "tasks", "flex"):
            raise ValueError(f"kernel={kernel!r}; choose 'auto', 'tasks' or 'flex'")
        gi = local.plan.gather_index
        return cls(qkv_format="sbhd", plan=local.plan, position_ids=local.position_ids.to(device),
                   gather_index=gi.to(device) if gi is not None else None, kernel=kernel)

    def use_flex(self, device) -> bool:
        """FlexAttention on CUDA (the blocked path's flash kernel is CPU-only); blocked on CPU."""
        if device.type == "cuda" and self.kernel == "tasks":
            raise ValueError("kernel='tasks' runs on CPU only; fix: use kernel='auto' or 'flex' on CUDA")
        return self.kernel == "flex" or device.type == "cuda"


class SharedPrefixCoreAttention(torch.nn.Module):
    """Drop-in ``core_attention`` (DotProductAttention's signature) for shared-prefix batches."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__()
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"SharedPrefixCoreAttention: attention_dropout={dropout}; "
                             "fix: set attention_dropout=0 (RL fine-tuning runs without it)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or getattr(config, "window_size", None):
            raise ValueError("SharedPrefixCoreAttention supports plain softmax attention only "
                             "(softmax_type='vanilla', no window_size)")
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        if config.apply_query_key_layer_scaling:
            scale /= self.layer_number
        self.softmax_scale = scale
        self.cp_size = config.context_parallel_size
        self.cp_group = cp_group_of(pg_collection, cp_size=self.cp_size, who="SharedPrefixCoreAttention")
        self._fallback = None  # megatron_rl's CP attention for unshared batches, built on demand
        self._fallback_args = (config, layer_number, attn_mask_type, attention_type, softmax_scale, pg_collection)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("SharedPrefixCoreAttention: attention_bias is not supported")
        if isinstance(packed_seq_params, SharedPrefixParams):
            return self._shared(query, key, value, packed_seq_params)
        if packed_seq_params is not None:
            raise NotImplementedError("SharedPrefixCoreAttention: THD packed sequences are not supported; "
                                      "pass SharedPrefixParams (megatron_rl.attention) instead")
        if attention_mask is None and self.cp_size == 1:
            out = kernels.causal_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                           scale=self.softmax_scale)  # (B, S, np, hn)
            return out.transpose(0, 1).reshape(query.size(0), query.size(1), -1)  # (S, B, np*hn)
        return self._cp_fallback()(query, key, value, attention_mask)

    def _cp_fallback(self):
        if self._fallback is None:
            config, layer, mask_type, att_type, scale, pgc = self._fallback_args
            self._fallback = CPDotProductAttention(config, layer, mask_type, att_type, softmax_scale=scale,
                                                   pg_collection=pgc)
        return self._fallback

    def _shared(self, query, key, value, params: SharedPrefixParams):
        sq, b, np_, hn = query.shape
        if b != 1:
            raise ValueError(f"shared-prefix batches are packed into one row (micro-batch size 1), got b={b}")
        plan = params.plan
        if sq != plan.num_queries:
            raise ValueError(f"shared-prefix plan is for {plan.num_queries} tokens but attention got {sq}")
        q, k, v = query[:, 0], key[:, 0], value[:, 0]  # (T, np, hn), (T, ng, hn)
        if plan.cp_size > 1:
            if self.cp_group is None or self.cp_group.size() != plan.cp_size:
                raise ValueError(f"plan was built for cp={plan.cp_size} but the model runs cp={self.cp_size}")
            slots = plan.prompt_slots
            kp = all_gather_cp(k[:slots], self.cp_group)  # (CP*slots, ng, hn); backward reduce-scatters
            vp = all_gather_cp(v[:slots], self.cp_group)
            k = torch.cat([kp.index_select(0, params.gather_index), k])  # (sum P + T, ng, hn)
            v = torch.cat([vp.index_select(0, params.gather_index), v])
        if params.use_flex(q.device):
            if params.block_mask is None:
                params.block_mask = kernels.flex_block_mask(plan.q_meta, plan.k_meta, device=q.device)
            out = kernels.flex_attention_plan(q, k, v, block_mask=params.block_mask, scale=self.softmax_scale)
        else:
            out = kernels.task_attention(q, k, v, tasks=plan.tasks, scale=self.softmax_scale)
        return out.reshape(sq, 1, np_ * hn)  # (T, 1, np*hn)


class _TokenPositions:
    """A rotary "sequence length" that is really per-token positions (see PositionRotary)."""

    def __init__(self, position_ids: torch.Tensor):
        self.position_ids = position_ids


class PositionRotary(torch.nn.Module):
    """Wraps megatron's ``RotaryEmbedding``: per-token RoPE for shared-prefix batches.

    ``GPTModel`` calls ``get_rotary_seq_len(..., packed_seq_params)`` then
    ``forward(that_len, ...)``. For :class:`SharedPrefixParams` the first returns the
    token positions and the second the table rows at those positions, (T, 1, 1, dim);
    megatron then applies RoPE as usual (fused or not). CP slicing is not applied: the
    positions are already this rank's.
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def get_rotary_seq_len(self, inference_context, transformer, transformer_input, transformer_config,
                           packed_seq_params=None, **kwargs):
        if isinstance(packed_seq_params, SharedPrefixParams):
            return _TokenPositions(packed_seq_params.position_ids)
        return self.inner.get_rotary_seq_len(inference_context, transformer, transformer_input,
                                             transformer_config, packed_seq_params, **kwargs)

    def forward(self, max_seq_len, offset: int = 0, packed_seq: bool = False, cp_group=None):
        if isinstance(max_seq_len, _TokenPositions):
            pos = max_seq_len.position_ids
            table = self.inner.get_emb(int(pos.max()) + 1 if pos.numel() else 1)  # (S, 1, 1, dim)
            return table.index_select(0, pos.to(table.device))  # (T, 1, 1, dim)
        return self.inner(max_seq_len, offset, packed_seq, cp_group)

    def get_cos_sin(self, *args, **kwargs):
        return self.inner.get_cos_sin(*args, **kwargs)

    def get_emb(self, *args, **kwargs):
        return self.inner.get_emb(*args, **kwargs)


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def enable_shared_prefix(chunks) -> None:
    """Install :class:`PositionRotary` on every chunk; check the core attention is ours.

    ``chunks``: a model or a list of model chunks (possibly DDP-wrapped). Idempotent.
    """
    from megatron.core.transformer.attention import Attention  # lazy: keeps vLLM/megatron out of CLI start-up

    for chunk in chunks if isinstance(chunks, (list, tuple)) else [chunks]:
        gpt = unwrap(chunk)
        for name, mod in gpt.named_modules():
            if isinstance(mod, Attention) and not isinstance(mod.core_attention, SharedPrefixCoreAttention):
                raise ValueError(f"{name}.core_attention is {type(mod.core_attention).__name__}; fix: build the "
                                 "model with core_attention=SharedPrefixCoreAttention")
        rope = getattr(gpt, "rotary_pos_emb", None)
        if rope is None:
            raise ValueError("model has no rotary_pos_emb; shared-prefix packing needs a RoPE model")
        if not isinstance(rope, PositionRotary):
            gpt.rotary_pos_emb = PositionRotary(rope)
