"""HF architectures (Llama, Qwen2, Qwen3) as megatron-core GPT models.

:func:`megatron_config` maps an HF config to a ``TransformerConfig``; :func:`layer_spec`
picks megatron's local spec on CPU or the Transformer Engine spec where TE imports;
:func:`build_gpt` builds this rank's model chunk(s) for the current parallel state. Parameter
names and shapes equal :func:`megatron_rl.resharding.layout.megatron_rank_tensors`.

Usage (after :func:`megatron_rl.parallel.init_distributed`)::

    hf_config = transformers.AutoConfig.from_pretrained(path)
    chunks = build_gpt(hf_config, parallel=cfg.parallel, dtype=torch.float32)
    load_hf_into(chunks, path)            # megatron_rl.models.hf_weights
    logits = chunks[0](tokens, position_ids, attention_mask=None)   # (B, S, V_pad / TP)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_rl.parallel.grid import LayoutError
from megatron_rl.resharding.layout import ModelShape, padded_vocab

__all__ = ["megatron_config", "layer_spec", "build_gpt", "rope_base", "te_available"]


def te_available() -> bool:
    """True when Transformer Engine's PyTorch part imports (GPU machines only)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises more than ImportError when CUDA is missing
        return False
    return True


def rope_base(hf_config) -> float:
    """``rope_theta`` of an HF config (transformers 5 keeps it in ``rope_parameters``)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    if theta is None:
        theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise LayoutError("model config: rope_theta is missing; fix: set rope_theta in the HF config.json")
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type not in ("default", None):
        raise LayoutError(f"model config: rope_type={rope_type!r} is not supported; fix: use a model with plain RoPE")
    return float(theta)


def megatron_config(hf_config, *, parallel, dtype=torch.float32):
    """The megatron-core ``TransformerConfig`` of ``hf_config`` at ``parallel`` (a ParallelConfig)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    shape = ModelShape.from_hf_config(hf_config)
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise LayoutError(f"model config: hidden_act={act!r} is not supported; fix: use a SwiGLU (silu) model")
    if getattr(hf_config, "mlp_bias", False):
        raise LayoutError("model config: mlp_bias=true is not supported; fix: use a model without MLP biases")
    if shape.arch == "LlamaForCausalLM" and getattr(hf_config, "attention_bias", False):
        # Llama's attention_bias also puts a bias on o_proj, which the layout does not carry.
        raise LayoutError("model config: attention_bias=true is not supported for Llama; fix: use attention_bias=false")
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads, num_query_groups=shape.kv_heads, kv_channels=shape.head_dim,
        normalization="RMSNorm", layernorm_epsilon=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp, sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        pipeline_dtype=dtype, attention_softmax_in_fp32=True, fp32_residual_connection=False,
        # Fused kernels are CUDA-only; on CPU everything runs through plain torch ops.
        apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        cross_entropy_loss_fusion=False, use_cpu_initialization=on_cpu,
    )


def layer_spec(tf_config, *, backend: Optional[str] = None, core_attention=None):
    """The transformer-layer ``ModuleSpec``: ``backend`` is ``"local"``, ``"te"`` or None (TE if it imports).

    ``core_attention`` replaces the core-attention module class (shared-prefix attention);
    with ``context_parallel_size > 1`` on the local spec, the default is
    :class:`megatron_rl.parallel.cp_attention.CPDotProductAttention`.
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if backend is None:
        backend = "te" if te_available() else "local"
    if backend == "te":
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=tf_config.qk_layernorm)
    elif backend == "local":
        spec = specs.get_gpt_layer_local_spec(qk_layernorm=tf_config.qk_layernorm, normalization="RMSNorm")
        if core_attention is None and tf_config.context_parallel_size > 1:
            from megatron_rl.parallel.cp_attention import CPDotProductAttention

            core_attention = CPDotProductAttention
    else:
        raise LayoutError(f"layer spec backend {backend!r} is unknown; fix: use 'local' or 'te'")
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def build_gpt(hf_config, *, parallel, dtype=torch.float32, vocab_divisible_by: int = 128, core_attention=None,
              backend: Optional[str] = None) -> list:
    """This rank's GPTModel chunk(s) (one chunk: no virtual pipeline) for the current parallel state."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    shape = ModelShape.from_hf_config(hf_config)
    tf_config = megatron_config(hf_config, parallel=parallel, dtype=dtype)
    spec = layer_spec(tf_config, backend=backend, core_attention=core_attention)
    model = GPTModel(
        config=tf_config, transformer_layer_spec=spec,
        vocab_size=padded_vocab(shape.vocab, divisible_by=vocab_divisible_by, tp=parallel.tp),
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        parallel_output=True, share_embeddings_and_output_weights=shape.tied,
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=rope_base(hf_config))
    model.unpadded_vocab_size = shape.vocab  # log-probs mask the padded vocab entries
    return [model.to(dtype)]
