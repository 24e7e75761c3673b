"""vLLM's tensor-parallel parameter layout, in the layout algebra of :mod:`layout`.

The facts below are read from the installed vLLM (0.32), not guessed:

- ``QKVParallelLinear`` (``layers/linear.py``): per rank ``[Q_r | K_r | V_r]`` with
  ``heads/t`` query heads starting at head ``r*heads/t``. When ``t >= kv_heads`` each rank
  holds ONE kv head, ``num_kv_head_replicas = t // kv_heads``, and rank r holds kv head
  ``r // num_kv_head_replicas``; otherwise ``kv_heads/t`` kv heads from ``r*kv_heads/t``.
  Biases follow the weight rows.
- ``MergedColumnParallelLinear`` (``gate_up_proj``): ``[gate_r ; up_r]``, each ``ffn/t`` rows.
- ``RowParallelLinear`` (``o_proj``, ``down_proj``): split along dim 1 (``input_dim``).
- ``VocabParallelEmbedding`` / ``ParallelLMHead`` (``vocab_parallel_embedding.py``): vocab
  padded to a multiple of ``DEFAULT_VOCAB_PADDING_SIZE`` (64), split evenly over t; rank r
  holds rows ``[r*n, min((r+1)*n, vocab))`` first and zeros after.
- Tied embeddings (``models/{llama,qwen2,qwen3}.py``): ``lm_head.tie_weights(embed_tokens)``
  makes ``lm_head.weight`` the same Parameter, so only ``model.embed_tokens.weight`` exists.
- Norms (``RMSNorm``; qwen3 ``q_norm``/``k_norm``) are replicated on every rank.
- MoE (``models/qwen3_moe.py``, ``layers/fused_moe/``): the router ``mlp.gate`` is a
  ``GateLinear`` (a ``ReplicatedLinear``: whole on every rank). The experts are one
  ``RoutedExperts`` whose ``w13_weight`` stacks the local experts as ``[E_local, 2*I/t, H]``, each
  ``[gate_r ; up_r]`` (``weight_loader``: shard ``w1`` = gate in rows ``[0, I/t)``, ``w3`` = up in
  ``[I/t, 2I/t)``, both narrowed at ``r*I/t``), and ``w2_weight`` ``[E_local, H, I/t]`` narrowed
  along its input dim. Without vLLM's expert parallelism every rank holds all E experts, each
  split over t (expert TP = TP), so expert e's shard is one :func:`layout.mlp_tensors`; it is
  named ``...routed_experts.w13_weight[e]`` / ``w2_weight[e]`` (the receiver's per-expert slots).
  vLLM refuses ``t > num_experts``.

Usage::

    lay = vllm_layout(shape, tp=2, world_size=4)   # two replicas: ranks {0,1} and {2,3}
    lay.ranks[3]["model.layers.0.self_attn.qkv_proj.weight"].blocks
"""
from __future__ import annotations

from megatron_rl.errors import LayoutError
from megatron_rl.models.shape import ModelShape
from megatron_rl.parallel.grid import RankGrid
from megatron_rl.resharding.layout import LayerNames, Layout, LocalTensor, layer_tensors, replicated, split_blocks

VLLM_VOCAB_PADDING = 64  # vllm.model_executor.layers.vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE


VLLM_LAYER = LayerNames(
    input_norm="model.layers.{i}.input_layernorm.weight",
    post_norm="model.layers.{i}.post_attention_layernorm.weight",
    qkv="model.layers.{i}.self_attn.qkv_proj",
    q_norm="model.layers.{i}.self_attn.q_norm.weight",
    k_norm="model.layers.{i}.self_attn.k_norm.weight",
    o_proj="model.layers.{i}.self_attn.o_proj.weight",
    gate_up="model.layers.{i}.mlp.gate_up_proj.weight",
    down="model.layers.{i}.mlp.down_proj.weight",
    router="model.layers.{i}.mlp.gate.weight",
    expert_gate_up="model.layers.{i}.mlp.experts.routed_experts.w13_weight[{e}]",
    expert_down="model.layers.{i}.mlp.experts.routed_experts.w2_weight[{e}]")


def vllm_padded_vocab(vocab: int, *, tp: int) -> int:
    """vLLM's padded vocab (``pad_vocab_size``); it must split evenly over ``tp``."""
    padded = -(-vocab // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
    if padded % tp:
        raise LayoutError.of("rollout.tp", f"{tp} does not divide vLLM's padded vocab {padded}",
                             "choose another rollout.tp")
    return padded


def vllm_kv_heads(shape: ModelShape, *, tp: int, tp_rank: int) -> list[int]:
    """The kv heads rank ``tp_rank`` holds (one replicated head when ``tp >= kv_heads``)."""
    if tp >= shape.kv_heads:
        if tp % shape.kv_heads:
            raise LayoutError.of("rollout.tp", f"{tp} > num_key_value_heads={shape.kv_heads} but is not a multiple "
                                 "of it", "choose a rollout.tp that divides, or is a multiple of, the kv heads")
        return [tp_rank // (tp // shape.kv_heads)]
    if shape.kv_heads % tp:
        raise LayoutError.of("rollout.tp", f"{tp} does not divide num_key_value_heads={shape.kv_heads}",
                             "choose a rollout.tp that divides, or is a multiple of, the kv heads")
    n = shape.kv_heads // tp
    return list(range(tp_rank * n, (tp_rank + 1) * n))


def check_vllm_heads(shape: ModelShape, *, tp: int) -> None:
    """vLLM splits the query heads and the MLP rows (every expert's, for MoE) evenly over ``tp``."""
    if shape.heads % tp:
        raise LayoutError.of("rollout.tp", f"{tp} does not divide num_attention_heads={shape.heads}",
                             "choose a rollout.tp that divides the attention heads")
    if shape.moe is not None:
        if tp > shape.moe.experts:  # Qwen3MoeSparseMoeBlock raises on this
            raise LayoutError.of("rollout.tp", f"{tp} is greater than num_experts={shape.moe.experts}",
                                 "choose a rollout.tp of at most the number of experts")
        if shape.moe.ffn % tp:
            raise LayoutError.of("rollout.tp", f"{tp} does not divide moe_intermediate_size={shape.moe.ffn}",
                                 "choose a rollout.tp that divides moe_intermediate_size")
    elif shape.ffn % tp:
        raise LayoutError.of("rollout.tp", f"{tp} does not divide intermediate_size={shape.ffn}",
                             "choose a rollout.tp that divides intermediate_size")


def vllm_layer_tensors(shape: ModelShape, *, tp: int, tp_rank: int, layer: int) -> dict[str, LocalTensor]:
    """The local tensors of decoder layer ``layer`` on vLLM tp rank ``tp_rank``."""
    check_vllm_heads(shape, tp=tp)
    nh = shape.heads // tp
    return layer_tensors(shape, names=VLLM_LAYER, layer=layer, local_layer=layer, tp=tp, tp_rank=tp_rank,
                         q_heads=range(tp_rank * nh, (tp_rank + 1) * nh),
                         kv_heads=vllm_kv_heads(shape, tp=tp, tp_rank=tp_rank), interleave=False,
                         experts=range(shape.moe.experts) if shape.moe is not None else range(0))


def vllm_rank_tensors(shape: ModelShape, *, tp: int, tp_rank: int) -> dict[str, LocalTensor]:
    """Every parameter of one vLLM tp rank, named as vLLM's ``model.named_parameters()``."""
    h = shape.hidden
    check_vllm_heads(shape, tp=tp)  # the heads' rule names the problem before the vocab's does
    vp = vllm_padded_vocab(shape.vocab, tp=tp)
    out: dict[str, LocalTensor] = {}
    emb = split_blocks("model.embed_tokens.weight", total=vp, parts=tp, index=tp_rank, valid=shape.vocab)
    out["model.embed_tokens.weight"] = LocalTensor("model.embed_tokens.weight", (vp // tp, h), 0, emb)
    for i in range(shape.layers):
        out.update(vllm_layer_tensors(shape, tp=tp, tp_rank=tp_rank, layer=i))
    out["model.norm.weight"] = replicated("model.norm.weight", "model.norm.weight", (h,))
    if not shape.tied:  # tied: lm_head.weight IS model.embed_tokens.weight (one Parameter)
        head = split_blocks("lm_head.weight", total=vp, parts=tp, index=tp_rank, valid=shape.vocab)
        out["lm_head.weight"] = LocalTensor("lm_head.weight", (vp // tp, h), 0, head)
    return out


def vllm_layout(shape: ModelShape, *, tp: int, world_size: int, replica_ranks: list[list[int]] | None = None) -> Layout:
    """vLLM's layout over the SPMD world: replicas of ``tp`` ranks each.

    ``replica_ranks`` lists each replica's ranks in tp order; by default vLLM's
    external-launcher order ``rank = replica*tp + tp_rank`` filling the world.
    """
    RankGrid(world_size=world_size).check_rollout_tp(tp)
    if replica_ranks is None:
        grid = RankGrid(world_size=world_size)
        replica_ranks = [grid.rollout_ranks(r, rollout_tp=tp) for r in range(world_size // tp)]
    seen = [r for ranks in replica_ranks for r in ranks]
    if any(len(ranks) != tp for ranks in replica_ranks) or len(set(seen)) != len(seen) \
            or any(not 0 <= r < world_size for r in seen):
        raise LayoutError(f"rollout replica ranks {replica_ranks} must be disjoint lists of {tp} ranks in "
                          f"[0, {world_size}); fix: pass one list of rollout.tp ranks per replica")
    lay = Layout("vllm", shape.canonical_shapes())
    for ranks in replica_ranks:
        for tp_rank, rank in enumerate(ranks):
            lay.ranks[rank] = vllm_rank_tensors(shape, tp=tp, tp_rank=tp_rank)
    return lay
