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

from megatron_rl.errors import LayoutError

# The HF architectures every room supports: the layouts, conversion, megatron models, vLLM.
SUPPORTED_ARCHS = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


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

    @staticmethod
    def from_hf_config(cfg) -> "ModelShape":
        arch = (getattr(cfg, "architectures", None) or [""])[0]
        if arch not in SUPPORTED_ARCHS:
            raise LayoutError(f"model architecture {arch!r} is not supported; fix: use one of {sorted(SUPPORTED_ARCHS)}")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        qkv_bias = bool(getattr(cfg, "attention_bias", False)) or arch == "Qwen2ForCausalLM"
        return ModelShape(hidden=cfg.hidden_size, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", heads),
                          head_dim=head_dim, ffn=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                          vocab=cfg.vocab_size, tied=bool(getattr(cfg, "tie_word_embeddings", False)),
                          qkv_bias=qkv_bias, qk_norm=arch == "Qwen3ForCausalLM", arch=arch)

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
            out[p + "mlp.gate_proj.weight"] = (self.ffn, h)
            out[p + "mlp.up_proj.weight"] = (self.ffn, h)
            out[p + "mlp.down_proj.weight"] = (h, self.ffn)
        return out


def padded_vocab(vocab: int, *, divisible_by: int, tp: int) -> int:
    """Megatron-side padded vocab: a multiple of lcm(divisible_by, tp).

    Unlike Megatron-LM's ``divisible_by * tp``, the result does not change with TP when
    ``divisible_by`` is a multiple of TP, so checkpoints reshard across TP unchanged.
    """
    m = math.lcm(divisible_by, tp)
    return -(-vocab // m) * m
