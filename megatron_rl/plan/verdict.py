"""The verdict: does every phase of a step fit the device, and if not, what breaks it and what fixes it.

A step's phases, per rank (the worst rank position of each):

* ``rollout``: training state (resident) + vLLM's ``gpu_memory_utilization`` share;
* ``train``: training state + the step's activation terms + what vLLM keeps through sleep;
* ``sync``: training state + vLLM's weights (resumed) + the sync's extra buffers + vLLM's residual;
* ``critic_train`` (``algorithm.name=ppo``): the policy's state stays resident while the critic,
  onloaded, trains: policy state + critic state + the critic's activation terms without the logits
  (its head is one scalar) + vLLM's residual. The critic's state is taken as the policy's, an upper
  bound (its head is one column where the policy's is the vocabulary). Outside its two phases the
  critic is offloaded to host memory, so the other phases do not carry it.

Each adds ``reserve`` (CUDA context, NCCL buffers, allocator slack). vLLM must also hold one
``rollout.max_model_len`` sequence in its KV cache, or it refuses to start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Verdict:
    fits: bool
    phases: dict  # phase -> peak bytes (reserve included)
    breaking_term: str  # "" when it fits
    fix: str

    @property
    def word(self) -> str:
        return "fits" if self.fits else "does not fit"


def _train_fix(cfg, worst) -> tuple[str, str]:
    acts = worst.activations + worst.working_set + worst.pipeline
    terms = {"activations": acts, "logits": worst.logits, "optimizer state": worst.master + worst.adam}
    term = max(terms, key=terms.get)
    if term == "activations":
        if cfg.train.recompute != "full":
            return "activations", f"set train.recompute=full (it is {cfg.train.recompute})"
        return "activations", "lower train.micro_batch_groups or rollout.max_new_tokens, or raise parallel.pp"
    if term == "logits":
        return "logits", "lower train.micro_batch_groups, or raise parallel.tp"
    if not cfg.parallel.distributed_optimizer:
        return "optimizer state", "set parallel.distributed_optimizer=true"
    return "optimizer state", "raise parallel.pp or parallel.tp"


def _rollout_fix(cfg, *, state: int, gpu_bytes: int, reserve: int) -> tuple[str, str]:
    room = math.floor(20 * (gpu_bytes - reserve - state) / gpu_bytes) / 20
    if room <= 0:
        return "training state", "set parallel.distributed_optimizer=true or raise parallel.pp"
    return "vLLM share (rollout.gpu_memory_utilization)", f"set rollout.gpu_memory_utilization={room:.2f} or lower"


def verdict(cfg, train: list, rollout, sync, *, gpu_bytes: int, reserve: int) -> Verdict:
    """``train``: the :class:`~megatron_rl.plan.memory.TrainMemory` of every rank position."""
    state = max(t.state for t in train)
    worst_train = max(train, key=lambda t: t.step_peak)
    phases = {"rollout": state + rollout.budget + reserve,
              "train": worst_train.step_peak + rollout.residual + reserve,
              "sync": state + rollout.weights + sync.peak_extra_bytes + rollout.residual + reserve}
    if cfg.algorithm.name == "ppo":
        phases["critic_train"] = max(2 * t.state + t.activation_terms - t.logits for t in train) \
            + rollout.residual + reserve
    over = {k: v - gpu_bytes for k, v in phases.items() if v > gpu_bytes}
    if rollout.sequences(cfg.rollout.max_model_len) < 1:
        return Verdict(False, phases, "KV cache (holds no rollout.max_model_len sequence)",
                       "raise rollout.gpu_memory_utilization or rollout.tp, or lower rollout.max_model_len")
    if not over:
        return Verdict(True, phases, "", "")
    phase = max(over, key=over.get)
    if phase == "train":
        term, fix = _train_fix(cfg, worst_train)
    elif phase == "rollout":
        term, fix = _rollout_fix(cfg, state=state, gpu_bytes=gpu_bytes, reserve=reserve)
    elif phase == "critic_train":
        term, fix = "policy and critic state together", "raise parallel.pp or parallel.tp"
    else:
        term, fix = "vLLM weights beside the training state", "raise rollout.tp or parallel.pp"
    return Verdict(False, phases, f"{phase}: {term}", fix)
