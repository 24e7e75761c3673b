"""LM loss and per-token log-probs from vocab-parallel logits, and the default forward step.

Logits leave megatron's ``GPTModel`` split over TP along the (padded) vocab. The padded
entries (ids >= the real vocab) are masked to -inf before the softmax, so log-probs equal
HF's and vLLM's exactly; megatron's ``vocab_parallel_cross_entropy`` does the TP-parallel
log-softmax.

A batch is a dict of full-length (B, S) tensors: ``tokens``, ``labels`` (next tokens),
``loss_mask`` (1 where the token counts). :func:`lm_forward` cuts them for this CP rank.

Usage::

    logp = vocab_parallel_logprobs(logits, labels, vocab_size=250)     # (B, S_local)
    eng.step(batches, forward_fn=lm_forward)
"""
from __future__ import annotations

import torch


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int) -> torch.Tensor:
    """log p(labels) from logits split over TP along the last dim (padded vocab masked).

    logits (..., V_pad / TP) on this TP rank; labels (...) global token ids. Returns (...) fp32.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    local_v = logits.size(-1)
    start = ps.get_tensor_model_parallel_rank() * local_v
    logits = logits.float()
    if start + local_v > vocab_size:
        ids = torch.arange(start, start + local_v, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    return -vocab_parallel_cross_entropy(logits, labels)


def cp_batch(batch: dict) -> dict:
    """This CP rank's share of every (B, S) tensor of ``batch`` (megatron's load-balanced split)."""
    from megatron.core import parallel_state as ps

    from megatron_rl.parallel.cp_attention import split_for_cp

    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return batch
    r = ps.get_context_parallel_rank()
    return {k: split_for_cp(v, seq_dim=1, cp_size=cp, cp_rank=r) if torch.is_tensor(v) and v.dim() >= 2 else v
            for k, v in batch.items()}


def _vocab_size(model) -> int:
    while hasattr(model, "module"):
        model = model.module
    return model.unpadded_vocab_size


def lm_forward(model, batch: dict):
    """Forward step for :class:`TrainEngine`: next-token loss summed over ``loss_mask``."""
    local = cp_batch(batch)
    tokens = local["tokens"]
    position_ids = local.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(batch["tokens"].size(1)).unsqueeze(0).expand_as(batch["tokens"])
        position_ids = cp_batch({"p": position_ids})["p"]
    output = model(tokens, position_ids, attention_mask=None)  # (B, S_local, V_pad/TP) on the last stage
    vocab = _vocab_size(model)

    def loss_fn(logits):
        logp = vocab_parallel_logprobs(logits, local["labels"], vocab_size=vocab)  # (B, S_local)
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
