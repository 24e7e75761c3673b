"""A small SPMD job for the launch tests: gloo collectives in named phases, deterministic.

Each step runs three phases with the runtime's phase tracking and timeouts:
``rollout`` (all_gather of seeded samples), ``train`` (all_reduce of a gradient, SGD update),
``sync`` (broadcast of the weights from rank 0 and a cross-rank equality check). Every rank
writes its weights after each step as float64 hex strings, so runs on different topologies
(one node x 4, two nodes x 2) can be compared bitwise.

Fault injection (env FAULT=<what>:<phase>:<rank>, at step 1):
- ``stall``: the rank writes $OUT_DIR/victim.json (pid, phase) and sleeps inside the phase,
  so the test can ``kill -9`` it there;
- ``raise``: the rank raises RuntimeError in the phase;
- ``hang``: the rank sleeps past the phase timeout (the watchdog must fire).

    torchrun --nproc-per-node 4 tests/workers/launch_worker.py --config c.yaml train.steps=3
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _launch import write_result  # noqa: E402

from megatron_rl.config import load_config  # noqa: E402
from megatron_rl.runtime import run_rank  # noqa: E402


def _maybe_fault(rt, step: int) -> None:
    what, phase, rank = (os.environ.get("FAULT", "") + "::-1").split(":")[:3]
    if step != 1 or int(rank) != rt.rank or phase != rt.current_phase:
        return
    if what == "stall":
        with open(os.path.join(os.environ["OUT_DIR"], "victim.json.tmp"), "w") as f:
            json.dump({"pid": os.getpid(), "rank": rt.rank, "phase": phase, "time": time.time()}, f)
        os.replace(os.path.join(os.environ["OUT_DIR"], "victim.json.tmp"),
                   os.path.join(os.environ["OUT_DIR"], "victim.json"))
        time.sleep(120)
    elif what == "raise":
        raise RuntimeError(f"injected fault on rank {rt.rank} in {phase}")
    elif what == "hang":
        time.sleep(rt.timeout_s * 4)


def job(rt, cfg) -> int:
    rt.init_process_group(backend="gloo")
    world, rank = rt.world_size, rt.rank
    w = torch.zeros(16, dtype=torch.float64)
    history = []
    for step in range(cfg.train.steps):
        with rt.phase("rollout"):
            g = torch.Generator().manual_seed(cfg.train.seed + 1000 * step + rank)
            sample = torch.randn(16, generator=g, dtype=torch.float64)
            gathered = [torch.empty_like(sample) for _ in range(world)]
            _maybe_fault(rt, step)
            dist.all_gather(gathered, sample)
        with rt.phase("train"):
            grad = torch.stack(gathered).mean(0) * (rank + 1) + w  # (16,)
            _maybe_fault(rt, step)
            dist.all_reduce(grad)
            w = w - cfg.train.lr * grad / world
        with rt.phase("sync"):
            _maybe_fault(rt, step)
            dist.broadcast(w, src=0)
            sums = torch.tensor([float(w.sum())], dtype=torch.float64)
            all_sums = [torch.empty_like(sums) for _ in range(world)]
            dist.all_gather(all_sums, sums)
            assert len({float(s) for s in all_sums}) == 1, "weights differ across ranks after sync"
        history.append([float(x).hex() for x in w])
    if os.environ.get("OUT_DIR"):
        write_result({"rank": rank, "world": world, "history": history, "host_addr": os.environ.get("LOCAL_ADDR")})
    dist.destroy_process_group()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, overrides=args.overrides)
    return run_rank(lambda rt: job(rt, cfg), run_dir=cfg.logging.run_dir, timeout_s=cfg.parallel.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
