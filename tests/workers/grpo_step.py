"""Worker: the trainer's GRPO step (``megatron_rl.trainer.train_step``: GRPOLoss on shared-prefix
packed groups through megatron-core) at several layouts in one launch.

For each layout ``tp,pp,mini_batches`` the rank builds the engine from the same tiny HF
model, takes the trainer's own log-probs of a fixed batch as the "rollout" log-probs (so the
mismatch must be 0), and runs two GRPO steps. Rank 0 writes every step's metrics per layout;
the test compares layouts that must agree (same mini_batches, different TP/PP/DP).

    torchrun --nproc-per-node 4 tests/workers/grpo_step.py MODEL_PATH 2,2,1 1,1,1 2,1,2 1,2,2
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import write_result  # noqa: E402

from megatron_rl.algorithms import group_advantages  # noqa: E402
from megatron_rl.algorithms.grpo import RolloutBatch, make_groups  # noqa: E402
from megatron_rl.config import load_config  # noqa: E402

N, G = 4, 4  # prompts per step (divisible by dp x mini_batches for every layout below), samples each


def fixed_batch() -> tuple:
    g = torch.Generator().manual_seed(0)

    def ids(lo, hi):
        return torch.randint(3, 90, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    prompts = [ids(3, 8) for _ in range(N)]
    resp = [[ids(1, 9) for _ in range(G)] for _ in range(N)]
    rewards = torch.rand(N * G, generator=g)
    return RolloutBatch(rows=[], prompt_ids=prompts, response_ids=resp, logprobs=[]), group_advantages(
        rewards, group_size=G)


def own_logprobs(eng, batch, adv) -> list:
    """The trainer's log-probs of every response, as N x G lists, on every rank."""
    from megatron.core import parallel_state as ps

    from megatron_rl.attention import collect_logprobs, make_batches, make_forward_fn, pg_loss

    metrics = eng.forward(make_batches(make_groups(batch, adv, indices=range(N)), max_tokens=4096),
                          forward_fn=make_forward_fn(pg_loss))
    mine = collect_logprobs(metrics) if ps.is_pipeline_last_stage() else None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    table = next(t for t in everyone if t)
    return [[table[(gi, i)].tolist() for i in range(G)] for gi in range(N)]


def run_layout(path: str, hf, tp: int, pp: int, mini: int) -> list:
    from megatron_rl import trainer
    from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.train.engine import TrainEngine

    cfg = load_config(overrides=[f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.backend=gloo",
                                 f"model.hf_path={path}", f"algorithm.group_size={G}", f"data.prompts_per_step={N}",
                                 f"algorithm.mini_batches={mini}", "train.micro_batch_groups=1", "train.lr=1e-3"])
    cfg.validate(world_size=dist.get_world_size(), hf_config=hf)
    init_distributed(cfg.parallel)
    eng = TrainEngine(hf, parallel=cfg.parallel, train=cfg.train, hf_path=path,
                      core_attention=SharedPrefixCoreAttention)
    enable_shared_prefix(eng.model)
    batch, adv = fixed_batch()
    batch.logprobs = own_logprobs(eng, batch, adv)
    out = [trainer.train_step(eng, cfg, batch, adv, lr=1e-3) for _ in range(2)]
    destroy_distributed(keep_process_group=True)
    return out


def main():
    from transformers import AutoConfig

    path, layouts = sys.argv[1], sys.argv[2:]
    hf = AutoConfig.from_pretrained(path)
    dist.init_process_group("gloo")
    results = {}
    for spec in layouts:
        tp, pp, mini = map(int, spec.split(","))
        results[spec] = run_layout(path, hf, tp, pp, mini)
    write_result(results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
