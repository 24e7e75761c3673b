"""The RL job's state across restarts: checkpoint save and resume, and the restart line.

The model, the optimizer and PPO's critic go through :mod:`megatron_rl.checkpoint.rl` (atomic,
bitwise resume); the data position and the reward history ride along in its ``extra``::

    save_state(cfg, eng, step=step, data=job.data, rewards=history, critic=job.critic)
    start, history = resume_state(cfg, eng, data=job.data, critic=job.critic)   # (0, []) when fresh
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

from megatron_rl import console
from megatron_rl.config import Config
from megatron_rl.runtime.rank import restart_count
from megatron_rl.runtime.report import restart_line


def _critic_state(critic) -> Optional[tuple]:
    return None if critic is None else (critic.model, critic.optimizer)


# ---------------------------------------------------------------------------------------------
# Checkpoints (model + optimizer through megatron_rl.checkpoint; data position and step here).


def save_state(cfg: Config, eng, *, step: int, data, rewards: list, critic=None) -> None:
    try:
        from megatron_rl.checkpoint.rl import save_rl_checkpoint  # lazy: a broken install fails here, naming the fix
    except ImportError as e:  # never drop a checkpoint silently: a broken install must stop the run
        raise ImportError(f"checkpoint.dir={cfg.checkpoint.dir!r} is set but megatron_rl.checkpoint.rl cannot be "
                          f"imported ({e}); fix: repair the install (pip install -e .), or set checkpoint.dir=null "
                          "to run without checkpoints") from e
    with critic.onloaded() if critic is not None else contextlib.nullcontext():
        save_rl_checkpoint(cfg.checkpoint.dir, step=step, model=eng.model, optimizer=eng.optimizer,
                           extra={"data": data.state_dict(), "reward_history": rewards}, keep=cfg.checkpoint.keep,
                           config=cfg, critic=_critic_state(critic))


def resume_state(cfg: Config, eng, *, data, critic=None) -> tuple[int, list]:
    """(first step to run, reward history) from the newest complete checkpoint, or (0, [])."""
    if not (cfg.checkpoint.dir and cfg.checkpoint.resume):
        return 0, []
    try:
        from megatron_rl.checkpoint.rl import load_rl_checkpoint  # lazy: as above
    except ImportError as e:  # "no checkpoint" would silently restart from step 0
        raise ImportError(f"checkpoint.resume=true but megatron_rl.checkpoint.rl cannot be imported ({e}); fix: "
                          "repair the install (pip install -e .), or set checkpoint.resume=false to start fresh") from e
    with critic.onloaded() if critic is not None else contextlib.nullcontext():
        got = load_rl_checkpoint(cfg.checkpoint.dir, model=eng.model, optimizer=eng.optimizer,
                                 critic=_critic_state(critic))
    if got is None:
        return 0, []
    step, extra = got
    data.load_state_dict(extra["data"])
    return step + 1, list(extra.get("reward_history", []))


def log_restart(cfg: Config, *, rank: int, start: int) -> None:
    """After a torchrun restart (MAX_RESTARTS), rank 0 logs one line: the restart, the rank that
    died in the previous attempt (from its records) and the step this attempt resumes from."""

    attempt = restart_count()
    if attempt > 0 and rank == 0:
        print(restart_line(cfg.logging.run_dir, attempt=attempt, resumed=start,
                           max_restarts=os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")), file=console.stderr(), flush=True)
