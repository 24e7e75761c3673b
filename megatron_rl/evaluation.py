"""Held-out evaluation on the rollout engine: greedy pass@1, mean reward, optional pass@k.

``data.eval_size`` (rows held out of ``data.dataset``) or ``data.eval_dataset`` names the eval
prompts (:func:`megatron_rl.data.load_split`: no training row shares a prompt with them);
``logging.eval_every=N`` runs the evaluation before the rollout of the first step of a run,
of every step ``s`` with ``s % N == 0``, and once more after the last step. The evaluation at
step ``s`` measures the policy after ``s`` updates. It runs where vLLM is awake anyway (before
the step's rollout; after the last step's resume), so it adds no release/resume cycle::

    eval      greedy responses to every eval prompt -> rewards:
                eval/pass@1        share of prompts whose greedy response scores 1.0 (exact match)
                eval/reward_mean   mean reward of the greedy responses
              (data.eval_pass_k=k) k samples per prompt at rollout.temperature:
                eval/pass@k        share of prompts with at least one sample scoring 1.0
    rollout   ...

Every rank generates its replica's share and receives all responses (the engine gathers them),
so every rank scores the same responses; :meth:`Evaluator.run` checks that the figures agree
on every rank (one small all-gather) and fails naming the ranks that differ.

Usage (inside the trainer)::

    ev = Evaluator.from_config(cfg, tokenizer=tok, reward_fn=fn)
    if ev.due(step, start=start): metrics.update(ev.run(engine))
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_rl.data import encode_prompt, load_split
from megatron_rl.parallel import collectives as coll
from megatron_rl.rewards import compute_rewards
from megatron_rl.rollout.base import Sampling

SOLVED = 1.0  # a response counts as solved when its reward reaches this (exact match: 1.0)


def pass_rate(rewards: list, *, k: int) -> float:
    """Share of prompts with at least one of its ``k`` consecutive rewards >= :data:`SOLVED`.

    ``rewards`` is ``(N*k,)`` in prompt order (a prompt's ``k`` responses in a row)."""
    if not rewards or len(rewards) % k:
        raise ValueError(f"{len(rewards)} rewards are not whole groups of k={k}")
    groups = [rewards[i:i + k] for i in range(0, len(rewards), k)]
    return sum(1.0 for g in groups if max(g) >= SOLVED) / len(groups)


@dataclass
class Evaluator:
    """The eval prompts of a run and how to score them (built the same on every rank)."""

    rows: list
    prompt_ids: list
    tokenizer: object
    reward_fn: object
    every: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    pass_k: int = 0
    history: list = field(default_factory=list)  # (step, metrics) of every evaluation so far

    @classmethod
    def from_config(cls, cfg, *, tokenizer, reward_fn) -> "Evaluator":
        chat = cfg.data.chat_template
        encode = lambda p: encode_prompt(tokenizer, p, chat_template=chat)  # noqa: E731
        rows = load_split(cfg.data, prompt_len=lambda p: len(encode(p))).eval if cfg.logging.eval_every else []
        r = cfg.rollout
        return cls(rows=rows, prompt_ids=[encode(row["prompt"]) for row in rows], tokenizer=tokenizer,
                   reward_fn=reward_fn, every=cfg.logging.eval_every, max_new_tokens=r.max_new_tokens,
                   temperature=r.temperature, top_p=r.top_p, seed=r.seed, pass_k=cfg.data.eval_pass_k)

    @property
    def enabled(self) -> bool:
        return self.every > 0 and bool(self.rows)

    def due(self, step: int, *, start: int) -> bool:
        """Before the rollout of ``step``: the run's first step and every ``every``-th."""
        return self.enabled and (step == start or step % self.every == 0)

    def _score(self, engine, *, k: int, sampling: Sampling) -> list:
        flat = [p for p in self.prompt_ids for _ in range(k)]
        outs = engine.generate(flat, sampling=sampling)
        ids = [list(o.tokens) for o in outs]
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
        rows = [r for r in self.rows for _ in range(k)]
        return compute_rewards(self.reward_fn, texts, prompts=[r["prompt"] for r in rows], samples=rows,
                               response_ids=ids)

    def run(self, engine, *, step: int) -> dict:
        """The eval metrics of the engine's current weights, i.e. after ``step`` updates
        (collective: every rank calls it)."""
        greedy = self._score(engine, k=1, sampling=Sampling(max_new_tokens=self.max_new_tokens, temperature=0.0,
                                                            seed=self.seed))
        out = {"eval/pass@1": pass_rate(greedy, k=1), "eval/reward_mean": sum(greedy) / len(greedy)}
        if self.pass_k:
            sampled = self._score(engine, k=self.pass_k, sampling=Sampling(
                max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                seed=(self.seed * 1_000_003 + 424_242) % (1 << 30)))
            out[f"eval/pass@{self.pass_k}"] = pass_rate(sampled, k=self.pass_k)
        check_same_on_ranks(out)
        self.history.append((step, out))
        return out

    def summary(self) -> str:
        """``held-out accuracy ...: first -> last`` over this run's evaluations, or ''."""
        if not self.history:
            return ""
        (s0, first), (s1, last) = self.history[0], self.history[-1]
        gain = 100 * (last["eval/pass@1"] - first["eval/pass@1"])
        return (f"held-out accuracy (greedy pass@1, {len(self.rows)} prompts): {100 * first['eval/pass@1']:.1f}% at "
                f"step {s0} -> {100 * last['eval/pass@1']:.1f}% at step {s1} ({gain:+.1f} points); eval mean reward "
                f"{first['eval/reward_mean']:.3f} -> {last['eval/reward_mean']:.3f}")


def check_same_on_ranks(metrics: dict) -> None:
    """Fail, naming the ranks, unless every rank computed the same ``metrics`` (a no-op on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    every = coll.all_gather_object(metrics)
    differ = [rank for rank, m in enumerate(every) if m != every[0]]
    if differ:
        raise RuntimeError(f"evaluation differs across ranks: rank 0 has {every[0]}, ranks {differ} have "
                           f"{[every[r] for r in differ]}; the engine must hand every rank the same responses")

