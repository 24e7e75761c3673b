"""The GRPO job: one SPMD loop in which every rank both generates (vLLM) and trains (megatron-core).

One step, on every rank, in this order::

    eval      (logging.eval_every) greedy pass@1 and mean reward on the held-out prompts, at the
              first step, every N-th and after the last (megatron_rl.evaluation)
    rollout   vLLM samples G responses per prompt (each replica its share), with log-probs;
              responses are gathered, rewards scored, group advantages computed
    release   vLLM frees its KV cache and weights: the memory goes back to training
    ref       (algorithm.kl_coef > 0) the frozen reference is onloaded, scores the same packed
              micro-batches (forward only) and is offloaded again
    train     megatron-core trains this DP rank's groups, shared-prefix packed (train.shared_prefix=
              false: naive, every response its own [P, R_i] sequence)
    resume    vLLM re-allocates its weights ...
    sync      ... receives the new weights straight from the megatron shards (no full gather)
    resume    ... and its KV cache; the prefix cache is reset (it holds stale KV)

Rank 0 writes the metrics (JSONL, TensorBoard, progress bar, phase table); other ranks stay
quiet unless they fail. Run (under torchrun)::

    megatron-rl train --config configs/tiny_cpu.yaml train.steps=20

The rollout engine (``megatron_rl.rollout.vllm_engine.VllmEngine``) is created in
:func:`start_rollout` and sampled in :func:`generate`; it is also the weight receiver of
``WeightSync``. Checkpoint save/resume goes through :func:`save_state` / :func:`resume_state`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoConfig, AutoTokenizer

from megatron_rl import console
from megatron_rl.algorithms import group_advantages, lr_at
from megatron_rl.algorithms.dynamic import DynamicPool, select_groups
from megatron_rl.algorithms.grpo import RolloutBatch
from megatron_rl.config import Config, ConfigError, load_config, validate
from megatron_rl.data import PromptDataset, encode_prompt
from megatron_rl.evaluation import Evaluator
from megatron_rl.metrics import (MetricsLogger, PhaseTimer, ascii_curve, length_stats, phase_table, quiet_other_ranks,
                                 reward_gain, reward_stats)
from megatron_rl.parallel import collectives as coll
from megatron_rl.parallel import destroy_distributed, init_distributed
from megatron_rl.plot import end_of_run as end_of_run_plot
from megatron_rl.resharding.layout import ModelShape, megatron_layout, uses_te_names
from megatron_rl.resharding.planner import UNBOUNDED
from megatron_rl.resharding.sync import WeightSync, model_tensors
from megatron_rl.resharding.vllm_layout import vllm_layout
from megatron_rl.rewards import compute_rewards, get_reward
from megatron_rl.rollout.base import Sampling
from megatron_rl.rollout.vllm_engine import VllmEngine
from megatron_rl.runtime import faults, run_rank
from megatron_rl.runtime.resources import resource_metrics
from megatron_rl.train.critic import Critic
from megatron_rl.train.engine import TrainEngine
from megatron_rl.train.reference import ReferenceModel, reference_path
from megatron_rl.train.rl_state import log_restart, resume_state, save_state
from megatron_rl.train.routing import route_mode
from megatron_rl.train.rl_step import (critic_update, forward_table, gather_table, plan_step, policy_update,
                                      ppo_step_targets)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Rollout: the only place that knows the engine's calls.


def start_rollout(cfg: Config, *, topo):
    """The vLLM engine of this rank (created after the process groups, as vLLM requires)."""

    return VllmEngine(cfg.model.hf_path, cfg=cfg.rollout, topo=topo, run_dir=cfg.logging.run_dir,
                      dtype=cfg.rollout_dtype)


def generate(engine, cfg: Config, *, prompt_ids: list, step: int, draw: int = 0) -> RolloutBatch:
    """G samples of every prompt, with the engine's log-probs; every rank gets the whole batch.

    Each prompt is repeated G times in a row, so a group stays on one replica (its prompt is
    prefix-cached) and the engine's per-prompt seeds ``seed + i`` depend only on (seed, step):
    a resumed run draws the same samples whatever the layout. ``draw`` numbers the extra
    rollout batches of one step (dynamic sampling) so each gets its own seeds.
    """

    r, G = cfg.rollout, cfg.algorithm.group_size
    flat = [p for p in prompt_ids for _ in range(G)]
    sampling = Sampling(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                        seed=(r.seed * 1_000_003 + step * len(flat) + draw * 7_919_993) % (1 << 30),
                        routes=route_mode(cfg) != "off")
    outs = engine.generate(flat, sampling=sampling)
    resp = [[list(outs[g * G + i].tokens) for i in range(G)] for g in range(len(prompt_ids))]
    logp = [[list(outs[g * G + i].logprobs) for i in range(G)] for g in range(len(prompt_ids))]
    batch = RolloutBatch(rows=[], prompt_ids=prompt_ids, response_ids=resp, logprobs=logp)
    if sampling.routes:  # the prompt's routes once per group (its copies computed or cached the same tokens)
        batch.prompt_routes = [outs[g * G].routes[:len(p)] for g, p in enumerate(prompt_ids)]
        batch.response_routes = [[outs[g * G + i].routes[len(p):] for i in range(G)] for g, p in enumerate(prompt_ids)]
    return batch


def rollout_step(job: "Job", *, step: int) -> tuple:
    """``(batch, rewards, metrics)`` of one step: ``data.prompts_per_step`` groups, sampled and
    scored. With ``algorithm.dynamic_sampling`` groups whose rewards all agree are dropped and
    further batches sampled (at most ``algorithm.max_gen_batches``); ``metrics`` count them."""
    cfg, a = job.cfg, job.cfg.algorithm
    pool, parts = DynamicPool(target=cfg.data.prompts_per_step), []
    while not pool.full and pool.batches < (a.max_gen_batches if a.dynamic_sampling else 1):
        rows = job.data.next_batch(cfg.data.prompts_per_step)
        ids = [encode_prompt(job.tokenizer, r["prompt"], chat_template=cfg.data.chat_template) for r in rows]
        batch = generate(job.rollout, cfg, prompt_ids=ids, step=step, draw=pool.batches)
        batch.rows = rows
        rewards = score(job, rows, batch)
        parts.append((batch, rewards))
        if not a.dynamic_sampling:
            return batch, rewards, {}
        pool.add(torch.tensor(rewards), group_size=a.group_size)
    batch, rewards = select_groups(parts, pool.chosen(), group_size=a.group_size)
    return batch, rewards, pool.metrics()


# ---------------------------------------------------------------------------------------------
# Training: this DP rank's groups, one optimizer step per mini-batch.


def train_step(eng, cfg: Config, batch: RolloutBatch, advantages: torch.Tensor, *, lr: float, ref=None,
               phase=None) -> dict:
    """A GRPO step on this rank's groups (one optimizer step per mini-batch and epoch). Returns
    the global loss and its statistics, the mean grad norm (before clipping) and lr.

    ``ref`` (a :class:`megatron_rl.train.reference.ReferenceModel`) is required when
    ``algorithm.kl_coef > 0``; it is onloaded for its forward and offloaded right after, timed
    as phase "ref" by ``phase`` (a ``phase(name)`` context-manager factory) when given. The
    layout comes from ``eng.topo``. The loop (:func:`update`) runs the same pieces.
    """
    if cfg.algorithm.kl_coef > 0 and ref is None:
        raise ValueError("algorithm.kl_coef > 0 needs the reference model: pass ref=make_reference(cfg, ...)")
    topo = eng.topo
    plan = plan_step(cfg, batch, topo=topo, advantages=advantages)
    # Off-policy passes (all but the first) need the log-probs from before the first update.
    old_logp = forward_table(eng, plan, topo=topo) if plan.passes * cfg.algorithm.ppo_epochs > 1 else None
    ref_logp = None
    if cfg.algorithm.kl_coef > 0:
        with (phase or _no_phase)("ref"), ref.onloaded():
            ref_logp = forward_table(ref, plan, topo=topo)
    return policy_update(eng, cfg, batch, plan, lr=lr, old_logp=old_logp, ref_logp=ref_logp)


def update(job: "Job", batch: RolloutBatch, rewards: list, *, step: int, lr: float, phase) -> dict:
    """Everything between release and resume, in order, each model onloaded only for its phase::

        critic        (PPO) onload, values of every response token, offload
        ref           (kl_coef > 0) onload, log-probs, offload
        train         the policy's optimizer steps (none during algorithm.critic_warmup_steps)
        critic_train  (PPO) onload, the critic's optimizer steps, offload
    """
    cfg, a, eng, topo = job.cfg, job.cfg.algorithm, job.eng, job.eng.topo
    ppo = a.name == "ppo"
    adv = None if ppo else group_advantages(torch.tensor(rewards), group_size=a.group_size, estimator=a.name,
                                            normalize_std=a.normalize_adv_std, eps=a.adv_eps)
    plan = plan_step(cfg, batch, topo=topo, advantages=adv)  # PPO: forward-only (advantages need values)
    values, ref_logp, out = None, None, {}
    if ppo:
        with phase("critic"), job.critic.onloaded():
            values = gather_table(forward_table(job.critic, plan, topo=topo, values=True), topo=topo)
    if job.ref is not None:
        with phase("ref"), job.ref.onloaded():
            ref_logp = forward_table(job.ref, plan, topo=topo)
    with phase("train"):
        off_policy = plan.passes * a.ppo_epochs > 1 or (ppo and a.kl_coef > 0)
        old_logp = forward_table(eng, plan, topo=topo) if off_policy else None
        if ppo:
            targets, kl_stats = ppo_step_targets(cfg, batch, rewards, values=values, old_logp=old_logp,
                                                 ref_logp=ref_logp, topo=topo)
            plan = plan_step(cfg, batch, topo=topo, token_adv=targets.advantages)
        if step >= a.critic_warmup_steps:
            out = policy_update(eng, cfg, batch, plan, lr=lr, old_logp=old_logp, ref_logp=ref_logp)
    if ppo:
        with phase("critic_train"), job.critic.onloaded():
            critic_lr = (a.critic_lr or cfg.train.lr) * lr / cfg.train.lr  # the policy's schedule
            out.update(critic_update(job.critic, cfg, plan, targets=targets, lr=critic_lr),
                       **{"critic/explained_var": targets.explained_variance}, **kl_stats)
    return out


@contextlib.contextmanager
def _no_phase(name: str):
    yield


def make_reference(cfg: Config, *, hf_config, topo):
    """The frozen KL reference (offloaded until used), or None when ``algorithm.kl_coef == 0``.

    It loads the initial weights from HF (``algorithm.ref_hf_path`` or ``model.hf_path``), never
    from the RL checkpoint: a resumed run gets the same reference as a fresh one.
    """
    if cfg.algorithm.kl_coef <= 0:
        return None

    return ReferenceModel(hf_config, parallel=cfg.parallel, topo=topo, hf_path=reference_path(cfg.algorithm,
                          model_path=cfg.model.hf_path), store_dir=os.path.join(cfg.logging.run_dir, "reference"),
                          dtype=DTYPES[cfg.model.dtype], vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)


def make_critic(cfg: Config, *, hf_config, topo):
    """PPO's value model (offloaded until used), or None for the critic-free algorithms."""
    if cfg.algorithm.name != "ppo":
        return None
    return Critic(hf_config, cfg=cfg, topo=topo, store_dir=os.path.join(cfg.logging.run_dir, "critic"),
                  dtype=DTYPES[cfg.model.dtype])


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclass
class Job:
    """Everything one rank holds for the run (built by :func:`setup`)."""

    cfg: Config
    rank: int
    world: int
    tokenizer: object
    data: object
    reward_fn: object
    eng: object
    rollout: object
    sync: object
    ref: object = None  # the frozen KL reference (algorithm.kl_coef > 0)
    critic: object = None  # PPO's value model (algorithm.name=ppo)
    evaluator: Evaluator = None  # the held-out evaluation (data.eval_*, logging.eval_every)


def sync_source_layout(chunks, shape, grid, vocab_divisible_by: int):
    """Megatron's layout as the built model names it: under Transformer Engine the norms are
    fused into the next linear and carry TE's names (the same spec runs on every rank)."""

    return megatron_layout(shape, grid, vocab_divisible_by=vocab_divisible_by,
                           te_names=uses_te_names(model_tensors(chunks)))


def setup(cfg: Config, *, hf_config) -> Job:
    """Process groups, then the trainer, then vLLM (it must find the world already set up)."""

    # lazy: keeps vLLM/megatron out of CLI start-up
    from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix

    topo = init_distributed(cfg.parallel, seed=cfg.train.seed, rollout_tp=cfg.rollout.tp)
    rank, world = topo.rank, topo.world_size
    tok = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    data = PromptDataset.from_config(cfg.data, prompt_len=lambda p: len(encode_prompt(
        tok, p, chat_template=cfg.data.chat_template)))
    divisible = cfg.model.make_vocab_size_divisible_by
    eng = TrainEngine(hf_config, parallel=cfg.parallel, train=cfg.train, topo=topo,
                      dtype=DTYPES[cfg.model.dtype], hf_path=cfg.model.hf_path,
                      core_attention=SharedPrefixCoreAttention, vocab_divisible_by=divisible, routes=route_mode(cfg))
    enable_shared_prefix(eng.model)
    ref = make_reference(cfg, hf_config=hf_config, topo=topo)
    critic = make_critic(cfg, hf_config=hf_config, topo=topo)
    rollout = start_rollout(cfg, topo=topo)
    shape = ModelShape.from_hf_config(hf_config)
    sync = WeightSync(eng.model, rollout, src_layout=sync_source_layout(eng.model, shape, topo.grid, divisible),
                      dst_layout=vllm_layout(shape, tp=cfg.rollout.tp, world_size=world), timeout=cfg.parallel.timeout_s,
                      dst_dtype=DTYPES[cfg.rollout_dtype],  # fp32 master weights can feed a bf16 rollout
                      bucket_bytes=cfg.sync.bucket_bytes, staging_bytes=staging_bytes(cfg), verify=cfg.sync.verify,
                      transport=cfg.sync.transport)
    reward_fn = get_reward(cfg.data.reward)
    return Job(cfg=cfg, rank=rank, world=world, tokenizer=tok, data=data, reward_fn=reward_fn, eng=eng,
               rollout=rollout, sync=sync, ref=ref, critic=critic,
               evaluator=Evaluator.from_config(cfg, tokenizer=tok, reward_fn=reward_fn))


def staging_bytes(cfg: Config) -> Optional[int]:
    """``sync.staging_bytes`` with 0 resolved (see :class:`megatron_rl.config.SyncConfig`); None:
    the planner's default."""
    if cfg.sync.staging_bytes:
        return cfg.sync.staging_bytes
    return UNBOUNDED if cfg.rollout.weights_release == "discard" else None


def score(job: Job, rows: list, batch: RolloutBatch) -> list[float]:
    """Rewards of every response, ``(N*G,)`` in group order (computed identically on every rank)."""
    G, tok = job.cfg.algorithm.group_size, job.tokenizer
    flat_ids = [ids for group in batch.response_ids for ids in group]
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in flat_ids]
    return compute_rewards(job.reward_fn, texts, prompts=[r["prompt"] for r in rows for _ in range(G)],
                           samples=[r for r in rows for _ in range(G)], response_ids=flat_ids)


def end_step(cfg: Config, job: Job, log, rt, *, step: int, metrics: dict, history: list) -> None:
    """After a step: its metrics line, the phase table, and the checkpoint when one is due."""
    L, last = cfg.logging, step == cfg.train.steps - 1
    if step % L.log_every == 0 or last:
        log.log(step, metrics)
    if L.phase_table and (step % L.table_every == 0 or last):
        critic = (f" value loss {metrics['critic/value_loss']:.4f} explained var {metrics['critic/explained_var']:.3f}"
                  if "critic/value_loss" in metrics else "")
        log.print(f"step {step}: reward {metrics['reward/mean']:.3f} loss {metrics.get('loss', float('nan')):.4f} "
                  f"|dlogp| {metrics.get('mismatch/abs_mean', float('nan')):.2e}{critic}\n{phase_table(metrics)}")
    every = cfg.checkpoint.save_every
    if cfg.checkpoint.dir and (last or (every and (step + 1) % every == 0)):
        with rt.phase("checkpoint"):
            save_state(cfg, job.eng, step=step, data=job.data, rewards=history, critic=job.critic)


def train(cfg: Config, *, hf_config, rt=None) -> dict:
    """Run the whole job on this rank; returns the reward curve summary (same on every rank).

    ``rt`` (a :class:`megatron_rl.runtime.RankRuntime`) names the phase of any failure and
    bounds every phase by ``parallel.timeout_s`` (start-up by twice that).
    """

    rt = rt or _NoRuntime()
    with rt.phase("setup", timeout_s=2 * cfg.parallel.timeout_s):
        job = setup(cfg, hf_config=hf_config)
        t, L = cfg.train, cfg.logging
        start, history = resume_state(cfg, job.eng, data=job.data, critic=job.critic)
    log_restart(cfg, rank=job.rank, start=start)
    with rt.phase("sync"):
        job.sync.sync()  # vLLM starts from exactly the trainer's weights (fresh or resumed)
    log = MetricsLogger(L.run_dir, rank=job.rank, total_steps=t.steps, start_step=start, jsonl=L.jsonl,
                        tensorboard=L.tensorboard, progress=L.progress)
    timer = _Phases(PhaseTimer(device=torch.device("cuda", torch.cuda.current_device())
                               if torch.cuda.is_available() else None), rt)
    explained = []  # PPO: the critic's explained variance per step
    for step in range(start, t.steps):
        rt.step = step  # kept in this rank's records: a restart names the step a rank died in
        held_out = evaluate(job, timer, step=step, start=start)  # before the rollout: vLLM is awake
        metrics = {**held_out, **run_step(job, timer, step=step)}
        history.append(metrics["reward/mean"])
        if "critic/explained_var" in metrics:
            explained.append(metrics["critic/explained_var"])
        end_step(cfg, job, log, rt, step=step, metrics=metrics, history=history)
    if job.evaluator.enabled:  # after the last step's resume: the final policy, still on an awake engine
        log.log(t.steps, {**evaluate(job, timer, step=t.steps, start=t.steps), **timer.step_metrics()})
    first, last, gain = reward_gain(history) if history else (0.0, 0.0, 0.0)
    log.print(f"mean reward per step:\n{ascii_curve(history)}\n"
              f"reward first 20%: {first:.4f}  last 20%: {last:.4f}  gain: {gain:+.4f}")
    if job.evaluator.history:
        log.print(job.evaluator.summary())
    if explained:
        ev_first, ev_last, ev_gain = reward_gain(explained)
        log.print(f"critic explained variance first 20%: {ev_first:.4f}  last 20%: {ev_last:.4f}  rise: {ev_gain:+.4f}")
    log.close()
    faults.fire("train:end", rollout=job.rollout, tokenizer=job.tokenizer, rank=job.rank)  # test seam; a no-op
    if job.rank == 0 and L.jsonl:  # the PNG next to metrics.jsonl (one line instead without matplotlib)
        log.print(end_of_run_plot(L.run_dir))
    # Megatron's state only: vLLM's shutdown at exit destroys its groups and the default one.
    destroy_distributed(keep_process_group=True)
    return {"reward_first": first, "reward_last": last, "reward_gain": gain, "rewards": history}


def run_step(job: Job, timer, *, step: int) -> dict:
    """One RL step, in the loop's order (module docstring); returns its metrics."""
    cfg, rollout, sync, t, a = job.cfg, job.rollout, job.sync, job.cfg.train, job.cfg.algorithm
    with timer.phase("rollout"):  # policy on vLLM; critic and reference offloaded
        batch, rewards, sampled = rollout_step(job, step=step)
    with timer.phase("release"):
        rollout.release(("kv_cache", "weights"))
    lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, total_steps=t.steps, warmup_steps=t.lr_warmup_steps,
               schedule=t.lr_schedule)
    out = update(job, batch, rewards, step=step, lr=lr, phase=timer.phase)
    with timer.phase("resume"):
        return_cached_blocks()  # training's cached blocks go back before vLLM wakes
        rollout.resume(("weights",))
    with timer.phase("sync"):
        sync.sync()  # ends with the engine's end_weight_update(): repack, reset the prefix cache
    with timer.phase("resume"):
        rollout.resume(("kv_cache",))
    return {**reward_stats(rewards, group_size=a.group_size), **sampled,
            **length_stats(batch.flat_lengths(), max_new_tokens=cfg.rollout.max_new_tokens),
            **out, **timer.step_metrics(), **resource_metrics()}


def evaluate(job: Job, timer, *, step: int, start: int) -> dict:
    """The held-out metrics when an evaluation is due at ``step`` (phase "eval"), else {}."""
    if not job.evaluator.due(step, start=start):
        return {}
    with timer.phase("eval"):
        return job.evaluator.run(job.rollout, step=step)


def return_cached_blocks() -> None:
    """Hand the blocks torch's caching allocator keeps for training back to the driver, so that
    vLLM's wake_up (which allocates outside that cache) finds them free. A no-op without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class _Phases:
    """Each phase is both timed (metrics) and watched (failure reports name it)."""

    def __init__(self, timer: PhaseTimer, rt):
        self.timer, self.rt = timer, rt

    @contextlib.contextmanager
    def phase(self, name: str):
        with self.rt.phase(name), self.timer.phase(name):
            yield

    def step_metrics(self) -> dict:
        return self.timer.step_metrics()


class _NoRuntime:
    """Stand-in when train() runs outside run_rank (tests calling it in-process)."""

    step = None

    @contextlib.contextmanager
    def phase(self, name: str, *, timeout_s=None):
        yield


def check_supported(cfg: Config) -> None:
    """Checks this loop adds to the config's own: fail before any work (one line naming the field)."""
    a = cfg.algorithm
    others = [("algorithm.ref_hf_path", a.ref_hf_path if a.kl_coef > 0 else None),
              ("algorithm.critic_hf_path", a.critic_hf_path)]
    for key, path in others:  # the reference and the critic run at the policy's layout: same shape
        if not path or os.path.abspath(path) == os.path.abspath(cfg.model.hf_path):
            continue
        want = vars(ModelShape.from_hf_config(AutoConfig.from_pretrained(cfg.model.hf_path)))
        got = vars(ModelShape.from_hf_config(AutoConfig.from_pretrained(path)))
        diff = ", ".join(f"{k} {got[k]} != {want[k]}" for k in want if got[k] != want[k]
                         and not (k == "tied" and key == "algorithm.critic_hf_path"))  # no lm_head in a critic
        if diff:
            raise ConfigError(f"config error: {key}: {path!r} has another shape than the policy's "
                              f"model.hf_path ({diff}); fix: use a model with the policy's architecture")


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-rl train", description="GRPO training job (run under torchrun).")
    ap.add_argument("--config", default=None, help="a YAML file under configs/ (defaults apply without one)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-6 rollout.tp=2")
    args = ap.parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    quiet_other_ranks(rank)
    try:  # every check runs before any process group exists
        cfg = load_config(args.config, overrides=args.overrides)
        hf_config = validate(cfg, world_size=world, load_hf=True)
        check_supported(cfg)
    except ConfigError as e:
        if rank == 0:
            print(e, file=console.stderr())
        return 2

    def job(rt) -> int:
        train(cfg, hf_config=hf_config, rt=rt)
        return 0

    return run_rank(job, run_dir=cfg.logging.run_dir, timeout_s=cfg.parallel.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
