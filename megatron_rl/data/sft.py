"""Supervised fine-tuning batches with the loss on the answer only (``lm-train --data sft``).

A row ``{"prompt": "47+38=", "answer": "85"}`` becomes the ids ``prompt + answer + EOS``; the
model is trained to predict the answer and the EOS, never the prompt (the rollout engine is
given the prompt, so predicting it teaches nothing the RL phase uses). With next-token labels,
position ``t`` predicts token ``t + 1``::

    ids        p0  p1  p2  p3  a0  a1  EOS  pad
    tokens     p0  p1  p2  p3  a0  a1  EOS         (S = seq_len)
    labels     p1  p2  p3  a0  a1  EOS pad
    loss_mask   0   0   0   1   1   1   0

Prompts are encoded exactly as the rollout encodes them (:func:`megatron_rl.data.encode_prompt`,
with ``data.chat_template``), so SFT and RL see the same prefix.

Usage::

    ex = sft_example(tok, {"prompt": "4+5=", "answer": "9"}, chat_template=False)
    batch = sft_batch([ex, ...], seq_len=16, pad_id=0)    # {"tokens", "labels", "loss_mask"}: (B, S)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rl.data.chat import encode_prompt
from megatron_rl.errors import ConfigError


@dataclass(frozen=True)
class SftExample:
    """One row as ids: ``ids[answer_start:]`` is the answer and the EOS (the trained part)."""

    ids: tuple[int, ...]
    answer_start: int


def sft_example(tokenizer, row: dict, *, chat_template: bool) -> SftExample:
    """``row`` (with ``prompt`` and ``answer``) as prompt ids + answer ids + EOS."""
    if "answer" not in row:
        raise ConfigError(f"config error: data.dataset: row {row.get('id', '?')} has no 'answer' to train on; "
                          "fix: SFT (lm-train --data sft) needs rows with an answer field")
    prompt = encode_prompt(tokenizer, row["prompt"], chat_template=chat_template)
    answer = list(tokenizer(str(row["answer"]), add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]
    return SftExample(ids=tuple(prompt + answer), answer_start=len(prompt))


def sft_batch(examples: list, *, seq_len: int, pad_id: int) -> dict:
    """Right-padded ``(B, S)`` tokens, next-token labels and the answer-only loss mask.

    ``loss_mask[b, t] = 1`` exactly where ``labels[b, t]`` is an answer token or the EOS.
    """
    longest = max(len(e.ids) for e in examples)
    if longest > seq_len + 1:
        raise ConfigError(f"config error: --seq-len: {seq_len} is shorter than an SFT example ({longest - 1} "
                          f"tokens after the shift); fix: pass --seq-len {longest - 1} or more")
    ids = torch.full((len(examples), seq_len + 1), pad_id, dtype=torch.long)  # (B, S+1)
    mask = torch.zeros(len(examples), seq_len, dtype=torch.float32)  # (B, S)
    for b, e in enumerate(examples):
        ids[b, :len(e.ids)] = torch.tensor(e.ids)
        mask[b, max(e.answer_start - 1, 0):len(e.ids) - 1] = 1.0  # label t is ids[t + 1]
    return {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "loss_mask": mask}
