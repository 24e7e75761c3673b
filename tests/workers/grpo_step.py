"""Worker: the trainer's GRPO step (``megatron_rl.trainer.train_step``: GRPOLoss on packed groups
through megatron-core) at several layouts in one launch.

First, before any layout, a real vLLM engine (``ROLLOUT_DTYPE`` = bf16, TP1 x 4 replicas) samples
the responses of fixed prompts with its own log-probs: the rollout batch, as in the trainer. The
trainer runs fp32, so the two disagree (bf16 logits) and truncated importance sampling acts: with
``algorithm.tis_cap=TIS_CAP`` the weights ``min(exp(old - rollout), cap)`` are not all 1 and some
hit the cap. Each layout reports, next to its steps, the TIS figures expected from its own fp32
log-probs of the batch at the initial weights (independent of the loss code).

For each layout ``tp,pp,mini_batches[,variant]`` the rank builds the engine from the same tiny HF
model and runs two GRPO steps on that batch. Variants: ``naive`` trains with
``train.shared_prefix=false`` (every response its own ``[P, R_i]`` sequence); ``notis`` sets
``algorithm.tis_cap=null`` (the negative control: no weight, nothing capped); ``kl`` adds the KL
to the frozen reference model (``algorithm.kl_coef=KL_COEF``) and also reports, per rank, the
reference's log-probs against the policy's at step 0, the reference's parameter bytes, RSS
around an offload and an onload, and whether log-probs after offload + onload are bitwise the
same. Rank 0 writes every step's metrics per layout; the test compares layouts that must agree.

PPO variants (``ppo``, ``ppo_naive``: ``algorithm.name=ppo`` with a critic, ``PPO_EPOCHS`` passes
over the rollout, the critic as many) run the trainer's own choreography (``trainer.update``: critic, train,
critic_train) and report, besides the steps and phase names: the policy's log-probs of the batch
packed with ``train.micro_batch_groups`` 1 and 4 (max |difference|), and the critic's RSS around
an offload and an onload against the bytes it holds (parameters, Adam state, gradient buffers).

    torchrun --nproc-per-node 4 tests/workers/grpo_step.py MODEL_PATH 2,2,1 1,1,1 2,1,2 1,2,2 2,2,1,kl 1,1,1,notis
"""
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import write_result  # noqa: E402

from megatron_rl.algorithms import group_advantages  # noqa: E402
from megatron_rl.algorithms.grpo import make_groups  # noqa: E402
from megatron_rl.config import load_config  # noqa: E402

N, G = 4, 4  # prompts per step (divisible by dp x mini_batches for every layout below), samples each
KL_COEF = 0.1
ROLLOUT_DTYPE = "bfloat16"  # vLLM; the trainer stays fp32
TIS_CAP = 1.002  # bf16 vs fp32 here: |dlogp| mean ~2.3e-3, max ~8e-3, so the cap bites on some tokens
MAX_NEW = 8
PPO = ["algorithm.name=ppo", "algorithm.critic_lr=1e-3", "algorithm.ppo_epochs=2", "algorithm.critic_epochs=2",
       "algorithm.lam=0.9"]


def _rollout_cfg(path: str):
    return load_config(overrides=[f"model.hf_path={path}", "parallel.backend=gloo", "rollout.tp=1",
                                  f"rollout.kv_cache_bytes={16 << 20}", "rollout.max_model_len=128",
                                  f"rollout.max_new_tokens={MAX_NEW}", f"algorithm.group_size={G}",
                                  f"logging.run_dir={os.path.join(os.environ['OUT_DIR'], 'rollout')}"])


def vllm_batch(path: str) -> tuple:
    """(batch, advantages): vLLM samples G responses of N fixed prompts, with its log-probs
    (``trainer.generate``: every rank gets the whole batch); rewards are fixed random numbers."""
    from megatron_rl import trainer
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.rollout.vllm_engine import VllmEngine

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N)]
    rewards = torch.rand(N * G, generator=g)
    cfg = _rollout_cfg(path)
    topo = init_distributed(cfg.parallel, rollout_tp=cfg.rollout.tp)  # vLLM finds the world set up, as in the trainer
    engine = VllmEngine(path, cfg=cfg.rollout, topo=topo, run_dir=cfg.logging.run_dir, dtype=ROLLOUT_DTYPE)
    batch = trainer.generate(engine, cfg, prompt_ids=prompts, step=0)
    destroy_distributed(keep_process_group=True)
    return batch, group_advantages(rewards, group_size=G)


def expected_tis(trainer_logp: list, rollout_logp: list, cap: float) -> dict:
    """Token-mean TIS figures at the initial weights, from the two log-prob tables (N x G lists)."""
    old = torch.tensor([x for grp in trainer_logp for resp in grp for x in resp], dtype=torch.float64)
    roll = torch.tensor([x for grp in rollout_logp for resp in grp for x in resp], dtype=torch.float64)
    ratio = torch.exp(old - roll)
    return {"tokens": old.numel(), "abs_mean": float((old - roll).abs().mean()),
            "weight_mean": float(ratio.clamp(max=cap).mean()), "capped_frac": float((ratio >= cap).double().mean())}


def own_logprobs(model, batch, adv) -> list:
    """``model``'s log-probs of every response (the engine, or the reference: anything with
    ``forward(batches, forward_fn=...)``), as N x G lists, on every rank."""
    from megatron.core import parallel_state as ps

    from megatron_rl.attention import collect_logprobs, make_batches, make_forward_fn, pg_loss

    metrics = model.forward(make_batches(make_groups(batch, adv, indices=range(N)), max_tokens=4096),
                            forward_fn=make_forward_fn(pg_loss))
    mine = collect_logprobs(metrics) if ps.is_pipeline_last_stage() else None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    table = next(t for t in everyone if t)
    return [[table[(gi, i)].tolist() for i in range(G)] for gi in range(N)]


def _max_diff(a: list, b: list) -> float:
    return max(float((torch.tensor(x) - torch.tensor(y)).abs().max()) for ga, gb in zip(a, b) for x, y in zip(ga, gb)
               if len(x))


def reference_checks(ref, policy_logp: list, batch, adv) -> dict:
    """The reference equals the initial policy, and its offload frees its bytes (this rank's RSS)."""
    from megatron_rl.rollout.cpu_memory import rss_bytes

    with ref.onloaded():
        first = own_logprobs(ref, batch, adv)
        rss_on = rss_bytes()
    rss_off = rss_bytes()
    ref.onload()
    rss_back = rss_bytes()
    again = own_logprobs(ref, batch, adv)
    ref.offload()
    return {"ref_vs_policy_max_abs": _max_diff(first, policy_logp), "ref_bitwise_after_reload": first == again,
            "param_bytes": ref.param_bytes, "rss_drop": rss_on - rss_off, "rss_rise": rss_back - rss_off}


def run_layout(path: str, hf, spec: str, batch, adv) -> dict:
    from megatron_rl import trainer
    from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.train.engine import TrainEngine

    start = time.perf_counter()
    tp, pp, mini, *variant = spec.split(",")
    extra = {"naive": ["train.shared_prefix=false"], "kl": [f"algorithm.kl_coef={KL_COEF}"],
             "notis": ["algorithm.tis_cap=null"], "ppo": PPO,
             "ppo_naive": [*PPO, "train.shared_prefix=false"], "ppo_kl": [*PPO, f"algorithm.kl_coef={KL_COEF}"],
             "ppo_distopt": [*PPO, "parallel.distributed_optimizer=true"]}.get(variant[0] if variant else "", [])
    cfg = load_config(overrides=[f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.backend=gloo",
                                 f"model.hf_path={path}", f"algorithm.group_size={G}", f"data.prompts_per_step={N}",
                                 f"algorithm.mini_batches={mini}", "train.micro_batch_groups=1", "train.lr=1e-3",
                                 f"algorithm.tis_cap={TIS_CAP}", f"rollout.max_new_tokens={MAX_NEW}",
                                 f"logging.run_dir={os.path.join(os.environ['OUT_DIR'], 'run')}", *extra])
    cfg.validate(world_size=dist.get_world_size(), hf_config=hf)
    trainer.check_supported(cfg)
    topo = init_distributed(cfg.parallel)
    eng = TrainEngine(hf, parallel=cfg.parallel, train=cfg.train, topo=topo, hf_path=path,
                      core_attention=SharedPrefixCoreAttention)
    enable_shared_prefix(eng.model)
    ref = trainer.make_reference(cfg, hf_config=hf, topo=topo)
    if cfg.algorithm.name == "ppo":
        out = run_ppo(cfg, hf, eng=eng, topo=topo, ref=ref, batch=batch, adv=adv)
        destroy_distributed(keep_process_group=True)
        return {**out, "seconds": time.perf_counter() - start}
    mine = own_logprobs(eng, batch, adv)  # fp32, initial weights: the trainer's side of the mismatch
    expected = expected_tis(mine, batch.logprobs, TIS_CAP)
    checks = reference_checks(ref, mine, batch, adv) if ref is not None else None
    phases = []
    steps = [trainer.train_step(eng, cfg, batch, adv, lr=1e-3, ref=ref, phase=lambda name: _record(phases, name))
             for _ in range(2)]
    destroy_distributed(keep_process_group=True)
    return {"steps": steps, "checks": checks, "phases": phases, "expected_tis": expected,
            "seconds": time.perf_counter() - start}


def micro_batching_diff(cfg, eng, batch, *, topo) -> float:
    """Max |log p| difference between packing with train.micro_batch_groups 1 and 4 (same weights)."""
    import dataclasses

    from megatron_rl.train.rl_step import forward_table, gather_table, plan_step

    tables = []
    for mbg in (1, 4):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_groups=mbg))
        plan = plan_step(c, batch, topo=topo)
        tables.append((gather_table(forward_table(eng, plan, topo=topo), topo=topo), [len(b) for b in plan.mb_batches]))
    (a, na), (b, nb) = tables
    assert set(a) == set(b) and na != nb, (na, nb)  # really different micro-batchings
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].numel())


def run_ppo(cfg, hf, *, eng, topo, ref, batch, adv) -> dict:
    import types

    from megatron_rl import trainer
    from megatron_rl.rollout.cpu_memory import rss_bytes

    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(N * G, generator=g).tolist()
    mb_diff = micro_batching_diff(cfg, eng, batch, topo=topo) if topo.grid.dp == 1 else None  # DP1: 4 groups
    critic = trainer.make_critic(cfg, hf_config=hf, topo=topo)
    job = types.SimpleNamespace(cfg=cfg, eng=eng, ref=ref, critic=critic)
    phases, steps, kl_expected = [], [], []
    for s in range(2):
        if ref is not None:  # PPO's KL reward term, from another code path: this rank's own log-prob tables
            with ref.onloaded():
                ref_logp = own_logprobs(ref, batch, adv)
            kl_expected.append(_kl_figures(own_logprobs(eng, batch, adv), ref_logp, kl_coef=cfg.algorithm.kl_coef))
        steps.append(trainer.update(job, batch, rewards, step=s, lr=1e-3, phase=lambda name: _record(phases, name)))
    critic.onload()
    rss_on, held = rss_bytes(), critic.state_bytes()
    critic.offload()
    rss_off = rss_bytes()
    critic.onload()
    rss_back = rss_bytes()
    critic.offload()
    return {"steps": steps, "phases": phases, "microbatch_logp_max_diff": mb_diff, "kl_expected": kl_expected,
            "critic": {"state_bytes": held, "rss_drop": rss_on - rss_off, "rss_rise": rss_back - rss_off,
                       "in_place_bytes": sum(critic.flat_store.nbytes), "param_bytes": critic.param_bytes}}


def _kl_figures(policy_logp: list, ref_logp: list, *, kl_coef: float) -> dict:
    """PPO's KL reward figures from two N x G log-prob tables: the token mean of policy minus
    reference, and -kl_coef times its sum per response, averaged over responses."""
    diffs = [torch.tensor(p, dtype=torch.float64) - torch.tensor(r, dtype=torch.float64)
             for gp, gr in zip(policy_logp, ref_logp) for p, r in zip(gp, gr)]
    total = sum(float(d.sum()) for d in diffs)
    return {"ppo/kl_mean": total / sum(d.numel() for d in diffs), "ppo/kl_reward": -kl_coef * total / len(diffs)}


def _record(log: list, name: str):
    import contextlib

    log.append(name)
    return contextlib.nullcontext()


def main():
    from transformers import AutoConfig

    path, layouts = sys.argv[1], sys.argv[2:]
    hf = AutoConfig.from_pretrained(path)
    dist.init_process_group("gloo")
    batch, adv = vllm_batch(path)
    results = {"rollout": {"logprobs": batch.logprobs, "lengths": batch.flat_lengths()}}
    for spec in layouts:
        results[spec] = run_layout(path, hf, spec, batch, adv)
    write_result(results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
