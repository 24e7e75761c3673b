"""The production CLI with test hooks installed (the test seam of megatron_rl.runtime.faults).

``MEGATRON_RL_CKPT_FAULT=<step>`` makes rank 0 SIGKILL its whole local job (every worker's
process group, then torchrun) in the save of that step, after the dist-checkpoint shards are on
disk and before ``COMPLETE``; in the first attempt only (never after a torchrun restart).

``MEGATRON_RL_GREEDY_PROBE=<file>``: at the end of training (the last step saved, vLLM holding
its weights after the last sync) every rank asks the rollout engine for greedy generations of
:data:`PROBE_PROMPTS`; rank 0 writes the prompts' token ids, the generated ids and their
log-probs to ``<file>`` (JSON), for comparison with an export of the saved checkpoint.

    torchrun --nproc-per-node 4 tests/workers/ckpt_fault_cli.py train --config ...
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

from megatron_rl import cli
from megatron_rl.runtime import faults
from megatron_rl.runtime.rank import restart_count

FAULT_ENV = "MEGATRON_RL_CKPT_FAULT"
PROBE_ENV = "MEGATRON_RL_GREEDY_PROBE"
PROBE_PROMPTS = ("12+34=", "Count: 1, 2, 3,", "hello world", "The quick brown fox", "7*8=", "abc")
PROBE_TOKENS = 24


def _kill_job() -> None:
    time.sleep(0.2)  # the other ranks are writing their RNG files meanwhile
    launcher, me = os.getppid(), os.getpid()
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == launcher and pid != me:  # torchrun starts each worker in its own session
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue
    os.kill(launcher, signal.SIGKILL)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _hook(*, step: int, rank: int) -> None:
    if int(os.environ[FAULT_ENV]) == step and rank == 0 and restart_count() == 0:
        _kill_job()


def _greedy_probe(*, rollout, tokenizer, rank: int) -> None:
    from megatron_rl.rollout.base import Sampling  # lazy: as the CLI (vLLM loads under train only)

    prompts = [tokenizer.encode(p) for p in PROBE_PROMPTS]
    gens = rollout.generate(prompts, sampling=Sampling(max_new_tokens=PROBE_TOKENS, temperature=0.0, seed=0))
    if rank == 0:
        with open(os.environ[PROBE_ENV], "w") as f:
            json.dump({"max_new_tokens": PROBE_TOKENS, "prompts": prompts, "tokens": [g.tokens for g in gens], "logprobs": [g.logprobs for g in gens],
                       "finish": [g.finish_reason for g in gens]}, f)


if __name__ == "__main__":
    if os.environ.get(FAULT_ENV) is not None:
        faults.install("checkpoint:after_shards", _hook)
    if os.environ.get(PROBE_ENV):
        faults.install("train:end", _greedy_probe)
    sys.exit(cli.main())
