"""LM loss and per-token log-probs from vocab-parallel logits, and the default forward step.

Logits leave megatron's ``GPTModel`` split over TP along the (padded) vocab. The padded
entries (ids >= the real vocab) are masked to -inf before the softmax, so log-probs equal
HF's and vLLM's exactly; megatron's ``vocab_parallel_cross_entropy`` does the TP-parallel
log-softmax.

A batch is a dict of full-length (B, S) tensors: ``tokens``, ``labels`` (next tokens),
``loss_mask`` (1 where the token counts). :func:`lm_forward` cuts them for this CP rank; the
tp and cp ranks come from the model's ``pg_collection`` (the topology's groups).

Usage::

    logp = vocab_parallel_logprobs(logits, labels, vocab_size=250, tp_rank=0)     # (B, S_local)
    eng.step(batches, forward_fn=lm_forward)
"""
from __future__ import annotations

import torch

from megatron_rl.parallel.cp_attention import split_for_cp
from megatron_rl.parallel.topology import group_rank, group_size, model_groups


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int,
                            tp_rank: int) -> torch.Tensor:
    """log p(labels) from logits split over TP along the last dim (padded vocab masked).

    logits (..., V_pad / TP) on TP rank ``tp_rank``; labels (...) global token ids. Returns (...) fp32.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # lazy: keeps megatron out of CLI start-up

    local_v = logits.size(-1)
    start = tp_rank * local_v
    logits = logits.float()
    if start + local_v > vocab_size:
        ids = torch.arange(start, start + local_v, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    return -vocab_parallel_cross_entropy(logits, labels)


def cp_batch(batch: dict, *, cp_size: int, cp_rank: int) -> dict:
    """CP rank ``cp_rank``'s share of every (B, S) tensor of ``batch`` (megatron's load-balanced split)."""
    if cp_size == 1:
        return batch
    return {k: split_for_cp(v, seq_dim=1, cp_size=cp_size, cp_rank=cp_rank) if torch.is_tensor(v) and v.dim() >= 2
            else v for k, v in batch.items()}


def _vocab_size(model) -> int:
    while hasattr(model, "module"):
        model = model.module
    return model.unpadded_vocab_size


def lm_forward(model, batch: dict):
    """Forward step for :class:`TrainEngine`: next-token loss summed over ``loss_mask``."""
    groups = model_groups(model)
    cp = {"cp_size": group_size(groups.cp), "cp_rank": group_rank(groups.cp)}
    local = cp_batch(batch, **cp)
    tokens = local["tokens"]
    position_ids = local.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(batch["tokens"].size(1)).unsqueeze(0).expand_as(batch["tokens"])
        position_ids = cp_batch({"p": position_ids}, **cp)["p"]
    output = model(tokens, position_ids, attention_mask=None)  # (B, S_local, V_pad/TP) on the last stage
    vocab, tp_rank = _vocab_size(model), group_rank(groups.tp)

    def loss_fn(logits):
        logp = vocab_parallel_logprobs(logits, local["labels"], vocab_size=vocab, tp_rank=tp_rank)  # (B, S_local)
        mask = local["loss_mask"].float()
        loss_sum = -(logp * mask).sum()
        tokens_n = mask.sum().to(torch.int)
        return loss_sum, tokens_n, {"loss_sum": loss_sum.detach().clone(), "tokens": tokens_n.clone()}

    return output, loss_fn


def synthetic_batches(*, vocab: int, num: int, batch: int, seq: int, seed: int, motif: int = 4) -> list[dict]:
    """``num`` micro-batches (B=batch, S=seq) of a learnable copy task, with next-token labels.

    Each sequence repeats a random ``motif``-token pattern, so after the first repetition
    every token is predictable and the loss falls quickly from ln(vocab).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    reps = -(-(seq + 1) // motif)
    for _ in range(num):
        pattern = torch.randint(3, vocab, (batch, motif), generator=g)  # (B, motif)
        seqs = pattern.repeat(1, reps)[:, : seq + 1]  # (B, S+1)
        out.append({"tokens": seqs[:, :-1].contiguous(), "labels": seqs[:, 1:].contiguous(),
                    "loss_mask": torch.ones(batch, seq, dtype=torch.float32)})
    return out
