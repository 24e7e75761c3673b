"""HF architectures (Llama, Qwen2, Qwen3, Qwen3-MoE) as megatron-core GPT models.

:func:`megatron_config` maps an HF config to a ``TransformerConfig``; :func:`layer_spec`
picks megatron's local spec on CPU or the Transformer Engine spec where TE imports;
:func:`build_gpt` builds this rank's model chunk(s) for the current parallel state. Parameter
names and shapes equal :func:`megatron_rl.resharding.layout.megatron_rank_tensors`.

Usage (after :func:`megatron_rl.parallel.init_distributed`)::

    hf_config = transformers.AutoConfig.from_pretrained(path)
    chunks = build_gpt(hf_config, parallel=cfg.parallel, dtype=torch.float32)
    load_hf_into(chunks, path, topo=topo)  # megatron_rl.checkpoint.megatron
    logits = chunks[0](tokens, position_ids, attention_mask=None)   # (B, S, V_pad / TP)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_rl.errors import LayoutError
from megatron_rl.models.shape import ModelShape, padded_vocab
from megatron_rl.parallel.cp_attention import CPDotProductAttention


__all__ = ["megatron_config", "layer_spec", "build_gpt", "rope_base", "rope_spec", "rope_inv_freq", "RopeError",
           "ROPE_KEYS", "RECOMPUTE", "te_available"]


def te_available() -> bool:
    """True when Transformer Engine's PyTorch part imports (GPU machines only)."""
    try:
        import transformer_engine.pytorch  # noqa: F401  # lazy: keeps vLLM/megatron out of CLI start-up
    except Exception:  # TE raises more than ImportError when CUDA is missing
        return False
    return True


# RoPE scalings that megatron (through our inv_freq, below) and vLLM 0.32 (get_rope) both run, with
# the rope_parameters keys each reads. HF's modeling_rope_utils defines the formulas.
ROPE_KEYS = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}),
}
_ROPE_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


class RopeError(LayoutError):
    """An HF rope configuration we cannot train exactly; ``problem`` and ``fix`` make one line."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"model config: {problem}; fix: {fix}")


def rope_spec(hf_config) -> dict:
    """The validated rope parameters of ``hf_config``: ``rope_type``, ``rope_theta`` and the type's keys.

    transformers 5 keeps them in ``rope_parameters`` (older configs: ``rope_theta`` + ``rope_scaling``).
    Raises :class:`RopeError` for a type outside :data:`ROPE_KEYS` or missing / invalid parameters.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise RopeError("rope_parameters per layer type are not supported", "use a model with one RoPE for all layers")
    spec = dict(params)
    spec["rope_type"] = spec.pop("type", None) or spec.get("rope_type") or "default"
    if spec.get("rope_theta") is None:
        spec["rope_theta"] = getattr(hf_config, "rope_theta", None)
    if spec["rope_theta"] is None:
        raise RopeError("rope_theta is missing", "set rope_parameters.rope_theta in the HF config.json")
    kind = spec["rope_type"]
    if kind not in ROPE_KEYS:
        raise RopeError(f"rope_parameters.rope_type={kind!r} is not supported",
                        f"use a model whose rope_type is one of {', '.join(ROPE_KEYS)}")
    required, optional = ROPE_KEYS[kind]
    missing = sorted(k for k in required if spec.get(k) is None)
    if missing:
        raise RopeError(f"rope_type={kind!r} needs rope_parameters.{missing[0]}", "add it to the HF config.json")
    extra = sorted(set(spec) - required - optional - _ROPE_COMMON)
    if extra:
        raise RopeError(f"rope_parameters.{extra[0]} is not supported for rope_type={kind!r}",
                        f"remove it; rope_type={kind!r} reads {sorted(required | optional) or 'no other keys'}")
    if float(spec.get("partial_rotary_factor", 1.0)) != 1.0:
        raise RopeError("rope_parameters.partial_rotary_factor != 1 is not supported", "use a model with full RoPE")
    if kind != "default" and not float(spec["factor"]) >= 1.0:
        raise RopeError(f"rope_parameters.factor={spec['factor']} must be >= 1", "use the model's published factor")
    if kind == "llama3" and not float(spec["low_freq_factor"]) < float(spec["high_freq_factor"]):
        raise RopeError("rope_parameters.low_freq_factor must be < high_freq_factor", "use e.g. 1.0 and 4.0")
    return spec


def rope_base(hf_config) -> float:
    """``rope_theta`` of an HF config (transformers 5 keeps it in ``rope_parameters``)."""
    return float(rope_spec(hf_config)["rope_theta"])


def _yarn_mscale(factor: float, m: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def rope_inv_freq(hf_config) -> tuple:
    """``(inv_freq, attention_factor)`` of HF's RoPE for ``hf_config``: inv_freq is (head_dim/2,) fp32,
    attention_factor multiplies cos and sin (yarn; 1.0 otherwise). Our own code, after HF's formulas."""
    spec, head_dim = rope_spec(hf_config), ModelShape.from_hf_config(hf_config).head_dim
    base, kind = float(spec["rope_theta"]), spec["rope_type"]
    # host math (explicit cpu: also under a meta device context, as plan builds)
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    inv_freq = 1.0 / (base ** exponent)
    if kind == "linear":
        return inv_freq / float(spec["factor"]), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, spec), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(base ** exponent, spec, head_dim)
    return inv_freq, 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, spec: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend linearly in between."""
    factor, lo, hi = float(spec["factor"]), float(spec["low_freq_factor"]), float(spec["high_freq_factor"])
    context = float(spec["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / lo, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / hi) & (wavelen <= context / lo)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(pos_freqs: torch.Tensor, spec: dict, dim: int) -> tuple:
    """YaRN: interpolate low frequencies by ``factor`` with a linear ramp over the correction range."""
    factor, base = float(spec["factor"]), float(spec["rope_theta"])
    context = float(spec["original_max_position_embeddings"])
    beta_fast, beta_slow = spec.get("beta_fast") or 32, spec.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if spec.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / ((high - low) or 0.001), 0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    attention = spec.get("attention_factor")
    if attention is None:
        m, m_all = spec.get("mscale"), spec.get("mscale_all_dim")
        attention = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)
    return inv_freq, float(attention)


def _install_rope(model, hf_config) -> None:
    """Replace megatron's inv_freq by HF's (megatron's own llama3 scaling hard-codes 1/4/8192)."""
    inv_freq, _ = rope_inv_freq(hf_config)
    rope = model.rotary_pos_emb
    rope.inv_freq = inv_freq.to(rope.inv_freq.device)
    rope.forward.cache_clear()  # megatron lru-caches embeddings per length


# train.recompute -> megatron-core's activation recompute settings. full: every layer's input is kept and
# the layer re-run in backward (uniform, 1 layer per unit); selective: only core attention is re-run.
RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
}


def megatron_config(hf_config, *, parallel, dtype=torch.float32, recompute: str = "none",
                    routing_replay: bool = False):
    """The megatron-core ``TransformerConfig`` of ``hf_config`` at ``parallel`` (a ParallelConfig).

    ``recompute``: a key of :data:`RECOMPUTE` (``train.recompute``). ``routing_replay``: every MoE
    router gets megatron's ``RouterReplay`` (``megatron_rl.train.routing`` drives it)."""
    if recompute not in RECOMPUTE:
        raise LayoutError(f"recompute={recompute!r} is unknown; fix: use one of {', '.join(RECOMPUTE)}")
    # lazy: keeps vLLM/megatron out of CLI start-up
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
    if shape.moe is not None:
        check_moe_parallel(parallel)
    _, attention_factor = rope_inv_freq(hf_config)
    # YaRN scales cos and sin by attention_factor, i.e. every q.k score by its square.
    softmax_scale = None if attention_factor == 1.0 else attention_factor ** 2 / math.sqrt(shape.head_dim)
    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads, num_query_groups=shape.kv_heads, kv_channels=shape.head_dim,
        normalization="RMSNorm", layernorm_epsilon=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm, hidden_dropout=0.0, attention_dropout=0.0, softmax_scale=softmax_scale,
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp, sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        pipeline_dtype=dtype, attention_softmax_in_fp32=True, fp32_residual_connection=False,
        # Fused kernels are CUDA-only; on CPU everything runs through plain torch ops.
        apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        cross_entropy_loss_fusion=False, use_cpu_initialization=on_cpu, **RECOMPUTE[recompute],
        **moe_config(shape, ep=parallel.ep, routing_replay=routing_replay),
    )


def check_moe_parallel(parallel) -> None:
    """megatron-core's rule for an MoE model's TP: sequence parallel with it. (Over gloo the
    dispatcher's uneven gathers go through patch 13 of ``megatron_compat``.)"""
    if parallel.tp > 1 and not parallel.sequence_parallel:
        raise LayoutError.of("parallel.sequence_parallel", "false with an MoE model at parallel.tp > 1 "
                             "(megatron-core requires it)", "set parallel.sequence_parallel=true")


def moe_config(shape: ModelShape, *, ep: int, routing_replay: bool = False) -> dict:
    """megatron-core's MoE settings for ``shape`` at expert parallelism ``ep`` ({} for a dense model).

    Qwen3-MoE routes by softmax over all experts, then top-k; with ``norm_topk_prob`` the k weights
    are renormalised, which is megatron's top-k-then-softmax (``moe_router_pre_softmax=False``);
    without it megatron's softmax-then-top-k (``pre_softmax=True``). Load balancing is megatron's
    per-layer auxiliary loss (``aux_loss``) with HF's ``router_aux_loss_coef``; HF computes its
    loss once over all layers' router logits, so the two differ in value (not in aim). Tokens move
    with the all-to-all dispatcher (gloo on CPU); experts are megatron's SequentialMLP (local
    spec) or TEGroupedMLP (TE spec: :func:`layer_spec`). Expert TP equals TP."""
    moe = shape.moe
    if moe is None:
        return {}
    return dict(num_moe_experts=moe.experts, moe_router_topk=moe.topk, moe_ffn_hidden_size=moe.ffn,
                moe_router_pre_softmax=not moe.norm_topk, moe_router_score_function="softmax",
                moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coef > 0 else "none",
                moe_aux_loss_coeff=moe.aux_loss_coef, moe_token_dispatcher_type="alltoall",
                expert_model_parallel_size=ep, moe_router_dtype="fp32",
                moe_permute_fusion=False, moe_enable_routing_replay=routing_replay)


def layer_spec(tf_config, *, backend: Optional[str] = None, core_attention=None):
    """The transformer-layer ``ModuleSpec``: ``backend`` is ``"local"``, ``"te"`` or None (TE if it imports).

    ``core_attention`` replaces the core-attention module class (shared-prefix attention);
    with ``context_parallel_size > 1`` on the local spec, the default is
    :class:`megatron_rl.parallel.cp_attention.CPDotProductAttention`.
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs  # lazy: keeps vLLM/megatron out of CLI start-up

    if backend is None:
        backend = "te" if te_available() else "local"
    # MoE experts: TE's grouped GEMM (TEGroupedMLP) under TE, megatron's SequentialMLP in the local spec.
    experts = dict(num_experts=tf_config.num_moe_experts, moe_grouped_gemm=backend == "te")
    if backend == "te":
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=tf_config.qk_layernorm, **experts)
    elif backend == "local":
        spec = specs.get_gpt_layer_local_spec(qk_layernorm=tf_config.qk_layernorm, normalization="RMSNorm",
                                              **experts)
        if core_attention is None and tf_config.context_parallel_size > 1:
            core_attention = CPDotProductAttention
    else:
        raise LayoutError(f"layer spec backend {backend!r} is unknown; fix: use 'local' or 'te'")
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def _stage(topo) -> tuple[bool, bool, object]:
    """(pre_process, post_process, pg_collection) of this rank."""
    if topo is not None:
        return topo.is_first_stage, topo.is_last_stage, topo.pg_collection
    from megatron.core.process_groups_config import ProcessGroupCollection  # lazy: keeps megatron out of CLI start-up

    pp = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["pp"]).pp  # megatron's default groups
    return pp.rank() == 0, pp.rank() == pp.size() - 1, None


def build_gpt(hf_config, *, parallel, topo=None, dtype=torch.float32, vocab_divisible_by: int = 128,
              core_attention=None, backend: Optional[str] = None, recompute: str = "none",
              value_head: bool = False, routing_replay: bool = False) -> list:
    """This rank's GPTModel chunk(s) (one chunk: no virtual pipeline) on ``topo``'s groups.

    ``topo`` (the :class:`~megatron_rl.parallel.Topology` from ``init_distributed``) gives the
    pipeline stage and the ``pg_collection`` every layer (and ``core_attention``) receives.
    Without it megatron-core picks its default groups and the stage is asked of them (for
    callers not yet passing a topology).
    The rotary embedding's ``inv_freq`` is HF's (:func:`rope_inv_freq`) for every scaled rope type.

    ``value_head=True`` builds PPO's critic: untied embeddings, and on the last stage a scalar
    :class:`~megatron_rl.models.value_head.ValueHead` instead of the vocabulary projection
    (the model returns ``(B, S, 1)`` values). ``routing_replay``: see :func:`megatron_config`."""
    from megatron.core.models.gpt import GPTModel  # lazy: keeps vLLM/megatron out of CLI start-up

    shape = ModelShape.from_hf_config(hf_config)
    tf_config = megatron_config(hf_config, parallel=parallel, dtype=dtype, recompute=recompute,
                                routing_replay=routing_replay)
    spec = layer_spec(tf_config, backend=backend, core_attention=core_attention)
    first, last, pgc = _stage(topo)
    model = GPTModel(
        config=tf_config, transformer_layer_spec=spec,
        vocab_size=padded_vocab(shape.vocab, divisible_by=vocab_divisible_by, tp=parallel.tp),
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
        pre_process=first, post_process=last, pg_collection=pgc,
        parallel_output=True, share_embeddings_and_output_weights=shape.tied and not value_head,
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=rope_base(hf_config))
    if rope_spec(hf_config)["rope_type"] != "default":
        _install_rope(model, hf_config)
    model.unpadded_vocab_size = shape.vocab  # log-probs mask the padded vocab entries
    if value_head and last:
        from megatron_rl.models.value_head import install_value_head  # lazy: keeps megatron out of CLI start-up

        install_value_head(model, tp_group=model.pg_collection.tp)
    return [model.to(dtype)]
