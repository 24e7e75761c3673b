"""The model's shape: the few numbers that decide every parallel layout, and the supported
HF architectures. Pure Python: no torch, megatron-core or vLLM, so config validation and the
layout algebra can use it anywhere::

    shape = ModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(path))
    shape.canonical_shapes()["model.embed_tokens.weight"]     # (vocab, hidden)
    padded_vocab(shape.vocab, divisible_by=128, tp=2)         # Megatron's padded vocab
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_rl.errors import LayoutError

# The HF architectures every room supports: the layouts, conversion, megatron models, vLLM.
SUPPORTED_ARCHS = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"}
MOE_ARCHS = {"Qwen3MoeForCausalLM"}


@dataclass(frozen=True)
class MoeShape:
    """A mixture-of-experts MLP in every layer: ``experts`` routed experts of ``ffn`` each, ``topk``
    per token; ``norm_topk`` renormalises the chosen softmax weights to sum to 1 (HF ``norm_topk_prob``)."""

    experts: int
    topk: int
    ffn: int
    norm_topk: bool
    aux_loss_coef: float = 0.0

    @staticmethod
    def from_hf_config(cfg) -> "MoeShape":
        # Qwen3-MoE interleaves dense layers through these two keys; every layer must be MoE here.
        if getattr(cfg, "decoder_sparse_step", 1) != 1 or list(getattr(cfg, "mlp_only_layers", None) or []):
            raise LayoutError("model config: decoder_sparse_step != 1 or mlp_only_layers (dense layers between MoE "
                              "layers) is not supported; fix: use a model with an MoE MLP in every layer")
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            raise LayoutError("model config: shared experts are not supported; fix: use a model without them")
        experts, topk = cfg.num_experts, cfg.num_experts_per_tok
        if not 1 <= topk <= experts:
            raise LayoutError(f"model config: num_experts_per_tok={topk} must be in [1, num_experts={experts}]; "
                              "fix: use the model's published values")
        return MoeShape(experts=experts, topk=topk, ffn=cfg.moe_intermediate_size,
                        norm_topk=bool(getattr(cfg, "norm_topk_prob", False)),
                        aux_loss_coef=float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0))


@dataclass(frozen=True)
class ModelShape:
    """The few numbers that decide every layout (no framework objects)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    layers: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    arch: str = "LlamaForCausalLM"
    moe: Optional[MoeShape] = None  # None: a dense MLP (``ffn``) in every layer

    @staticmethod
    def from_hf_config(cfg) -> "ModelShape":
        arch = (getattr(cfg, "architectures", None) or [""])[0]
        if arch not in SUPPORTED_ARCHS:
            raise LayoutError(f"model architecture {arch!r} is not supported; fix: use one of {sorted(SUPPORTED_ARCHS)}")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        qkv_bias = bool(getattr(cfg, "attention_bias", False)) or arch == "Qwen2ForCausalLM"
        moe = MoeShape.from_hf_config(cfg) if arch in MOE_ARCHS else None
        return ModelShape(moe=moe, hidden=cfg.hidden_size, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", heads),
                          head_dim=head_dim, ffn=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                          vocab=cfg.vocab_size, tied=bool(getattr(cfg, "tie_word_embeddings", False)),
                          qkv_bias=qkv_bias, qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
                          arch=arch)

    @property
    def q_per_group(self) -> int:
        return self.heads // self.kv_heads

    def canonical_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the HF checkpoint, with its shape (``lm_head`` only when untied)."""
        h, d = self.hidden, self.head_dim
        out = {"model.embed_tokens.weight": (self.vocab, h), "model.norm.weight": (h,)}
        if not self.tied:
            out["lm_head.weight"] = (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "post_attention_layernorm.weight"] = (h,)
            for proj, rows in (("q", self.heads * d), ("k", self.kv_heads * d), ("v", self.kv_heads * d)):
                out[f"{p}self_attn.{proj}_proj.weight"] = (rows, h)
                if self.qkv_bias:
                    out[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
            if self.qk_norm:
                out[p + "self_attn.q_norm.weight"] = (d,)
                out[p + "self_attn.k_norm.weight"] = (d,)
            out[p + "self_attn.o_proj.weight"] = (h, self.heads * d)
            out.update(self._mlp_shapes(p + "mlp."))
        return out

    def _mlp_shapes(self, p: str) -> dict[str, tuple[int, ...]]:
        """The MLP of one layer: dense gate/up/down, or the router (``gate``) and every expert's three."""
        h = self.hidden
        if self.moe is None:
            return {p + "gate_proj.weight": (self.ffn, h), p + "up_proj.weight": (self.ffn, h),
                    p + "down_proj.weight": (h, self.ffn)}
        f = self.moe.ffn
        out = {p + "gate.weight": (self.moe.experts, h)}
        for e in range(self.moe.experts):
            out[f"{p}experts.{e}.gate_proj.weight"] = (f, h)
            out[f"{p}experts.{e}.up_proj.weight"] = (f, h)
            out[f"{p}experts.{e}.down_proj.weight"] = (h, f)
        return out


def padded_vocab(vocab: int, *, divisible_by: int, tp: int) -> int:
    """Megatron-side padded vocab: a multiple of lcm(divisible_by, tp).

    Unlike Megatron-LM's ``divisible_by * tp``, the result does not change with TP when
    ``divisible_by`` is a multiple of TP, so checkpoints reshard across TP unchanged.
    """
    m = math.lcm(divisible_by, tp)
    return -(-vocab // m) * m
