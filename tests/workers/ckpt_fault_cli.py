"""The production CLI with a checkpoint fault installed (the test seam of megatron_rl.runtime.faults).

``MEGATRON_RL_CKPT_FAULT=<step>`` makes rank 0 SIGKILL its whole local job (every worker's
process group, then torchrun) in the save of that step, after the dist-checkpoint shards are on
disk and before ``COMPLETE``; in the first attempt only (never after a torchrun restart).

    torchrun --nproc-per-node 4 tests/workers/ckpt_fault_cli.py train --config ...
"""
from __future__ import annotations

import os
import signal
import sys
import time

from megatron_rl import cli
from megatron_rl.runtime import faults
from megatron_rl.runtime.rank import restart_count

FAULT_ENV = "MEGATRON_RL_CKPT_FAULT"


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


if __name__ == "__main__":
    if os.environ.get(FAULT_ENV) is not None:
        faults.install("checkpoint:after_shards", _hook)
    sys.exit(cli.main())
