"""Training memory per rank: the state that stays resident and the activations of a step.

Every term is bytes on one rank, from the built parameter count (:mod:`.shapes`) and the
config. What each term counts, and why (megatron-core 0.16.1 as the job configures it,
``megatron_rl.train.engine``):

* ``weights``: the parameters in ``model.dtype``;
* ``grads``: DDP's gradient buffers, fp32 (``grad_reduce_in_fp32``);
* ``master``: fp32 master weights (bf16 models only), and ``adam``: two fp32 moments; with
  ``parallel.distributed_optimizer`` both are sharded over DP x CP;
* ``activations``: what autograd keeps for the in-flight micro-batches of the largest size the
  config can produce (:func:`largest_micro_batch`). Under 1F1B a stage ``p`` of ``pp`` holds
  ``min(pp - p, micro-batches)`` of them. Per layer and micro-batch of ``T`` tokens (``t`` =
  TP; ``s = T / t`` with sequence parallel, else ``T``), in ``model.dtype``::

      norms        6 s h                    two RMSNorms (torch's, local spec): input, normalised
                                            input, output (the next linear's input)
      qkv          T (nh + 2 nkv) d / t     kept by the v view
      rope q, k    T (nh + nkv) d / t + 4 T d   and the cos/sin rows (x 3 with Qwen3's q/k norms)
      attention    2 T nh d / t             the kernel's output, and its (T, nh d) copy
      mlp          5 T ffn / t              fc1 out (gate, up) and three (T, ffn / t) products

  plus the kernel's fp32 log-sum-exp (T nh / t). ``train.recompute=full`` keeps only each
  layer's input (``s h``) and re-runs one layer at a time in backward (that layer's full set is
  the working set); ``selective`` re-runs core attention (drops its output and log-sum-exp);
* ``backward``: the gradients alive while one layer runs backward: the MLP's (``4 T ffn / t``);
* ``pipeline`` (PP > 1): the stage output of every in-flight micro-batch, which the schedule
  keeps for its backward (none on the last stage), and one received gradient (``s h`` each);
* ``logits``: the last stage's output ``(T, V/t)`` in ``model.dtype``, the response rows it
  indexes ``(N, V/t)``, their fp32 copy that the cross-entropy turns into the softmax in place
  (none for fp32 models), and a masked copy on a rank holding padded vocab entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rl.models.shape import ModelShape, padded_vocab


@dataclass(frozen=True)
class MicroBatch:
    """The largest micro-batch the config can produce, on one rank (after CP and padding)."""

    tokens: int  # T: packed positions the network runs
    response_tokens: int  # N: rows whose logits feed the loss
    per_step: int  # micro-batches per optimizer step on a DP rank, when every group is largest
    groups: int  # groups per micro-batch


@dataclass(frozen=True)
class TrainMemory:
    """One rank position's training terms (bytes)."""

    label: str
    weights: int
    grads: int
    master: int
    adam: int
    master_adam_unsharded: int  # the same two without the distributed optimizer
    in_flight: int
    activations: int
    working_set: int  # recompute of one layer, and one layer's backward
    logits: int
    sp_buffer: int  # megatron's all-gather buffer under sequence parallel (T h)
    pipeline: int  # stage outputs the 1F1B schedule keeps for backward, and a received gradient

    @property
    def activation_terms(self) -> int:
        """Everything a step adds above :attr:`state`."""
        return self.activations + self.working_set + self.logits + self.sp_buffer + self.pipeline

    @property
    def state(self) -> int:
        """What stays resident between steps (rollout included)."""
        return self.weights + self.grads + self.master + self.adam

    @property
    def step_peak(self) -> int:
        return self.state + self.activation_terms


def largest_micro_batch(cfg, *, world_size: int) -> MicroBatch:
    """What ``megatron_rl.trainer.train_step`` packs when every prompt and response is longest:
    a group is ``P + G R`` tokens (``G (P + R)`` naive), a micro-batch holds
    ``train.micro_batch_groups`` of them, split over CP and padded to TP under SP."""
    d, r, a, p = cfg.data, cfg.rollout, cfg.algorithm, cfg.parallel
    prompt, resp, g = d.max_prompt_len, r.max_new_tokens, a.group_size
    group = prompt + g * resp if cfg.train.shared_prefix else g * (prompt + resp)
    per_mb = cfg.train.micro_batch_groups
    pad = p.tp if p.sequence_parallel else 1
    tokens = -(-math.ceil(per_mb * group / p.cp) // pad) * pad
    groups_per_rank = d.prompts_per_step // (cfg.data_parallel_size(world_size) * a.mini_batches)
    return MicroBatch(tokens=tokens, response_tokens=math.ceil(per_mb * g * resp / p.cp),
                      per_step=max(1, math.ceil(groups_per_rank / per_mb)), groups=per_mb)


def layer_activations(shape: ModelShape, *, tokens: int, tp: int, sequence_parallel: bool, elem: int,
                      recompute: str = "none") -> int:
    """Bytes autograd keeps for one transformer layer on one rank (see the module docstring)."""
    t, h, d, f = tokens, shape.hidden, shape.head_dim, shape.ffn
    s = t // tp if sequence_parallel else t
    qk = t * (shape.heads + shape.kv_heads) * d // tp
    attn_out = t * shape.heads * d // tp
    elems = 6 * s * h + t * (shape.heads + 2 * shape.kv_heads) * d // tp + qk * (3 if shape.qk_norm else 1) \
        + 2 * attn_out + 5 * t * f // tp + 4 * t * d
    lse = t * shape.heads // tp * 4
    if recompute == "selective":
        return (elems - attn_out) * elem
    return elems * elem + lse


def logits_bytes(shape: ModelShape, mb: MicroBatch, *, tp: int, tp_rank: int, vocab_divisible_by: int,
                 elem: int) -> int:
    """The last stage's logits and log-softmax for one micro-batch (see the module docstring)."""
    vp = padded_vocab(shape.vocab, divisible_by=vocab_divisible_by, tp=tp)
    local_v = vp // tp
    padded_here = (tp_rank + 1) * local_v > shape.vocab
    rows = elem + (4 if elem != 4 else 0) + (4 if padded_here else 0)
    return local_v * (mb.tokens * elem + mb.response_tokens * rows)


def train_memory(cfg, shape: ModelShape, rank, mb: MicroBatch, *, world_size: int) -> TrainMemory:
    """The terms of one :class:`~megatron_rl.plan.shapes.RankShapes` position."""
    p, elem = cfg.parallel, rank.elem_bytes
    n = rank.numel
    shard = p.cp * cfg.data_parallel_size(world_size) if p.distributed_optimizer else 1
    master_full = 4 * n if elem != 4 else 0
    layers = shape.layers // p.pp
    in_flight = min(p.pp - rank.pp, mb.per_step)
    full = layer_activations(shape, tokens=mb.tokens, tp=p.tp, sequence_parallel=p.sequence_parallel, elem=elem)
    s = mb.tokens // p.tp if p.sequence_parallel else mb.tokens
    last = rank.pp == p.pp - 1
    if cfg.train.recompute == "full":
        per_mb, working = layers * s * shape.hidden * elem, full
    else:
        per_mb = layers * layer_activations(shape, tokens=mb.tokens, tp=p.tp, sequence_parallel=p.sequence_parallel,
                                            elem=elem, recompute=cfg.train.recompute)
        working = 0
    per_mb += (2 * s * shape.hidden * elem) if last else 0  # the final norm's input and output
    working += 4 * mb.tokens * shape.ffn // p.tp * elem  # one layer's MLP gradients in backward
    divisible = cfg.model.make_vocab_size_divisible_by
    logits = logits_bytes(shape, mb, tp=p.tp, tp_rank=rank.tp, vocab_divisible_by=divisible, elem=elem) if last else 0
    return TrainMemory(label=rank.label, weights=n * elem, grads=4 * n, master=master_full // shard,
                       adam=8 * n // shard, master_adam_unsharded=master_full + 8 * n, in_flight=in_flight,
                       activations=in_flight * per_mb, working_set=working, logits=logits,
                       sp_buffer=mb.tokens * shape.hidden * elem if p.sequence_parallel else 0,
                       pipeline=0 if p.pp == 1 else ((1 if last else in_flight + 1) * s * shape.hidden * elem))
