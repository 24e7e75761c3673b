"""Worker: the memory a real training step allocates, for ``megatron-rl plan``'s estimate to meet.

configs/tiny_cpu.yaml's model and layout (tiny Llama, TP2 x PP2, fp32), megatron-core's
engine with shared-prefix attention, and micro-batches of the largest size the config can
produce (every prompt ``data.max_prompt_len`` long, every response ``rollout.max_new_tokens``).
For each ``train.recompute`` mode named on the command line, measured with the torch
profiler's memory view (``profile_memory=True``: the CPU allocator reports every allocation
and free; their running sum is the bytes allocated since profiling began and still alive):

* ``state``: alive after building the engine (weights, grads) and after its first optimizer
  step (the Adam moments it creates);
* ``step_peak``: the peak of a second step, above what was alive when it began.

    torchrun --nproc-per-node 4 tests/workers/plan_memory.py none,full
"""
import gc
import json
import os
import sys
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import write_result  # noqa: E402

from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix, make_batches  # noqa: E402
from megatron_rl.attention.packing import Group  # noqa: E402
from megatron_rl.attention.step import make_forward_fn, pg_loss  # noqa: E402
from megatron_rl.config import load_config  # noqa: E402
from megatron_rl.models.tiny import tiny_hf_config  # noqa: E402
from megatron_rl.parallel import destroy_distributed, init_distributed  # noqa: E402
from megatron_rl.train.engine import TrainEngine  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                      "tiny_cpu.yaml")


def alive_bytes(prof) -> tuple[int, int]:
    """(peak, end) of the bytes allocated inside the profiled region and still alive.

    The profiler's memory events (exported trace: address and signed size) are matched by
    address, so frees of memory allocated before the region do not count against it."""
    path = os.path.join(os.environ["OUT_DIR"], f"trace{os.environ.get('RANK', '0')}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    os.remove(path)
    alive, total, peak = {}, 0, 0
    for e in sorted(events, key=lambda e: e["ts"]):
        addr, n = e["args"]["Addr"], e["args"]["Bytes"]
        if n > 0:
            alive[addr] = n
            total += n
        elif addr in alive:
            total -= alive.pop(addr)
        peak = max(peak, total)
    return peak, total


def largest_groups(cfg, *, groups: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    vocab = 250
    G, P, R = cfg.algorithm.group_size, cfg.data.max_prompt_len, cfg.rollout.max_new_tokens
    out = []
    for _ in range(groups):
        prompt = torch.randint(3, vocab, (P,), generator=gen).tolist()
        resp = [torch.randint(3, vocab, (R,), generator=gen).tolist() for _ in range(G)]
        out.append(Group(prompt=prompt, responses=resp, advantages=torch.randn(G, generator=gen).tolist()))
    return out


def measure(cfg, hf_config, topo, groups) -> dict:
    """``state``: alive after building the engine (weights, grads) plus alive after its first
    optimizer step (the Adam moments it creates); ``step_peak``: a second step's peak."""
    batches = make_batches(groups, max_tokens=(cfg.data.max_prompt_len + cfg.algorithm.group_size *
                                                cfg.rollout.max_new_tokens) * cfg.train.micro_batch_groups,
                           max_seq_len=cfg.rollout.max_model_len, pad_multiple=1)
    forward_fn = make_forward_fn(pg_loss)
    gc.collect()  # the previous mode's engine goes before this one is measured
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        eng = TrainEngine(hf_config, parallel=cfg.parallel, train=cfg.train, topo=topo, dtype=torch.float32,
                          core_attention=SharedPrefixCoreAttention)
    _, built = alive_bytes(prof)
    enable_shared_prefix(eng.model)
    eng._run(batches, forward_fn=forward_fn, forward_only=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        eng.optimizer.step()
    _, adam = alive_bytes(prof)
    gc.collect()  # a step's autograd closures form reference cycles
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        eng.step(batches, forward_fn=forward_fn)
    peak, _ = alive_bytes(prof)
    return {"state": built + adam, "step_peak": peak, "micro_batches": len(batches),
            "tokens": int(batches[0]["tokens"].numel())}


def main():
    modes = sys.argv[1].split(",")
    cfg = load_config(CONFIG)
    hf_config = tiny_hf_config("llama")
    topo = init_distributed(cfg.parallel, seed=cfg.train.seed, rollout_tp=cfg.rollout.tp)
    dp = topo.grid.dp
    groups = largest_groups(cfg, groups=cfg.data.prompts_per_step // (dp * cfg.algorithm.mini_batches), seed=1)
    out = {"rank": topo.rank, "tp": topo.coord.tp, "pp": topo.coord.pp}
    for mode in modes:
        c = replace(cfg, train=replace(cfg.train, recompute=mode))
        out[mode] = measure(c, hf_config, topo, groups)
    destroy_distributed()
    write_result(out)


if __name__ == "__main__":
    main()
