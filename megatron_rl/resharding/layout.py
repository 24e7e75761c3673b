"""The layout algebra: which region of which canonical tensor every local tensor holds.

A *canonical* tensor is an unsharded HF tensor (``model.layers.3.self_attn.q_proj.weight``).
A framework rank holds *local* tensors (``decoder.layers.1.self_attention.linear_qkv.weight``).
A :class:`LocalTensor` is split along one dimension ``dim`` into :class:`Block` s; each block
is a run of ``length`` slices along ``dim`` that equals the run starting at ``canon_start`` of
the canonical tensor ``canon`` (every other dimension is taken whole). Slices that no block
covers are padding and hold zeros (vocab padding).

One description serves checkpoint conversion, offline resharding and live weight sync:
a :class:`Layout` maps each rank to its local tensors; the planner matches two layouts.
The QKV split is written once (:func:`qkv_blocks`), parameterised by head counts, and
serves Megatron's per-group interleave and vLLM's ``[Q_r | K_r | V_r]`` with kv replication.

Usage::

    shape = ModelShape.from_hf_config(hf_config)
    lay = megatron_layout(shape, RankGrid(world_size=4, tp=2, pp=2))
    for name, lt in lay.ranks[3].items():
        local = assemble(lt, read=lambda canon, dim, start, n: hf[canon].narrow(dim, start, n))
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import torch

from megatron_rl.errors import LayoutError
# ModelShape, SUPPORTED_ARCHS and padded_vocab live in models/shape.py; importable from here too.
from megatron_rl.models.shape import SUPPORTED_ARCHS, ModelShape, padded_vocab  # noqa: F401


if TYPE_CHECKING:  # annotations only: importing parallel runs its torch-importing __init__
    from megatron_rl.parallel.grid import RankGrid


@dataclass(frozen=True)
class Block:
    """``local[local_start : local_start+length]`` along ``dim`` == ``canon[canon_start : ...]``."""

    local_start: int
    length: int
    canon: str
    canon_start: int


@dataclass(frozen=True)
class LocalTensor:
    name: str
    shape: tuple[int, ...]
    dim: int
    blocks: tuple[Block, ...]

    @property
    def slice_numel(self) -> int:
        """Elements in one slice along ``dim`` (the product of the other dimensions)."""
        return math.prod(s for i, s in enumerate(self.shape) if i != self.dim)


@dataclass
class Layout:
    """Per-rank local tensors of one framework, plus the canonical shapes they draw from."""

    framework: str
    canon_shapes: dict[str, tuple[int, ...]]
    ranks: dict[int, dict[str, LocalTensor]] = field(default_factory=dict)

    def local(self, rank: int) -> dict[str, LocalTensor]:
        return self.ranks.get(rank, {})


# ---------------------------------------------------------------------------------------------
# Building blocks, written once.


def _coalesce(blocks: Iterable[Block]) -> tuple[Block, ...]:
    """Merge blocks that continue each other both locally and canonically."""
    out: list[Block] = []
    for b in blocks:
        if out and out[-1].canon == b.canon and out[-1].local_start + out[-1].length == b.local_start \
                and out[-1].canon_start + out[-1].length == b.canon_start:
            prev = out.pop()
            b = Block(prev.local_start, prev.length + b.length, b.canon, prev.canon_start)
        out.append(b)
    return tuple(out)


def qkv_blocks(prefix: str, suffix: str, shape: ModelShape, *, q_heads: range, kv_heads: list[int],
               interleave: bool) -> tuple[tuple[Block, ...], int]:
    """Blocks of a fused QKV tensor (``suffix`` is ``weight`` or ``bias``) and its local row count.

    ``interleave=True`` is Megatron's layout: per query group ``g`` in ``kv_heads``, the
    group's q heads, then k head g, then v head g. ``interleave=False`` is vLLM's: all of
    ``q_heads``, then the k heads ``kv_heads``, then the v heads (kv heads may repeat a head
    held by another rank: replication). ``prefix`` is ``model.layers.{i}.self_attn.``.
    """
    d, qpg = shape.head_dim, shape.q_per_group
    q, k, v = (f"{prefix}{p}_proj.{suffix}" for p in ("q", "k", "v"))
    blocks, row = [], 0

    def put(canon, head):
        nonlocal row
        blocks.append(Block(row, d, canon, head * d))
        row += d

    if interleave:
        for g in kv_heads:
            for hq in range(g * qpg, (g + 1) * qpg):
                put(q, hq)
            put(k, g)
            put(v, g)
    else:
        for hq in q_heads:
            put(q, hq)
        for g in kv_heads:
            put(k, g)
        for g in kv_heads:
            put(v, g)
    return _coalesce(blocks), row


def split_blocks(canon: str, *, total: int, parts: int, index: int, local_offset: int = 0,
                 valid: Optional[int] = None) -> tuple[Block, ...]:
    """The ``index``-th of ``parts`` equal runs of a canonical dim of size ``total``.

    ``valid`` (<= total) clips the run to the canonical extent: slices past it are padding.
    """
    if total % parts:
        raise LayoutError(f"{canon}: size {total} is not divisible into {parts} shards")
    n = total // parts
    start = index * n
    end = min(start + n, total if valid is None else valid)
    if end <= start:
        return ()
    return (Block(local_offset, end - start, canon, start),)


def replicated(name: str, canon: str, shape: tuple[int, ...]) -> LocalTensor:
    return LocalTensor(name, tuple(shape), 0, (Block(0, shape[0], canon, 0),))


def hf_layout(shape: ModelShape, *, rank: int = 0) -> Layout:
    """The HF checkpoint as a layout: one rank holds every canonical tensor whole."""
    canon = shape.canonical_shapes()
    lay = Layout("hf", canon)
    lay.ranks[rank] = {n: replicated(n, n, s) for n, s in canon.items()}
    return lay


# ---------------------------------------------------------------------------------------------
# Decoder layers, for any framework; Megatron-core (local and Transformer Engine specs).


@dataclass(frozen=True)
class LayerNames:
    """Local names of one decoder layer's tensors in a framework (``{i}`` = local layer index)."""

    input_norm: str
    post_norm: str
    qkv: str  # fused QKV; ``.weight`` / ``.bias`` are appended
    q_norm: str
    k_norm: str
    o_proj: str
    gate_up: str
    down: str
    router: str = ""  # MoE: the router's weight; experts' gate_up / down with ``{e}`` = local expert index
    expert_gate_up: str = ""
    expert_down: str = ""


MEGATRON_LAYER = LayerNames(
    input_norm="decoder.layers.{i}.input_layernorm.weight",
    post_norm="decoder.layers.{i}.pre_mlp_layernorm.weight",
    qkv="decoder.layers.{i}.self_attention.linear_qkv",
    q_norm="decoder.layers.{i}.self_attention.q_layernorm.weight",
    k_norm="decoder.layers.{i}.self_attention.k_layernorm.weight",
    o_proj="decoder.layers.{i}.self_attention.linear_proj.weight",
    gate_up="decoder.layers.{i}.mlp.linear_fc1.weight",
    down="decoder.layers.{i}.mlp.linear_fc2.weight",
    router="decoder.layers.{i}.mlp.router.weight",
    expert_gate_up="decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight",
    expert_down="decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight")
# Transformer Engine fuses the two norms into the following linear layers.
MEGATRON_TE_LAYER = dataclasses.replace(
    MEGATRON_LAYER, input_norm="decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
    post_norm="decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight")


def mlp_tensors(src: str, *, ffn: int, hidden: int, gate_up: str, down: str, tp: int,
                tp_rank: int) -> dict[str, LocalTensor]:
    """One SwiGLU MLP (dense, or one expert) at ``tp_rank`` of ``tp``: ``gate_up`` is the fused
    ``[gate_r; up_r]`` (rows), ``down`` splits along dim 1. ``src`` is the HF prefix of its
    ``gate_proj`` / ``up_proj`` / ``down_proj``."""
    f = ffn // tp
    fused = split_blocks(src + "gate_proj.weight", total=ffn, parts=tp, index=tp_rank) + \
        split_blocks(src + "up_proj.weight", total=ffn, parts=tp, index=tp_rank, local_offset=f)
    return {gate_up: LocalTensor(gate_up, (2 * f, hidden), 0, fused),
            down: LocalTensor(down, (hidden, f), 1,
                              split_blocks(src + "down_proj.weight", total=ffn, parts=tp, index=tp_rank))}


def experts_of(shape: ModelShape, *, ep: int, ep_rank: int) -> range:
    """The global experts that expert-parallel rank ``ep_rank`` of ``ep`` holds: a contiguous run."""
    n = shape.moe.experts // ep
    return range(ep_rank * n, (ep_rank + 1) * n)


def moe_tensors(shape: ModelShape, *, names: LayerNames, src: str, local_layer: int, tp: int, tp_rank: int,
                experts: range) -> dict[str, LocalTensor]:
    """An MoE MLP: the replicated router (HF ``mlp.gate``) and, for each local expert ``j`` of
    ``experts``, HF expert ``experts[j]`` as one :func:`mlp_tensors` split over ``tp`` (expert TP)."""
    moe, i = shape.moe, local_layer
    out = {}
    router = names.router.format(i=i)
    out[router] = replicated(router, src + "mlp.gate.weight", (moe.experts, shape.hidden))
    for j, e in enumerate(experts):
        out.update(mlp_tensors(f"{src}mlp.experts.{e}.", ffn=moe.ffn, hidden=shape.hidden, tp=tp, tp_rank=tp_rank,
                               gate_up=names.expert_gate_up.format(i=i, e=j), down=names.expert_down.format(i=i, e=j)))
    return out


def layer_tensors(shape: ModelShape, *, names: LayerNames, layer: int, local_layer: int, tp: int, tp_rank: int,
                  q_heads: range, kv_heads: list[int], interleave: bool,
                  experts: range = range(0)) -> dict[str, LocalTensor]:
    """The local tensors of one decoder layer at ``tp_rank`` of ``tp``, for any framework.

    The framework enters only through ``names`` and the QKV arrangement (``q_heads``,
    ``kv_heads``, ``interleave``: see :func:`qkv_blocks`). Norms are replicated; o_proj and
    down_proj split along dim 1; gate/up are fused as ``[gate_r; up_r]``. An MoE model's MLP is
    :func:`moe_tensors` over this rank's ``experts``.
    """
    h, d = shape.hidden, shape.head_dim
    src = f"model.layers.{layer}."
    out: dict[str, LocalTensor] = {}

    def add(lt: LocalTensor):
        out[lt.name] = lt

    def local(template: str) -> str:
        return template.format(i=local_layer)

    add(replicated(local(names.input_norm), src + "input_layernorm.weight", (h,)))
    add(replicated(local(names.post_norm), src + "post_attention_layernorm.weight", (h,)))
    for suffix in ("weight", "bias") if shape.qkv_bias else ("weight",):
        blocks, rows = qkv_blocks(src + "self_attn.", suffix, shape, q_heads=q_heads, kv_heads=kv_heads,
                                  interleave=interleave)
        add(LocalTensor(f"{local(names.qkv)}.{suffix}", (rows, h) if suffix == "weight" else (rows,), 0, blocks))
    if shape.qk_norm:
        add(replicated(local(names.q_norm), src + "self_attn.q_norm.weight", (d,)))
        add(replicated(local(names.k_norm), src + "self_attn.k_norm.weight", (d,)))
    qdim = shape.heads * d
    add(LocalTensor(local(names.o_proj), (h, qdim // tp), 1,
                    split_blocks(src + "self_attn.o_proj.weight", total=qdim, parts=tp, index=tp_rank)))
    if shape.moe is not None:
        out.update(moe_tensors(shape, names=names, src=src, local_layer=local_layer, tp=tp, tp_rank=tp_rank,
                               experts=experts))
    else:
        out.update(mlp_tensors(src + "mlp.", ffn=shape.ffn, hidden=h, gate_up=local(names.gate_up),
                               down=local(names.down), tp=tp, tp_rank=tp_rank))
    return out


def uses_te_names(param_names) -> bool:
    """True when a model's parameters carry Transformer Engine's names: TE fuses each norm into
    the next linear (``...linear_qkv.layer_norm_weight``, ``...linear_fc1.layer_norm_weight``)."""
    return any(n.endswith(("linear_qkv.layer_norm_weight", "linear_fc1.layer_norm_weight")) for n in param_names)


# Megatron's MoE layer under Transformer Engine: the norm before the MoE MLP stays separate, and the
# grouped experts (TEGroupedMLP) hold expert j as ``linear_fc1.weight{j}`` (TE GroupedLinear).
MEGATRON_TE_MOE_LAYER = dataclasses.replace(
    MEGATRON_TE_LAYER, post_norm=MEGATRON_LAYER.post_norm,
    expert_gate_up="decoder.layers.{i}.mlp.experts.linear_fc1.weight{e}",
    expert_down="decoder.layers.{i}.mlp.experts.linear_fc2.weight{e}")


def check_experts(shape: ModelShape, *, ep: int) -> None:
    """The expert-parallel rules of the model: EP needs experts, and whole experts per EP rank."""
    if shape.moe is None:
        if ep > 1:
            raise LayoutError.of("parallel.ep", f"{ep} needs a mixture-of-experts model ({shape.arch} is dense)",
                                 "set parallel.ep=1")
        return
    if shape.moe.experts % ep:
        raise LayoutError.of("parallel.ep", f"{ep} does not divide num_experts={shape.moe.experts}",
                             "choose a parallel.ep that divides the number of experts")


def megatron_layer_tensors(shape: ModelShape, *, tp: int, tp_rank: int, layer: int, local_layer: int,
                           te_names: bool = False, ep: int = 1, ep_rank: int = 0) -> dict[str, LocalTensor]:
    """The local tensors of one transformer layer at ``tp_rank`` of ``tp``: whole query groups per rank,
    each stored as ``[its q heads | k | v]``. An MoE layer holds expert-parallel rank ``ep_rank``'s
    experts (:func:`experts_of`), each split over the same ``tp`` (megatron's expert TP = TP)."""
    if shape.kv_heads % tp or shape.heads % tp:  # whole query groups per rank (then heads divide too)
        raise LayoutError(f"parallel.tp={tp} does not divide num_query_groups={shape.kv_heads} (heads={shape.heads}); "
                          "fix: choose a tp that divides the kv heads", field="parallel.tp",
                          problem=f"{tp} does not divide num_key_value_heads (query groups)={shape.kv_heads}",
                          fix="choose a parallel.tp that divides the kv heads")
    check_experts(shape, ep=ep)
    ffn, key = (shape.ffn, "intermediate_size") if shape.moe is None else (shape.moe.ffn, "moe_intermediate_size")
    if ffn % tp:
        raise LayoutError.of("parallel.tp", f"{tp} does not divide {key}={ffn}",
                             f"choose a parallel.tp that divides {key}")
    ng = shape.kv_heads // tp
    names = MEGATRON_LAYER
    if te_names:
        names = MEGATRON_TE_LAYER if shape.moe is None else MEGATRON_TE_MOE_LAYER
    experts = experts_of(shape, ep=ep, ep_rank=ep_rank) if shape.moe is not None else range(0)
    return layer_tensors(shape, names=names, layer=layer, local_layer=local_layer, tp=tp, tp_rank=tp_rank,
                         q_heads=range(0), kv_heads=list(range(tp_rank * ng, (tp_rank + 1) * ng)), interleave=True,
                         experts=experts)


def megatron_rank_tensors(shape: ModelShape, *, tp: int, pp: int, tp_rank: int, pp_rank: int,
                          vocab_divisible_by: int = 128, te_names: bool = False, ep: int = 1,
                          ep_rank: int = 0) -> dict[str, LocalTensor]:
    """Every local tensor of one Megatron (tp_rank, pp_rank, ep_rank), named as ``GPTModel.named_parameters``."""
    if shape.layers % pp:
        raise LayoutError.of("parallel.pp", f"{pp} does not divide num_hidden_layers={shape.layers}",
                             "choose a parallel.pp that divides the layer count")
    h = shape.hidden
    vp = padded_vocab(shape.vocab, divisible_by=vocab_divisible_by, tp=tp)
    per_stage = shape.layers // pp
    out: dict[str, LocalTensor] = {}
    vocab_blocks = split_blocks("model.embed_tokens.weight", total=vp, parts=tp, index=tp_rank, valid=shape.vocab)
    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = LocalTensor("embedding.word_embeddings.weight", (vp // tp, h), 0,
                                                              vocab_blocks)
    for j in range(per_stage):
        out.update(megatron_layer_tensors(shape, tp=tp, tp_rank=tp_rank, layer=pp_rank * per_stage + j,
                                          local_layer=j, te_names=te_names, ep=ep, ep_rank=ep_rank))
    if pp_rank == pp - 1:
        out["decoder.final_layernorm.weight"] = replicated("decoder.final_layernorm.weight", "model.norm.weight", (h,))
        # Tied with PP=1: the output layer *is* the embedding (no separate parameter). Tied with
        # PP>1: the last stage keeps its own copy of the embedding, which megatron keeps in sync.
        if not shape.tied or pp > 1:
            canon = "model.embed_tokens.weight" if shape.tied else "lm_head.weight"
            blocks = tuple(Block(b.local_start, b.length, canon, b.canon_start) for b in vocab_blocks)
            out["output_layer.weight"] = LocalTensor("output_layer.weight", (vp // tp, h), 0, blocks)
    return out


def megatron_layout(shape: ModelShape, grid: RankGrid, *, vocab_divisible_by: int = 128,
                    te_names: bool = False) -> Layout:
    """Megatron's layout over a whole world; DP and CP replicas hold identical tensors, except that
    an MoE model's experts differ between the expert-parallel ranks (``grid.ep``)."""
    lay = Layout("megatron", shape.canonical_shapes())
    for rank in range(grid.world_size):
        c = grid.coords(rank)
        lay.ranks[rank] = megatron_rank_tensors(shape, tp=grid.tp, pp=grid.pp, tp_rank=c.tp, pp_rank=c.pp,
                                                vocab_divisible_by=vocab_divisible_by, te_names=te_names,
                                                ep=grid.ep, ep_rank=c.ep)
    return lay


# ---------------------------------------------------------------------------------------------
# Moving data through a layout.

ReadFn = Callable[[str, int, int, int], "object"]  # (canon, dim, start, length) -> tensor run


def assemble(lt: LocalTensor, read: ReadFn, *, dtype=None, device=None):
    """Build the local tensor from canonical runs; padding slices are zero."""

    out = None
    for b in lt.blocks:
        run = read(b.canon, lt.dim, b.canon_start, b.length)
        if out is None:
            out = torch.zeros(lt.shape, dtype=dtype or run.dtype, device=device or run.device)
        out.narrow(lt.dim, b.local_start, b.length).copy_(run)
    if out is None:
        out = torch.zeros(lt.shape, dtype=dtype, device=device)
    return out


def disassemble(lt: LocalTensor, local, write: Callable[[str, int, int, object], None]) -> None:
    """Hand every canonical run held by ``local`` to ``write(canon, dim, start, run)``."""
    if tuple(local.shape) != tuple(lt.shape):
        raise LayoutError(f"{lt.name}: local tensor has shape {tuple(local.shape)}, layout expects {lt.shape}")
    for b in lt.blocks:
        write(b.canon, lt.dim, b.canon_start, local.narrow(lt.dim, b.local_start, b.length))
